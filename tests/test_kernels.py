"""The multi-tensor path equals the per-tensor reference path."""

from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refadamw import kernels, partition
from refadamw.kernels import foreach
from refadamw.optimizer import AdamWMiniSF

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)
hyper = st.fixed_dictionaries(dict(
    lr=st.floats(0.0, 0.1),
    betas=st.tuples(st.floats(0.05, 0.99), st.floats(0.0, 0.999)),
    eps=st.sampled_from([1e-12, 1e-8, 1e-3]),
    weight_decay=st.floats(0.0, 0.5),
    warmup_steps=st.integers(0, 4),
    auto_lr=st.booleans(),
    mini=st.booleans(),
    schedule_free=st.booleans(),
    block_rows=st.just(1),
    schedulefree_alpha=st.floats(0.01, 1.0),
))


def _run(shape_list, dtype, options, foreach, grads, state_dtype="fp32"):
    params = [torch.nn.Parameter(torch.linspace(-1, 1, max(1, torch.Size(s).numel())).reshape(s).to(dtype) * (i + 1))
              for i, s in enumerate(shape_list)]
    opt = AdamWMiniSF(params, foreach=foreach, state_dtype=state_dtype, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
    if state_dtype in ("fp32", "auto"):  # "auto" is passed for fp64 params only: fp64 state
        # x = (y − (1−β1)·z)/β1 magnifies a one-ulp difference in a bf16 z by
        # up to 1/β1, so low-precision state is compared at y.
        opt.eval()
    return params, opt


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape_list=st.lists(shapes, min_size=1, max_size=4), options=hyper,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       state_dtype=st.sampled_from(["fp32", "bf16", "fp16"]),
       seed=st.integers(0, 2**16), nan_step=st.sampled_from([None, 1, 2]),
       chunk=st.sampled_from([1, 7, 64, None]))
def test_foreach_matches_single_tensor(shape_list, options, dtype, state_dtype, seed, nan_step, chunk):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for step in range(4):
        row = [torch.randn(s, generator=gen) if (i + step) % 3 else None for i, s in enumerate(shape_list)]
        row[0] = torch.randn(shape_list[0], generator=gen)
        if step == nan_step:
            row[0] = row[0].clone().reshape(-1)
            row[0][0] = float("inf")
            row[0] = row[0].reshape(shape_list[0])
        grads.append(row)
    # Tiny tensors take the mini path too, and the multi-tensor path is split into chunks.
    with mock.patch.object(partition, "SMALL_NUMEL", 4), mock.patch.object(foreach, "CHUNK_NUMEL", chunk):
        if dtype == torch.float64 and state_dtype == "fp32":
            state_dtype = "auto"  # full precision for fp64 parameters
        a, opt_a = _run(shape_list, dtype, options, True, grads, state_dtype)
        b, opt_b = _run(shape_list, dtype, options, False, grads, state_dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    if state_dtype in ("bf16", "fp16"):
        tol = max(tol, 1e-2)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
        assert torch.isfinite(pa).all()
    for key in ("steps", "skipped_steps"):
        assert torch.equal(opt_a.stats()[key], opt_b.stats()[key])


def test_update_dispatches_on_foreach():
    for foreach, name in ((True, "multi_tensor_update"), (False, "single_tensor_update")):
        with mock.patch.object(kernels, name, return_value="sentinel") as impl:
            assert kernels.update([], [], [], [], None, foreach=foreach) == "sentinel"
            impl.assert_called_once()


def test_chunks_cover_every_tensor_once():
    params = [torch.empty(n) for n in (5, 1, 9, 2, 2, 30)]
    for limit in (1, 4, 10, 100, None):
        parts = list(foreach._chunks(params, limit))
        covered = [i for part in parts for i in range(len(params))[part]]
        assert covered == list(range(len(params)))
        for part in parts:
            chunk = params[part]
            assert len(chunk) == 1 or limit is None or sum(p.numel() for p in chunk) <= limit


def test_optimizer_uses_the_path_its_group_asks_for():
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.ones(3)
    opt = AdamWMiniSF([{"params": params[:1], "foreach": False}, {"params": params[1:]}])
    with mock.patch.object(kernels, "single_tensor_update", wraps=kernels.single_tensor_update) as single, \
            mock.patch.object(kernels, "multi_tensor_update", wraps=kernels.multi_tensor_update) as multi:
        opt.step()
    assert single.call_count == 1 and multi.call_count == 1
    assert single.call_args.args[0][0] is params[0] and multi.call_args.args[0][0] is params[1]
