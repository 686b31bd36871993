"""Public behaviour of AdamWMiniSF: modes, state_dict, input forms (errors: tests/test_errors.py)."""

from __future__ import annotations

import io

import pytest
import torch

from refadamw import AdamWMiniSF


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4)).to(device, dtype)


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen).to(device, dtype)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- basics

@pytest.mark.parametrize("schedule_free", [True, False])
def test_zero_lr_changes_nothing(device, schedule_free):
    model = _model(device)
    before = _snapshot(model)
    # fp32 state: z starts as a bf16-rounded copy otherwise, and x = (y − (1−β1)·z)/β1 would show it
    opt = AdamWMiniSF(model.parameters(), lr=0.0, weight_decay=0.1, warmup_steps=3, schedule_free=schedule_free,
                      state_dtype="fp32")
    _train(model, opt, 5)
    opt.eval()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_eval_then_train_restores_the_weights(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2)
    _train(model, opt, 5)
    y = _snapshot(model)
    opt.eval()
    assert any(not torch.allclose(a, b) for a, b in zip(y, model.parameters()))  # x differs from y
    opt.eval()  # idempotent
    opt.train()
    opt.train()
    for a, b in zip(y, model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_new_optimizer_is_in_train_mode_and_eval_before_any_step_is_harmless(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters())
    assert all(g["train_mode"] for g in opt.param_groups)
    before = _snapshot(model)
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.train()
    _train(model, opt, 1)


def test_step_in_eval_mode_raises(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters())
    _train(model, opt, 1)
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode.*optimizer.train"):
        _train(model, opt, 1)


def test_train_and_eval_are_no_ops_without_schedule_free(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters(), schedule_free=False)
    _train(model, opt, 2)
    before = _snapshot(model)
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _train(model, opt, 1)  # still allowed


def test_closure_loss_is_returned(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters())
    x = torch.randn(8, 16, device=device)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0


def test_named_parameters_and_groups_are_accepted(device):
    model = _model(device)
    opt = AdamWMiniSF(model.named_parameters(), lr=1e-3)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    _train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"][0] == "0.weight"

    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = AdamWMiniSF([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "lr": 1e-2}], lr=1e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[1]["weight_decay"] == 0.01 and opt.param_groups[1]["lr"] == 1e-2  # the default
    _train(model, opt, 2)


def test_low_precision_parameters_are_updated_with_fp32_state(device):
    model = _model(device, torch.bfloat16)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, state_dtype="fp32")
    before = _snapshot(model)
    _train(model, opt, 3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["z_minus_y"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stats_are_mirrored_into_param_groups(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, warmup_steps=10)
    _train(model, opt, 4)
    stats = opt.stats()
    assert set(stats) == {"steps", "skipped_steps", "lr", "effective_lr"}
    assert stats["steps"].item() == 4 and stats["skipped_steps"].item() == 0
    assert stats["lr"].item() == pytest.approx(4e-3)
    assert 0 < stats["effective_lr"].item() <= 4e-3 + 1e-9
    assert opt.param_groups[0]["stats"]["steps"].item() == 4


# ------------------------------------------------------------------ state_dict

@pytest.mark.parametrize("schedule_free", [True, False])
def test_state_dict_round_trip_continues_the_same_trajectory(device, schedule_free):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2, warmup_steps=2, weight_decay=0.01, schedule_free=schedule_free)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=7)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(device)
    resumed.load_state_dict(saved["model"])
    opt2 = AdamWMiniSF(resumed.parameters(), lr=1.0)  # hyperparameters come from the state_dict
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(resumed, opt2, 3, seed=7)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.stats()["steps"], opt2.stats()["steps"])


def test_mode_is_saved_in_the_state_dict(device):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters())
    _train(model, opt, 2)
    opt.eval()
    opt2 = AdamWMiniSF(model.parameters())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):
        _train(model, opt2, 1)


def test_state_keeps_its_dtype_when_loaded(device):
    model = _model(device, torch.bfloat16)
    opt = AdamWMiniSF(model.parameters(), state_dtype="fp32")
    _train(model, opt, 2)
    opt2 = AdamWMiniSF(model.parameters(), state_dtype="fp32")
    opt2.load_state_dict(opt.state_dict())
    assert all(s["z_minus_y"].dtype == torch.float32 for s in opt2.state.values())


# ------------------------------------------------------------------ inputs

def test_betas_zero_is_fine_without_schedule_free():
    AdamWMiniSF(_model().parameters(), betas=(0.0, 0.999), schedule_free=False)


def test_changing_the_block_layout_after_the_first_step_is_an_error():
    model = _model()
    opt = AdamWMiniSF(model.parameters())
    _train(model, opt, 1)
    opt.param_groups[0]["mini"] = False
    with pytest.raises(ValueError, match="cannot change after the first step"):
        _train(model, opt, 1)


@pytest.mark.parametrize("foreach", [True, False])
def test_gradients_are_left_untouched(device, foreach):
    model = _model(device)
    opt = AdamWMiniSF(model.parameters(), foreach=foreach)
    model(torch.randn(4, 16, device=device)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    model[0].weight.grad[0, 0] = 1.0
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_an_empty_param_group_is_allowed(device):
    model = _model(device)
    opt = AdamWMiniSF([{"params": model.parameters()}, {"params": [], "weight_decay": 0.0}])
    _train(model, opt, 2)
    opt.eval()
    opt.train()
    opt.load_state_dict(opt.state_dict())
    assert opt.stats()["steps"].item() == 2


@pytest.mark.parametrize("cls_name", ["AdamWMiniSF", "RefAdamWMiniSF"])
def test_step_hooks_run_once_per_step(cls_name):
    import refadamw

    AdamWMiniSF([torch.nn.Parameter(torch.randn(2))])  # hooks the base class's step() too
    model = _model()
    opt = getattr(refadamw, cls_name)(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    _train(model, opt, 2)
    assert calls == ["pre", "post", "pre", "post"]


def test_grad_scaler_skips_inf_steps_and_unscales(device):
    model, plain_model = _model(device), _model(device)
    opt = AdamWMiniSF(model.parameters(), lr=1e-2)
    plain = AdamWMiniSF(plain_model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(8, 16, device=device)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step != 1:  # the same run without a scaler, and without the step the scaler skipped
            plain.zero_grad()
            plain_model(x).pow(2).mean().backward()
            plain.step()
    assert opt.stats()["steps"].item() == 2 and opt.stats()["skipped_steps"].item() == 0
    assert scaler.get_scale() == 2.0**9
    # scaling by a power of two and unscaling is exact, so the trajectories agree exactly
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
