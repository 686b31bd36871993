"""Low-precision state and parameters through the optimizer (SPEC.md §3 item 7)."""

from __future__ import annotations

import ast
import io

import pytest
import torch

from refadamw import AdamWMiniSF
from refadamw.bench.measure import linear_stack, low_precision_drift, state_bytes_per_param

DTYPE_NAMES = ["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]
SETTINGS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def _train(model, opt, steps, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen).to(dtype)
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_dtype_strings_from_literal_eval(name):
    """kohya passes ``state_dtype='bf16'`` through ast.literal_eval: a plain string."""
    value = ast.literal_eval(repr(name))
    model = _mlp()
    opt = AdamWMiniSF(model.parameters(), state_dtype=value)
    _train(model, opt, 1)
    offset = opt.state[model[0].weight]["z_minus_y"]
    assert offset.dtype == SETTINGS[{"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)]


@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("schedule_free", [True, False])
def test_state_dtypes_per_setting(setting, schedule_free):
    model = _mlp()
    opt = AdamWMiniSF(model.parameters(), state_dtype=SETTINGS[setting], schedule_free=schedule_free)
    _train(model, opt, 2)
    for state in opt.state.values():
        buffer = state["z_minus_y" if schedule_free else "exp_avg"]
        assert buffer.dtype == SETTINGS[setting]
        # v is never stored in fp16 (g² underflows its range), and block v is fp32: one value per row
        per_element = state["exp_avg_sq"].shape == buffer.shape and buffer.dim() < 2
        assert state["exp_avg_sq"].dtype == (SETTINGS[setting] if per_element and setting != "fp16" else torch.float32)


@pytest.mark.parametrize("setting, most", [("fp32", 4.1), ("bf16", 2.1), ("fp16", 2.1)])
def test_state_bytes_per_param_on_2d_layers(setting, most):
    model = linear_stack(2, 256)
    opt = AdamWMiniSF(model.parameters(), lr=1e-3, state_dtype=setting)  # lr-free adds 0.08: test_lr_free.py
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes_per_param(opt) <= most


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.bfloat16, "auto"), (torch.float32, "bf16"),
                                                      (torch.float16, "fp16")])
def test_small_updates_accumulate_through_the_optimizer(foreach, param_dtype, state_dtype):
    """A step of 1e-4 is about 1/80 of a bf16 ulp at 1.0; 200 of them must still add up to 0.02."""
    weight = torch.nn.Parameter(torch.ones(64, 64, dtype=param_dtype))
    opt = AdamWMiniSF([weight], lr=1e-4, warmup_steps=0, state_dtype=state_dtype, foreach=foreach, mini=False,
                      schedule_free=False)
    for _ in range(200):
        weight.grad = torch.ones_like(weight)  # Adam's normalised step is exactly lr for a constant gradient
        opt.step()
    moved = 1.0 - weight.double().mean().item()
    assert abs(moved - 200 * 1e-4) < 1.5e-3


@pytest.mark.parametrize("foreach", [True, False])
def test_z_accumulates_small_steps_through_its_bf16_offset(foreach):
    weight = torch.nn.Parameter(torch.ones(64, 64))
    opt = AdamWMiniSF([weight], lr=1e-4, warmup_steps=0, state_dtype="bf16", foreach=foreach, mini=False)
    for _ in range(200):
        weight.grad = torch.ones_like(weight)
        opt.step()
    offset = opt.state[weight]["z_minus_y"]
    assert offset.dtype == torch.bfloat16
    z = weight.double() + offset.double()
    assert abs((1.0 - z.mean().item()) - 200 * 1e-4) < 1.5e-3


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("state_dtype", ["auto", "fp16", "bf16"])
@pytest.mark.parametrize("magnitude", [1e-4, 1e-5, 1e-6, 1e-7])
def test_tiny_fp16_gradients_stay_finite(foreach, state_dtype, magnitude):
    model = _mlp(torch.float16)
    opt = AdamWMiniSF(model.parameters(), state_dtype=state_dtype, foreach=foreach, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * magnitude).to(torch.float16)
            if step == 2:
                p.grad.zero_()
        opt.step()
    opt.eval()
    for p in model.parameters():
        assert torch.isfinite(p).all()
        for t in opt.state[p].values():
            assert torch.isfinite(t.float()).all()


def _snapshot(opt, model):
    return [p.detach().clone() for p in model.parameters()], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}


def _assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    for key in state_a:
        for name in state_a[key]:
            assert state_a[key][name].dtype == state_b[key][name].dtype
            assert torch.equal(state_a[key][name], state_b[key][name]), name


@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, "bf16"), (torch.bfloat16, "bf16"),
                                                      (torch.float16, "fp16")])
