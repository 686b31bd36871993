"""RefAdamWMiniSF: the public surface of SPEC.md §3b, with the controller not yet built."""

import logging

import pytest
import torch

from refadamw import AdamWMiniSF, RefAdamWMiniSF


def _pair():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 128)
    b = torch.nn.Linear(64, 128)
    b.load_state_dict(a.state_dict())
    return a, b


def test_says_once_that_the_controller_is_not_implemented(caplog):
    with caplog.at_level(logging.WARNING, logger="refadamw"):
        RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters())
    assert "not implemented" in caplog.text


def test_runs_exactly_like_adamw_mini_sf_and_accepts_loss_signals():
    a, b = _pair()
    ref = RefAdamWMiniSF(a.parameters(), lr=1e-2, ref_alpha=0.1, total_steps=10, ref_window=(0.1, 0.9))
    plain = AdamWMiniSF(b.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    for step in range(5):
        for model, opt in ((a, ref), (b, plain)):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            if opt is ref:
                opt.step(loss=loss.detach(), max_steps=10, val_loss=float(step))
                opt.observe(loss=0.5, val_loss=torch.tensor(0.4))
            else:
                opt.step()
    assert torch.equal(a.weight, b.weight)
    assert ref.total_steps == 10


def test_ref_max_steps_is_an_alias_of_total_steps():
    assert RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters(), ref_max_steps=100).total_steps == 100
    with pytest.raises(ValueError, match="disagree"):
        RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters(), total_steps=10, ref_max_steps=100)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ref_alpha=-0.1), ValueError, "ref_alpha"),
        (dict(ref_alpha=1.5), ValueError, "ref_alpha"),
        (dict(ref_window=(0.8, 0.2)), ValueError, "ref_window"),
        (dict(ref_window=(0.2, 1.2)), ValueError, r"ref_window\[1\]"),
        (dict(ref_window=0.5), TypeError, "ref_window"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(total_steps=10.5), ValueError, "total_steps"),
        (dict(repair="yes"), TypeError, "repair"),
        (dict(lr=-1.0), ValueError, "lr"),
    ],
)
def test_bad_controller_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss="1.0"), TypeError, "loss"),
        (dict(loss=torch.ones(2)), ValueError, "loss"),
        (dict(val_loss=[1.0]), TypeError, "val_loss"),
        (dict(max_steps=0), ValueError, "max_steps"),
    ],
)
def test_bad_signals(kwargs, error, match):
    opt = RefAdamWMiniSF(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(error, match=match):
        opt.step(**kwargs)
    if "max_steps" not in kwargs:
        with pytest.raises(error, match=match):
            opt.observe(**kwargs)
