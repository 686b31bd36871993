"""DDP and FSDP2 on CPU (gloo, 2 ranks on loopback) against one process.

The recipes of docs/integrations.md run verbatim in the workers. Each run
is bounded: a few steps, and the worker processes are killed after
``TIMEOUT_S``. The recipe runs use fp32 state, because each rank trains on
its share of the batch and the reduced gradients differ from one process's
in the last bits; the bf16 runs feed every rank the whole batch, so the
gradients are the same bits, and compare bit for bit (the rounding noise is
keyed by the global element index). All runs share one process group:
spawning and warming up the workers is the slow part.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException  # not re-exported by torch.multiprocessing in every version

import refadamw
from refadamw import AdamWMiniSF, RefAdamWMiniSF

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

WORLD = 2
STEPS = 8
SAVE_AT = 4
AUTO_LR_STEPS = 3
TIMEOUT_S = 300  # the shared run below does a dozen short trainings; CI machines can be slow
DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def recipe(name: str) -> str:
    """The code block marked ``<!-- recipe: name -->`` in docs/integrations.md."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"recipe {name!r} not found in {DOCS}"
    return match.group(1)


def build_model() -> torch.nn.Module:
    # 99 rows: an uneven FSDP2 shard (50 + 49); 99x64 is over the mini threshold, so it is row-blocked.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 99), torch.nn.Tanh(), torch.nn.Linear(99, 8))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 64, generator=gen), torch.randn(8, 8, generator=gen)) for _ in range(STEPS)]


def rank_share(batches, rank: int, world: int):
    size = batches[0][0].shape[0] // world
    return [(x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]) for x, y in batches]


def loss_fn(out, target):
    return torch.nn.functional.mse_loss(out, target)


def fp32_state():
    """Make ``from refadamw import RefAdamWMiniSF`` give fp32 state in this process."""
    refadamw.RefAdamWMiniSF = functools.partial(RefAdamWMiniSF, state_dtype="fp32")


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(model, opt) -> dict:
    """Parameters (y), averaged weights (x) and the controller's statistics, as plain tensors."""
    out = {"y": [full(p) for p in model.parameters()]}
    with opt.averaged():
        out["x"] = [full(p) for p in model.parameters()]
    out["controller"] = {k: v.clone() for k, v in opt.controller.state_dict().items()}
    return out


def single_process() -> dict:
    """The same training on the whole global batches, in this process."""
    model = build_model()
    opt = RefAdamWMiniSF(model.parameters(), lr=1e-2, total_steps=STEPS, state_dtype="fp32")
    for inputs, targets in global_batches():
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        opt.step(loss=loss.detach())
        opt.zero_grad()
    return snapshot(model, opt)


# ------------------------------------------------------------------ workers


def _worker(rank: int, world: int, port: int, out: str, body) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":  # gloo's own sockets on loopback too, not the host's first interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = body(rank, world, Path(out))
        finally:
            dist.destroy_process_group()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def ddp_body(rank, world, out: Path) -> dict:
    fp32_state()
    model = build_model()
    namespace = dict(model=model, loader=rank_share(global_batches(), rank, world), loss_fn=loss_fn, steps=STEPS,
                     checkpoint_path=out / "ddp_model.pt")
    exec(recipe("ddp"), namespace)
    return snapshot(model, namespace["opt"])


