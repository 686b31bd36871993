"""The CPU multi-tensor kernel (kernels/native.py): its rounding, its block sums, which tensors it takes,
its fallback without a compiler, and the per-group scalar vectors it works on.

Its whole step is held to the float64 SPEC reference by test_optimizer_reference.py and
test_properties.py (the default fused path on CPU) and to the multi-tensor path by test_fused.py.
"""

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refadamw import AdamWMiniSF, precision
from refadamw.kernels import foreach, native
from refadamw.partition import block_layout

pytestmark = pytest.mark.skipif(not native.available() or native.library() is None,
                                reason="the CPU kernel cannot be built here (no C compiler)")

_floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
_special = st.sampled_from([0.0, -0.0, 2.0**-14, 2.0**-20, -3e-8, 6e-5, 65504.0, 7e4, 3.3e38, -1.0, 1e-40])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_floats, _special), min_size=1, max_size=700), st.integers(-2**31, 2**31 - 1),
       st.sampled_from([torch.bfloat16, torch.float16]))
def test_rounding_is_precisions_rounding_bit_for_bit(values, key, dtype):
    src = torch.tensor(values, dtype=torch.float32)
    expected = precision.stochastic_round(src, dtype, torch.tensor(key, dtype=torch.int32))
    assert torch.equal(native.stochastic_round(src, dtype, key).view(torch.int16), expected.view(torch.int16))


def _plan(tensors, layouts):
    offsets = [torch.zeros_like(t, dtype=torch.bfloat16) for t in tensors]
    vs = [torch.zeros(lay.state_shape(t.shape)) for t, lay in zip(tensors, layouts)]
    return native.Plan(tensors, offsets, vs, layouts)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_sums_and_norms_match_float64(grad_dtype):
    shapes = [(300, 70), (3, 40000), (7,), (), (0, 5), (5000,), (16, 640)]
    grads = [torch.randn(s).to(grad_dtype) * 3 for s in shapes]
    layouts = [block_layout(s) for s in shapes]
    plan = _plan([torch.zeros(s) for s in shapes], layouts)
    sums = plan.row_sums(grads)
    for i, (g, lay) in enumerate(zip(grads, layouts)):
        g64 = g.double()
        assert math.isclose(sums[i].item(), g64.square().sum().item(), rel_tol=1e-6, abs_tol=1e-30)
        if not lay.per_element:
            at = plan.sq_at[i].item()
            block = plan.sq[at:at + lay.n_blocks].double()
            torch.testing.assert_close(block, g64.reshape(lay.n_blocks, -1).square().sum(1), rtol=1e-6, atol=0)


def _group_run(grad_dtype=None, steps=3, **options):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    params = [torch.nn.Parameter(torch.randn(())), torch.nn.Parameter(torch.empty(0, 3)),
              torch.nn.Parameter(torch.randn(64, 32)), conv.weight, torch.nn.Parameter(torch.randn(32)),
              torch.nn.Parameter(torch.randn(48, 16).bfloat16())]
    opt = AdamWMiniSF(params, lr=1e-2, weight_decay=0.1, warmup_steps=1, **options)
    if grad_dtype is not None:
        for p in params:
            p.grad_dtype = None  # any gradient dtype (as FSDP2's reduce_dtype gives)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g
            if grad_dtype is not None and p.dtype == torch.float32:
                p.grad = p.grad.to(grad_dtype)
        opt.step()
    return params, opt


