"""The seed front doors: names, signatures, argument mapping and the product defaults."""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch

import adamwmini_schedulefree
import refadamwmini_schedulefree
from refadamw import AdamWMiniSF, RefAdamWMiniSF
from refadamw.compat import (AdamWminiScheduleFree, LegacyAdamWminiScheduleFree, LegacyRefAdamWminiScheduleFree,
                             RefAdamWminiScheduleFree, legacy)

# The original signatures (SPEC.md §2), in order.
SEED_REF_ARGS = ["params", "lr", "betas", "eps", "weight_decay", "min_lr", "max_lr", "schedulefree_alpha", "dtype",
                 "ref_alpha", "ref_window", "ref_base_eps", "ref_min_eps", "ref_max_steps"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    monkeypatch.setattr(legacy, "_noted", set())


def test_top_level_modules_export_the_front_doors():
    assert refadamwmini_schedulefree.RefAdamWminiScheduleFree is RefAdamWminiScheduleFree
    assert adamwmini_schedulefree.AdamWminiScheduleFree is AdamWminiScheduleFree
    assert "ScheduleFree" in RefAdamWminiScheduleFree.__name__


def test_legacy_signatures_are_the_originals():
    ref = list(inspect.signature(LegacyRefAdamWminiScheduleFree).parameters)
    assert ref == SEED_REF_ARGS
    assert list(inspect.signature(LegacyAdamWminiScheduleFree).parameters) == SEED_REF_ARGS[:9]
    step = list(inspect.signature(RefAdamWminiScheduleFree.step).parameters)
    assert step == ["self", "closure", "loss", "max_steps", "val_loss"]


@pytest.mark.parametrize("door, product", [(RefAdamWminiScheduleFree, RefAdamWMiniSF),
                                           (AdamWminiScheduleFree, AdamWMiniSF)])
def test_without_arguments_the_product_defaults_hold(door, product):
    params = list(_model().parameters())
    opt = door(params)
    assert isinstance(opt, product)
    assert opt.defaults == product(params).defaults  # not the seed's lr=1e-3, weight_decay=0.01, ...


def test_explicit_seed_arguments_map_onto_the_product():
    params = list(_model().parameters())
    opt = RefAdamWminiScheduleFree(params, 3e-3, (0.8, 0.99), 1e-7, 0.02, 1e-5, 5e-2, 0.1, "bfloat16", 0.25,
                                   20, 1e-3, 1e-5, 400)
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (3e-3, (0.8, 0.99), 1e-7, 0.02)
    assert (d["min_lr"], d["max_lr"], d["norm_ema_alpha"]) == (1e-5, 5e-2, 0.1)  # the seed's name, renamed
    assert d["state_dtype"] == torch.bfloat16
    assert opt.total_steps == 400 and opt.controller.ref_alpha == 0.25
    assert tuple(opt.controller.ref_window) == (0.2, 0.8)  # the seed's int ref_window is not the product's


def test_dtype_accepts_torch_dtypes_and_strings_and_a_window_pair_passes_through():
    params = list(_model().parameters())
    assert RefAdamWminiScheduleFree(params, dtype=torch.float16).defaults["state_dtype"] == torch.float16
    assert RefAdamWminiScheduleFree(params, dtype="fp32").defaults["state_dtype"] == torch.float32
    opt = RefAdamWminiScheduleFree(params, ref_window=(0.1, 0.9), total_steps=50, auto_lr=True)
    assert tuple(opt.controller.ref_window) == (0.1, 0.9) and opt.total_steps == 50
    assert opt.defaults["auto_lr"] is True


def test_unused_seed_arguments_log_one_note(caplog):
    params = list(_model().parameters())
    with caplog.at_level("WARNING", logger="refadamw"):
        RefAdamWminiScheduleFree(params, ref_window=20, ref_base_eps=1e-3)
        RefAdamWminiScheduleFree(params, ref_min_eps=1e-5)
        RefAdamWminiScheduleFree(params, legacy=True, ref_window=20)
    notes = [r.getMessage() for r in caplog.records if "never used" in r.getMessage()]
    assert len(notes) == 1 and "ref_window" in notes[0]


def test_auto_lr_bounds_without_auto_lr_log_a_note(caplog):
    with caplog.at_level("WARNING", logger="refadamw"):
        RefAdamWminiScheduleFree(list(_model().parameters()), max_lr=1e-2)
    assert any("auto_lr=True" in r.getMessage() for r in caplog.records)


def _train(opt, model, steps=12, signals=None, positional=False):
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.randn(8, 6, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        sig = (signals or (lambda t, loss: {}))(t, loss.detach())
        if positional:
            opt.step(None, sig.get("loss"), sig.get("max_steps"), sig.get("val_loss"))
        else:
            opt.step(**sig)
    return [p.detach().clone() for p in model.parameters()]


def test_front_door_steps_exactly_like_the_product_positionally():
    def signals(t, loss):
        return {"loss": loss, "max_steps": 12, "val_loss": float(10 - t)}

    m1, m2 = _model(), _model()
    a = _train(RefAdamWminiScheduleFree(m1.parameters(), lr=1e-2), m1, signals=signals, positional=True)
    b = _train(RefAdamWMiniSF(m2.parameters(), lr=1e-2), m2, signals=signals)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_adamw_front_door_ignores_controller_signals():
    m1, m2 = _model(), _model()
    a = _train(AdamWminiScheduleFree(m1.parameters()), m1, signals=lambda t, loss: {"loss": loss, "val_loss": 1.0})
    b = _train(AdamWMiniSF(m2.parameters()), m2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("door, legacy_cls", [(RefAdamWminiScheduleFree, LegacyRefAdamWminiScheduleFree),
                                              (AdamWminiScheduleFree, LegacyAdamWminiScheduleFree)])
def test_legacy_true_builds_the_legacy_optimizer(door, legacy_cls):
    model = _model()
    opt = door(model.parameters(), 1e-3, legacy=True, weight_decay=0.0)
    assert type(opt) is legacy_cls and opt.defaults["weight_decay"] == 0.0 and opt.defaults["lr"] == 1e-3
    m2 = _model()
    a = _train(opt, model)
    b = _train(legacy_cls(m2.parameters(), weight_decay=0.0), m2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_dict_moves_between_front_door_and_product():
    m1, m2 = _model(), _model()
    opt = RefAdamWminiScheduleFree(m1.parameters(), ref_max_steps=30)
    _train(opt, m1, steps=3, signals=lambda t, loss: {"loss": loss})
    m2.load_state_dict(m1.state_dict())
    product = RefAdamWMiniSF(m2.parameters())
    product.load_state_dict(opt.state_dict())
    a = _train(opt, m1, steps=4, signals=lambda t, loss: {"loss": loss})
    b = _train(product, m2, steps=4, signals=lambda t, loss: {"loss": loss})
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_front_door_deep_copies():
    opt = RefAdamWminiScheduleFree(_model().parameters())
    clone = copy.deepcopy(opt)
    assert type(clone) is RefAdamWminiScheduleFree and clone.defaults["lr"] == opt.defaults["lr"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(legacy="yes"), TypeError, "legacy"),
    (dict(legacy=True, state_dtype="bf16"), TypeError, "original arguments"),
    (dict(legacy=True, total_steps=10), TypeError, "original arguments"),
    (dict(dtype="bf16", state_dtype="fp32"), ValueError, "disagree"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(dtype=torch.float64), ValueError, "dtype"),
    (dict(ref_window="wide"), TypeError, "ref_window"),
    (dict(ref_window=(0.9, 0.1)), ValueError, "ref_window"),
    (dict(ref_base_eps="x"), TypeError, "ref_base_eps"),
    (dict(ref_max_steps=-5), ValueError, "total_steps"),
    (dict(ref_max_steps=10, total_steps=20), ValueError, "disagree"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(not_an_argument=1), TypeError, "not_an_argument"),
])
def test_bad_front_door_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RefAdamWminiScheduleFree(_model().parameters(), **kwargs)


def test_adamw_front_door_has_no_ref_arguments():
    with pytest.raises(TypeError, match="ref_window"):
        AdamWminiScheduleFree(_model().parameters(), ref_window=20)
    with pytest.raises(TypeError, match="original arguments"):
        AdamWminiScheduleFree(_model().parameters(), ref_alpha=0.5, legacy=True)


def test_bad_positional_use():
    params = list(_model().parameters())
    with pytest.raises(TypeError, match="positional"):
        RefAdamWminiScheduleFree(params, *range(14))
    with pytest.raises(TypeError, match="both by position and by keyword"):
        RefAdamWminiScheduleFree(params, 1e-3, lr=1e-3)
    with pytest.raises(TypeError, match="needs params"):
        RefAdamWminiScheduleFree(legacy=True)


def test_front_door_step_never_syncs():
    from .test_no_host_sync import host_syncs_forbidden

    model = _model()
    opt = RefAdamWminiScheduleFree(model.parameters(), ref_max_steps=10, dtype="fp32")
    for t in range(4):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        # Steps 1-2 compile the fused update (tracing may read values); legacy=True does sync (the seed's
        # .item() per tensor), the product must not.
        with host_syncs_forbidden() if t >= 2 else contextlib.nullcontext():
            opt.step(None, loss.detach(), 10, loss.detach())