def fsdp_body(rank, world, out: Path) -> dict:
    from torch.distributed.tensor import DTensor

    fp32_state()
    batches = rank_share(global_batches(), rank, world)
    common = dict(torch=torch, loss_fn=loss_fn, steps=STEPS, save_at=SAVE_AT, checkpoint_dir=str(out / "ckpt"))
    run = dict(common, model=build_model(), loader=batches)
    exec(recipe("fsdp2"), run)
    model, opt = run["model"], run["opt"]
    weight = model[0].weight
    state = opt.state[weight]
    layout = {
        "param_is_dtensor": isinstance(weight, DTensor),
        "z_minus_y_is_dtensor": isinstance(state["z_minus_y"], DTensor),
        "v_sharded_dim0": [p.is_shard(0) for p in state["exp_avg_sq"].placements],
        "v_local_rows": state["exp_avg_sq"].to_local().shape[0],
        "param_local_rows": weight.to_local().shape[0],
    }
    result = dict(snapshot(model, opt), layout=layout)

    # Resume from the step-SAVE_AT checkpoint in a fresh model and optimizer, then finish.
    resumed = dict(common, model=build_model())
    fsdp_part = recipe("fsdp2").split("opt = RefAdamWMiniSF")[0]  # build and shard, as the docs say
    exec(fsdp_part, resumed)
    exec(recipe("fsdp2-resume"), resumed)
    model2, opt2 = resumed["model"], resumed["opt"]
    for inputs, targets in batches[SAVE_AT:]:
        loss = loss_fn(model2(inputs), targets)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        opt2.step(loss=mean_loss / world)
        opt2.zero_grad()
    result["resumed"] = snapshot(model2, opt2)
    result["errors"] = layouts_that_straddle_ranks()
    result["auto_lr"] = auto_lr_run(batches, world)
    result["lr_free"] = {"uninterrupted": lr_free_run(batches, world, None),
                         "resumed": lr_free_run(batches, world, out / "lr_free_ckpt")}
    return result


def lr_free_run(batches, world: int, checkpoint_dir: Path | None) -> dict:
    """The lr-free default under FSDP2, through :func:`refadamw.save_sharded` and :func:`refadamw.load_sharded`
    halfway when ``checkpoint_dir`` is given: each rank's sampled x0 and s must come back as its own. The
    batches three times over: d needs some twenty steps to grow far from D0."""
    from torch.distributed.fsdp import fully_shard

    from refadamw import load_sharded, save_sharded

    def built():
        model = build_model()
        for layer in (model[0], model[2], model):
            fully_shard(layer)
        return model, RefAdamWMiniSF(model.parameters(), total_steps=3 * STEPS, warmup_steps=2, lr_free_scale=2.0,
                                     state_dtype="fp32")

    model, opt = built()
    batches = batches * 3
    for step, (inputs, targets) in enumerate(batches):
        if step == len(batches) // 2 and checkpoint_dir is None:
            with opt.averaged():  # saving's switch through x and back, which rounds y once (docs/integrations.md)
                pass
        elif step == len(batches) // 2:
            save_sharded(model, opt, str(checkpoint_dir))
            model, opt = built()
            load_sharded(model, opt, str(checkpoint_dir))
            opt.train()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"y": [full(p) for p in model.parameters()], "d": opt.param_groups[0]["stats"]["lr_free_d"].clone(),
            "samples": [{k: opt.state[p][k].clone() for k in refadamw.lr_free.STATE_KEYS} for p in model.parameters()]}