def test_resume_continues_bit_identically(param_dtype, state_dtype):
    model = _mlp(param_dtype)
    opt = AdamWMiniSF(model.parameters(), state_dtype=state_dtype, seed=7)
    _train(model, opt, 5, dtype=param_dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 5, seed=2, dtype=param_dtype)
    uninterrupted = _snapshot(opt, model)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _mlp(param_dtype, seed=3)
    resumed_model.load_state_dict(saved["model"])
    resumed = AdamWMiniSF(resumed_model.parameters(), state_dtype=state_dtype, seed=7)
    resumed.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert resumed.state[q]["z_minus_y"].dtype == opt.state[p]["z_minus_y"].dtype  # no cast to the parameter dtype
    _train(resumed_model, resumed, 5, seed=2, dtype=param_dtype)
    _assert_same(uninterrupted, _snapshot(resumed, resumed_model))


def test_the_seed_changes_the_rounding_noise():
    runs = []
    for seed in (0, 1):
        model = _mlp(torch.bfloat16)
        # a fixed lr: the lr-free first steps (~1e-6) are too small to reach a bf16 weight's rounding
        opt = AdamWMiniSF(model.parameters(), lr=1e-3, state_dtype="bf16", seed=seed)
        _train(model, opt, 3, dtype=torch.bfloat16)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(*runs)


def test_first_step_computes_state_directly_without_zero_fill(monkeypatch):
    """Lazy state is computed from the first gradient: no full-size zero fill."""
    model = linear_stack(2, 128)
    frozen = torch.nn.Parameter(torch.randn(64, 64))
    # a fixed lr: the lr-free mode zero-fills its own 1/97-sized sample buffers
    opt = AdamWMiniSF([*model.parameters(), frozen], lr=1e-3, state_dtype="bf16", schedule_free=False)
    filled = []
    real_zeros, real_zeros_like, real_full = torch.zeros, torch.zeros_like, torch.full

    def record(real):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            filled.append(out.numel())
            return out
        return wrapper

    monkeypatch.setattr(torch, "zeros", record(real_zeros))
    monkeypatch.setattr(torch, "zeros_like", record(real_zeros_like))
    monkeypatch.setattr(torch, "full", record(real_full))
    monkeypatch.setattr(torch.Tensor, "zero_", lambda self: filled.append(self.numel()) or self)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    monkeypatch.undo()
    assert max(filled, default=0) <= 1  # only 0-d counters are zero-initialised
    assert frozen not in opt.state
    weight = model[0].weight
    m = opt.state[weight]["exp_avg"].float()
    beta1 = opt.param_groups[0]["betas"][0]
    torch.testing.assert_close(m, (1 - beta1) * weight.grad, rtol=2**-7, atol=0)  # m = (1−β1)·g, not from garbage


@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
def test_low_precision_state_follows_fp32_state_at_a_fine_tuning_lr(state_dtype):
    """At lr 1e-5 a step moves a weight of size 0.05 by far less than its bf16 spacing. The state
    stores z − y, so its rounding error scales with the steps, not with the weights: storing z itself
    in bf16 re-rounded the fp32 weights on every step, and the weights then differed from an fp32-state
    run by 3.5 times as much as they had moved."""
    drift = low_precision_drift(state_dtype, steps=50)
    assert drift["y"] < 0.05 and drift["x"] < 0.05


@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
def test_a_zero_gradient_leaves_fp32_weights_exactly_unchanged(state_dtype):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = AdamWMiniSF(model.parameters(), state_dtype=state_dtype, weight_decay=0.0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("state_dtype", ["bf16", "fp16"])
def test_non_finite_gradient_leaves_low_precision_state_untouched(state_dtype):
    model = _mlp()
    opt = AdamWMiniSF(model.parameters(), state_dtype=state_dtype)
    _train(model, opt, 3)
    before = _snapshot(opt, model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    _assert_same(before, _snapshot(opt, model))
    assert opt.stats()["skipped_steps"].item() == 1


def test_grad_scaler_skip_leaves_low_precision_state_untouched():
    model = _mlp()
    opt = AdamWMiniSF(model.parameters(), state_dtype="bf16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 16)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if step == 2:
            model[2].weight.grad[0, 0] = float("inf")
            before = _snapshot(opt, model)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            _assert_same(before, _snapshot(opt, model))
    assert opt.stats()["steps"].item() == 3 and scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("state_dtype", ["auto", "bf16"])
def test_trains_under_cpu_autocast(state_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    target = x[:, :1] * 2 - x[:, 1:2]
    losses = []
    for _ in range(100):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.1 * losses[0]
