"""Cross-checks against the real peer packages, in the special cases where the maths coincide.

* ``schedulefree.AdamWScheduleFree`` is our update with ``mini=False`` (per-element ``v``),
  ``auto_lr=False`` and fp32 state: the same three sequences, the same warmup and the same
  ``c_t = lr_max²/Σ lr_max²`` weights. The tensors are above the mini threshold, so a
  regression in how ``mini=False`` is honoured would show.
* ``adam_mini.Adam_mini`` is our update with ``schedule_free=False`` (momentum, bias-corrected)
  and mini on: one ``v`` per output row for the 2-D weights it files under "mlp", and a
  per-element ``v`` for biases, which is also what our shape rule gives them.

Both peers are independent implementations, so a shared misreading of SPEC.md would not hide here.
The tolerance (5e-5 relative to the displacement) is far below the effect of any term of the
update: dropping the bias correction, the weight decay or the averaging moves the result by >1%.
"""

from __future__ import annotations

import pytest
import torch

from refadamw import AdamWMiniSF
from refadamw.partition import SMALL_NUMEL

schedulefree = pytest.importorskip("schedulefree")
adam_mini = pytest.importorskip("adam_mini")

STEPS = 12
SHAPES = {"mlp.0.weight": (96, 64), "mlp.0.bias": (96,), "mlp.2.weight": (48, 96), "mlp.2.bias": (48,)}


def _named_params(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=gen))) for name, shape in SHAPES.items()]


def _train(named, make, steps=STEPS, seed=1):
    """Feed the same gradient sequence (fresh tensors: schedulefree divides ``p.grad`` in place)."""
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params]
    opt = make(named)
    if callable(getattr(opt, "train", None)):
        opt.train()
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (5.0 if step == 6 else 1.0)
        opt.step()
    return opt, start


def _assert_same_displacement(ours, peer, start, what):
    for (name, a), (_, b), y0 in zip(ours, peer, start):
        moved = (b.detach() - y0).abs().max()
        assert moved > 1e-3, f"{what}: {name} barely moved, the comparison would be vacuous"
        torch.testing.assert_close(a.detach() - y0, b.detach() - y0, rtol=0, atol=5e-5 * moved.item(),
                                   msg=lambda m: f"{what}, {name}: {m}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("averaging_power", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("foreach,fused", [(False, False), (True, False), (True, True)],
                         ids=["single", "foreach", "fused"])
def test_matches_schedulefree_adamw_without_mini(weight_decay, averaging_power, foreach, fused):
    assert all(torch.Size(s).numel() >= SMALL_NUMEL for s in SHAPES.values() if len(s) == 2)
    kw = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, warmup_steps=4)
    ours, peer = _named_params(0), _named_params(0)
    opt, start = _train(ours, lambda n: AdamWMiniSF([p for _, p in n], mini=False, auto_lr=False, state_dtype="fp32",
                                                    foreach=foreach, fused=fused, averaging_power=averaging_power,
                                                    **kw))
    # schedulefree's r is our averaging power: weights (k+1)^r·lr_max² at its 0-based step k
    ref, _ = _train(peer, lambda n: schedulefree.AdamWScheduleFree([p for _, p in n], r=averaging_power, **kw))
    _assert_same_displacement(ours, peer, start, "y")
    opt.eval()
    ref.eval()
    _assert_same_displacement(ours, peer, start, "x after eval()")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach,fused", [(False, False), (True, False), (True, True)],
                         ids=["single", "foreach", "fused"])
def test_matches_adam_mini_without_schedule_free(weight_decay, foreach, fused):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    ours, peer = _named_params(0), _named_params(0)
    # Adam-mini never decays biases; give ours the same two groups.
    _, start = _train(ours, lambda n: AdamWMiniSF(
        [{"params": [p for k, p in n if k.endswith("weight")]},
         {"params": [p for k, p in n if k.endswith("bias")], "weight_decay": 0.0}],
        schedule_free=False, mini=True, auto_lr=False, warmup_steps=0, state_dtype="fp32",
        foreach=foreach, fused=fused, **kw))
    _train(peer, lambda n: adam_mini.Adam_mini(n, verbose=False, **kw))
    # Compare in the model's order (ours was given weights first, then biases: the tensors are the same objects).
    _assert_same_displacement(ours, peer, start, "parameters")


def test_the_peer_comparison_is_not_vacuous():
    """One step fewer (a twelfth of the displacement) is far outside the tolerance."""
    kw = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=4)
    ours, peer = _named_params(0), _named_params(0)
    _, start = _train(ours, lambda n: AdamWMiniSF([p for _, p in n], mini=False, auto_lr=False, state_dtype="fp32",
                                                  foreach=False, **kw), steps=STEPS - 1)
    _train(peer, lambda n: schedulefree.AdamWScheduleFree([p for _, p in n], **kw))
    with pytest.raises(AssertionError):
        _assert_same_displacement(ours, peer, start, "one step short")