def auto_lr_run(batches, world: int) -> list[torch.Tensor]:
    """AdamWMiniSF (no controller) with auto-lr, which scales each step by the gradient's own norm."""
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, auto_lr=True, state_dtype="fp32")
    for inputs, targets in batches[:AUTO_LR_STEPS]:
        loss_fn(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()
    return [full(p) for p in model.parameters()]


def auto_lr_single_process() -> list[torch.Tensor]:
    model = build_model()
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, auto_lr=True, state_dtype="fp32")
    for inputs, targets in global_batches()[:AUTO_LR_STEPS]:
        loss_fn(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def layouts_that_straddle_ranks() -> dict[str, str]:
    """The errors for block layouts that would cut a block across ranks (raised on the first step)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    errors = {}
    odd_rows = torch.nn.Linear(64, 98)  # 49 rows per rank: blocks of 2 rows would straddle
    fully_shard(odd_rows)
    by_columns = torch.nn.Linear(64, 98)
    fully_shard(by_columns, shard_placement_fn=lambda param: Shard(1) if param.dim() == 2 else Shard(0))
    for name, module, options in (("block_rows", odd_rows, {"block_rows": 2}), ("shard_dim1", by_columns, {})):
        opt = RefAdamWMiniSF([{"params": module.parameters(), **options}], lr=1e-2)
        module(torch.randn(2, 64)).sum().backward()
        try:
            opt.step()
        except ValueError as error:
            errors[name] = str(error)
    plain = RefAdamWMiniSF(by_columns.parameters(), lr=1e-2, mini=False)  # per-element v works for any sharding
    plain.step()
    errors["mini_false_steps"] = int(plain.stats()["steps"])
    # dim-1 blocks (a Conv1D-style (in, out) weight) would span the shards of dim 0: refused
    columns = torch.nn.Linear(64, 98)
    fully_shard(columns)
    opt = RefAdamWMiniSF([{"params": list(columns.parameters()), "block_layouts": ["columns", None]}], lr=1e-2)
    columns(torch.randn(2, 64)).sum().backward()
    try:
        opt.step()
    except ValueError as error:
        errors["columns"] = str(error)
    # one block per index of dims 0 and 1 of a 3-D weight (as for (experts, out, in)) stays shard-local
    bilinear = torch.nn.Bilinear(32, 64, 4)  # weight (4, 32, 64)
    fully_shard(bilinear)
    opt = RefAdamWMiniSF([{"params": [bilinear.weight, bilinear.bias], "block_layouts": [((0, 1), 1), None]}],
                         lr=1e-2)
    bilinear(torch.randn(2, 32), torch.randn(2, 64)).sum().backward()
    opt.step()
    v = opt.state[bilinear.weight]["exp_avg_sq"]
    errors["experts_v"] = (tuple(v.shape), tuple(v.to_local().shape))
    return errors


# ----------------------------------------------------- bf16 state: the world size does not matter

BF16_STEPS = 4


def bf16_run(param_dtype: torch.dtype, sharded: bool) -> dict:
    """AdamWMiniSF with its default bf16 state on the whole global batches, with an eval()/train() round trip
    mid-run; full parameters (y and x) and full state tensors. ``sharded``: under FSDP2 (each rank the same batches).
    """
    from torch.distributed.fsdp import fully_shard

    model = build_model().to(param_dtype)
    if sharded:
        for layer in (model[0], model[2], model):
            fully_shard(layer)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, fused=False)  # the path DTensors take, in both runs
    for step, (inputs, targets) in enumerate(global_batches()[:BF16_STEPS]):
        loss_fn(model(inputs.to(param_dtype)), targets.to(param_dtype)).backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            opt.eval()  # bf16 parameters: the switch rounds y → x and back stochastically
            opt.train()
    out = {"y": [full(p) for p in model.parameters()],
           "state": [{k: full(v) for k, v in opt.state[p].items()} for p in model.parameters()]}
    with opt.averaged():
        out["x"] = [full(p) for p in model.parameters()]
    if sharded:
        from refadamw import sharding

        out["index_offsets"] = [sharding.index_offset(p) for p in model.parameters()]
    return out


def bf16_world4_body(rank, world, out: Path) -> dict:
    os.environ["REFADAMW_COMPILE"] = "0"  # eager rounding, bit-identical to compiled: 4 ranks compiling is slow
    return bf16_body()


def bf16_body() -> dict:
    return {str(dtype): {"one_process": bf16_run(dtype, sharded=False), "fsdp2": bf16_run(dtype, sharded=True)}
            for dtype in (torch.float32, torch.bfloat16)}


# ------------------------------------------- load_sharded: parameters that had no state at the save


def experts_run(out: Path) -> dict:
    """tests/test_checkpoint_sharded.py's cases (unused head, frozen then unfrozen, an expert never routed)
    under FSDP2: uninterrupted, and resumed from the checkpoint in a fresh model and optimizer."""
    from torch.distributed.fsdp import fully_shard

    from tests.test_checkpoint_sharded import SAVE_AT, STEPS, Experts, batches, train

    from refadamw import load_sharded, save_sharded

    def built(after_save):
        model = Experts()
        model.set_phase(after_save)
        for module in (*model.experts, model.trunk, model.frozen, model.late, model.head, model.unused, model):
            fully_shard(module)
        return model, RefAdamWMiniSF(model.parameters(), lr=1e-2, fused=False)  # default bf16 state

    def snapshot_of(model, opt):
        return {"params": [full(p) for p in model.parameters()],
                "state": {n: {k: full(v) for k, v in opt.state[p].items()}
                          for n, p in model.named_parameters() if opt.state.get(p)}}

    path = str(out / "experts")
    data = batches()
    model, opt = built(after_save=False)
    train(model, opt, data, range(SAVE_AT))
    save_sharded(model, opt, path)
    result = {"saved": snapshot_of(model, opt)}
    model.set_phase(after_save=True)
    train(model, opt, data, range(SAVE_AT, STEPS))
    result["uninterrupted"] = snapshot_of(model, opt)

    model2, opt2 = built(after_save=True)
    load_sharded(model2, opt2, path)
    result["loaded"] = snapshot_of(model2, opt2)
    opt2.train()
    train(model2, opt2, data, range(SAVE_AT, STEPS))
    result["resumed"] = snapshot_of(model2, opt2)
    return result


# ------------------------------------------------------------------- FSDP1 is refused, not run wrong


def fsdp1_errors() -> dict[str, str]:
    """What a real FSDP1 model gets: refused when the optimizer is built, and when accelerate-style code puts
    FSDP1's parameters into an optimizer built before wrapping."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    errors = {}
    for orig in (False, True):
        wrapped = FullyShardedDataParallel(build_model(), use_orig_params=orig, device_id=torch.device("cpu"))
        errors[f"shapes_{orig}"] = [tuple(p.shape) for p in wrapped.parameters()]
        try:
            AdamWMiniSF(wrapped.parameters())
        except ValueError as error:
            errors[f"use_orig_params={orig}"] = str(error)
    plain = build_model()
    opt = AdamWMiniSF(plain.parameters())
    wrapped = FullyShardedDataParallel(plain, use_orig_params=False, device_id=torch.device("cpu"))
    opt.param_groups[0]["params"] = list(wrapped.parameters())
    wrapped(torch.randn(2, 64)).sum().backward()
    try:
        opt.step()
    except ValueError as error:
        errors["swapped_in"] = str(error)
    return errors


def ddp_and_fsdp_body(rank, world, out: Path) -> dict:
    """All runs in one process group: spawning and warming up workers is the slow part."""
    return {"ddp": ddp_body(rank, world, out), "fsdp": fsdp_body(rank, world, out), "bf16": bf16_body(),
            "experts": experts_run(out), "fsdp1": fsdp1_errors()}


def launch(body, tmp_path: Path, world: int = WORLD) -> list[dict]:
    """Run ``body`` on ``world`` ranks; kill them after TIMEOUT_S. Returns each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(world, port, str(tmp_path), body), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed run did not finish within {TIMEOUT_S} s")
    except ProcessException as error:
        errors = sorted(tmp_path.glob("rank*.error"))
        pytest.fail("\n".join(e.read_text() for e in errors) or f"a worker failed: {error}")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_close_lists(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def reference():
    return single_process()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def ranks(run_dir):
    return launch(ddp_and_fsdp_body, run_dir)


def test_ddp_matches_single_process(ranks, run_dir, reference):
    ranks = [r["ddp"] for r in ranks]
    for key in ("y", "x"):  # DDP all-reduces the gradients: the replicas are bit-identical
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)
        assert_close_lists(ranks[0][key], reference[key], **TOL)
    for key in ("loss_ema", "lam", "flagged_steps"):
        torch.testing.assert_close(ranks[0]["controller"][key], reference["controller"][key], **TOL)
    # The gradient-norm signal is recorded at backward, before DDP averages the gradients, and is the
    # ranks' RMS local norm (docs/controller.md): not the single process's norm, but the same on every rank.
    for key, value in ranks[0]["controller"].items():
        assert torch.equal(value, ranks[1]["controller"][key]), key
    saved = torch.load(run_dir / "ddp_model.pt")  # the recipe's save_averaged: x, not y
    assert_close_lists(list(saved.values()), reference["x"], **TOL)
    assert not torch.allclose(reference["x"][0], reference["y"][0])


@pytest.fixture(scope="module")
def fsdp_ranks(ranks):
    return [r["fsdp"] for r in ranks]


def test_fsdp2_state_is_sharded_and_blocks_are_shard_local(fsdp_ranks):
    for rank, result in enumerate(fsdp_ranks):
        layout = result["layout"]
        assert layout["param_is_dtensor"] and layout["z_minus_y_is_dtensor"]
        assert layout["v_sharded_dim0"] == [True]
        assert layout["v_local_rows"] == layout["param_local_rows"] == (50, 49)[rank]  # one block per local row


def test_fsdp2_matches_single_process(fsdp_ranks, reference):
    for result in fsdp_ranks:
        for key in ("y", "x"):
            assert_close_lists(result[key], reference[key], **TOL)
        # The controller saw the whole-tensor gradient norms, not the shards'.
        for key in ("gnorm_ema", "gnorm_var", "loss_ema", "lam"):
            torch.testing.assert_close(result["controller"][key], reference["controller"][key], **TOL)


def test_fsdp2_checkpoint_resume_matches_uninterrupted(fsdp_ranks):
    for result in fsdp_ranks:
        for key in ("y", "x"):  # bit-identical: saving switched the live run through x and back as well
            for a, b in zip(result["resumed"][key], result[key]):
                assert torch.equal(a, b)
        for key in ("gnorm_ema", "loss_ema", "t"):
            torch.testing.assert_close(result["resumed"]["controller"][key], result["controller"][key])


def test_fsdp2_lr_free_resume_matches_uninterrupted(fsdp_ranks):
    """The lr-free default's sampled x0 and s are each rank's own: a sharded checkpoint keeps every rank's
    (saved plain, they were written once, from one rank, and loaded into all, and d jumped 600×)."""
    ds = []
    for result in fsdp_ranks:
        runs = result["lr_free"]
        ds.append(runs["uninterrupted"]["d"])
        assert float(ds[-1]) > 10 * refadamw.lr_free.D0  # the estimate moved
        assert torch.equal(runs["resumed"]["d"], ds[-1])
        for a, b in zip(runs["resumed"]["y"], runs["uninterrupted"]["y"]):
            assert torch.equal(a, b)
        for a, b in zip(runs["resumed"]["samples"], runs["uninterrupted"]["samples"]):
            for key in a:
                assert torch.equal(a[key], b[key]), key
    assert torch.equal(ds[0], ds[1])  # the sums are all-reduced: one estimate for all ranks
    first, second = (r["lr_free"]["uninterrupted"]["samples"][0]["lr_free_anchor"] for r in fsdp_ranks)
    assert not torch.equal(first, second)  # each rank samples its own shard


def test_fsdp2_rejects_layouts_that_straddle_ranks(fsdp_ranks):
    for result in fsdp_ranks:
        errors = result["errors"]
        assert "straddle ranks" in errors["block_rows"] and "block_rows dividing 49" in errors["block_rows"]
        assert "mini=False" in errors["shard_dim1"] and "dim 0" in errors["shard_dim1"]
        assert errors["mini_false_steps"] == 1
        assert "FSDP2 shards" in errors["columns"] and "'rows'" in errors["columns"]
        assert errors["experts_v"] == ((4, 32), (2, 32))


def test_fsdp2_auto_lr_sees_whole_tensor_norms(fsdp_ranks):
    # Without a controller the optimizer still needs each gradient's whole-tensor norm (auto-lr, hygiene).
    expected = auto_lr_single_process()
    for result in fsdp_ranks:
        assert_close_lists(result["auto_lr"], expected, **TOL)


def _assert_equal_tensors(actual, expected, where=""):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_equal_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_equal_tensors(a, e, f"{where}[{i}]")
    else:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where


@pytest.mark.parametrize("param_dtype", ["torch.float32", "torch.bfloat16"])
def test_fsdp2_bf16_state_is_bit_identical_to_one_process(ranks, param_dtype):
    # World size 2 against world size 1 (one process, unsharded): the default bf16 state, and with bf16
    # parameters the parameters and the eval()/train() switch, are stochastically rounded with the noise of
    # each element's global index. tests/test_sharding.py holds world sizes 1-4 on simulated shards.
    for rank, result in enumerate(ranks):
        runs = result["bf16"][param_dtype]
        one, fsdp2 = runs["one_process"], runs["fsdp2"]
        assert one["state"][0]["z_minus_y"].dtype == torch.bfloat16
        _assert_equal_tensors(fsdp2["y"], one["y"], f"rank {rank} y")
        _assert_equal_tensors(fsdp2["x"], one["x"], f"rank {rank} x")
        # The gradient-norm EMA is the one quantity that is not bit-identical: a whole-tensor norm is an
        # all-reduced sum of the shards' squares, summed in another order than one process sums them.
        for sharded, whole in zip(fsdp2["state"], one["state"]):
            torch.testing.assert_close(sharded.pop("grad_norm_ema"), whole.pop("grad_norm_ema"), rtol=1e-6, atol=0)
        _assert_equal_tensors(fsdp2["state"], one["state"], f"rank {rank} state")
        # The ranks draw different noise: rank 1's shards start past rank 0's (99 rows -> 50 + 49).
        assert fsdp2["index_offsets"] == ([0, 0, 0, 0] if rank == 0 else [50 * 64, 50, 4 * 99, 4])


def test_fsdp2_load_sharded_restores_exactly_what_was_saved(ranks):
    for result in ranks:
        experts = result["experts"]
        saved, loaded = experts["saved"]["state"], experts["loaded"]["state"]
        assert not any(n.startswith(("unused.", "frozen.", "experts.2.")) for n in saved)
        assert "late.weight" in saved and "experts.1.weight" in saved
        _assert_equal_tensors(loaded, saved, "loaded state")  # stateless ones stay stateless, the rest bit-exact
        _assert_equal_tensors(experts["resumed"], experts["uninterrupted"], "resumed")
        assert "frozen.weight" in experts["resumed"]["state"]


def test_fsdp1_is_refused(ranks):
    for result in ranks:
        errors = result["fsdp1"]
        assert [len(shape) for shape in errors["shapes_False"]] == [1]  # one FlatParameter, 1-D
        assert [len(shape) for shape in errors["shapes_True"]] == [1, 1, 1, 1]  # original params, flattened views
        for case in ("use_orig_params=False", "use_orig_params=True", "swapped_in"):
            assert "FSDP1 (FullyShardedDataParallel)" in errors[case], case
            assert "FSDP2 (torch.distributed.fsdp.fully_shard" in errors[case], case


def test_fsdp2_bf16_state_at_world_size_4_is_bit_identical_to_one_process(tmp_path):
    # 99 rows shard 25 + 25 + 25 + 24 here (50 + 49 at world size 2).
    for rank, result in enumerate(launch(bf16_world4_body, tmp_path, world=4)):
        for runs in result.values():
            one, fsdp2 = runs["one_process"], runs["fsdp2"]
            _assert_equal_tensors(fsdp2["y"], one["y"], f"rank {rank} y")
            _assert_equal_tensors(fsdp2["x"], one["x"], f"rank {rank} x")
            for sharded, whole in zip(fsdp2["state"], one["state"]):
                torch.testing.assert_close(sharded.pop("grad_norm_ema"), whole.pop("grad_norm_ema"), rtol=1e-6, atol=0)
            _assert_equal_tensors(fsdp2["state"], one["state"], f"rank {rank} state")
            assert fsdp2["index_offsets"] == [25 * rank * 64, 25 * rank, 2 * rank * 99, 2 * rank]