def test_one_call_takes_every_tensor_that_fits_and_only_those():
    params, opt = _group_run()
    plans = next(iter(opt._plans.values())).cache["plans"]
    (plan,) = [p for p in plans if p.native is not None]
    taken = {plan.idx[j] for j in plan.native_idx}
    # the 0-d and the empty parameter are taken; the channels_last weight alone is left to the other path
    assert taken == {0, 1, 2, 4, 5}
    expected, _ = _group_run(fused=False)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_low_precision_gradients_are_read_as_they_are():
    """bf16 gradients of fp32 parameters: the same run as with their exact fp32 upcast."""
    direct, _ = _group_run(grad_dtype=torch.bfloat16)

    params, opt = _group_run(steps=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g
            if p.dtype == torch.float32:
                p.grad = p.grad.to(torch.bfloat16).float()
        opt.step()
    for p, q in zip(direct, params):
        assert torch.equal(p, q)


def test_without_a_compiler_it_warns_once_and_the_multi_tensor_path_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("REFADAMW_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        params, opt = _group_run()
        _group_run()
    assert sum("CPU multi-tensor kernel failed" in r.getMessage() for r in caplog.records) == 1
    assert not native.available()
    assert all(p.native is None for plan in opt._plans.values() for p in plan.cache["plans"])
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.delenv("CC")
    expected, _ = _group_run()  # built again into the empty cache: the kernel's run
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_the_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("REFADAMW_CACHE_DIR", str(tmp_path))
    first = native._build("cc")
    stamp = first.stat().st_mtime_ns
    assert native._build("cc") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_per_tensor_scalars_are_one_vector_per_group_and_survive_a_reload():
    params, opt = _group_run()
    steps = [opt.state[p]["step"] for p in params]
    assert {s.untyped_storage().data_ptr() for s in steps[:3] + steps[4:5]} == {steps[0].untyped_storage().data_ptr()}
    assert all(s.dtype == torch.int64 for s in steps)
    assert all(opt.state[p]["weight_sum"].dtype == torch.float64 for p in params)
    saved = opt.state_dict()
    again = AdamWMiniSF([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, weight_decay=0.1,
                        warmup_steps=1)
    again.load_state_dict(saved)
    for p, q in zip(params, again.param_groups[0]["params"]):
        g = torch.randn(p.shape).to(p.dtype)
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    again.step()
    for p, q in zip(params, again.param_groups[0]["params"]):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["step"], again.state[q]["step"])


def test_the_step_counter_keeps_counting_past_2_to_the_24():
    assert torch.tensor(2.0**24) + 1 == 2.0**24  # what an fp32 counter does
    params, opt = _group_run(state_dtype="bf16")
    for p in params:
        opt.state[p]["step"].fill_(2**24)
    keys = []
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        keys.append(precision.rounding_keys(opt.state[params[2]]["rounding_key"], opt.state[params[2]]["step"],
                                            precision.Salt.PARAM))
    assert all(opt.state[p]["step"].item() == 2**24 + 2 for p in params)
    assert keys[0] != keys[1]


def test_a_checkpoint_with_float_counters_loads():
    params, opt = _group_run()
    saved = opt.state_dict()
    for s in saved["state"].values():
        s["step"] = s["step"].float()
        s["weight_sum"] = s["weight_sum"].float()
        if s["exp_avg_sq"].dim() == 1 and s["exp_avg_sq"].numel() in (64, 48):
            s["exp_avg_sq"] = s["exp_avg_sq"].bfloat16()  # block v was bf16 before
    again = AdamWMiniSF(params, lr=1e-2, weight_decay=0.1, warmup_steps=1)
    again.load_state_dict(saved)
    state = again.state[params[2]]
    assert (state["step"].dtype, state["weight_sum"].dtype, state["exp_avg_sq"].dtype) == \
        (torch.int64, torch.float64, torch.float32)
    assert state["step"].item() == 3


def _linears_run(steps, nan_at=None, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16))
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=1, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if step == nan_at:
            model[1].bias.grad[3] = float("nan")
        opt.step()
    return model, opt


def test_the_one_call_step_is_the_two_call_step_bit_for_bit(monkeypatch):
    calls = []
    real = foreach.one_call_step
    monkeypatch.setattr(foreach, "one_call_step", lambda *a: calls.append(1) or real(*a))
    one, _ = _linears_run(4, nan_at=2)
    assert len(calls) == 3  # every step after the first (fresh state takes two calls)
    monkeypatch.setattr(foreach, "one_call_step", lambda *a: None)
    two, _ = _linears_run(4, nan_at=2)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)


def test_the_one_call_step_writes_nothing_on_a_non_finite_gradient():
    model, opt = _linears_run(2)
    before = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[5, 7] = float("inf")
    opt.step()
    assert opt.stats()["skipped_steps"].item() == 1
    for p, b, s in zip(model.parameters(), before, state):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, s[k]), k


def test_a_compiler_without_openmp_still_builds_the_kernel(monkeypatch, tmp_path):
    """Apple's clang rejects -fopenmp: the kernel is built without it (one thread) instead of not at all."""
    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option" >&2; exit 1; }; done\n'
                    'exec cc "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("REFADAMW_CACHE_DIR", str(tmp_path / "cache"))
    built = native._build(str(fake))
    assert built.exists()
    import ctypes

    assert ctypes.CDLL(str(built)).refadamw_has_f16() in (0, 1)
