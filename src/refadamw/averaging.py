"""Schedule-Free averaging: the weights ``c_t``, the Ref share λ on top of them, and the stored offset.

SPEC.md §3 item 4, after Defazio et al., "The Road Less Scheduled" (NeurIPS
2024), https://arxiv.org/abs/2405.15682. The whole step, with the pieces here
in place, is written out once in :mod:`refadamw.kernels`. Three sequences:

    z_{t+1} = z_t − η_t·d_t                      (fast iterate)
    x_{t+1} = (1−c_t)·x_t + c_t·z_{t+1}          (weight average, evaluated)
    y_t     = (1−β1)·z_t + β1·x_t                (where gradients are taken)

with weights ``c_t = w_t/Σ_{s≤t} w_s`` and ``w_t = t^r·lr_max_t²``, ``lr_max_t``
being the largest warmup-scaled lr seen so far and ``r`` the averaging power
(the paper's polynomial weighting, schedulefree's ``r``; ``averaging_power``,
default 0; a larger ``r`` weighs later iterates more, docs/defaults.md). The
parameter tensor holds ``y`` while training and ``x`` after ``eval()``.

**What is stored.** Not ``z`` but its offset from the training point,
``δ = z − y``. It starts at exactly 0 (z = x = y), so a step with a zero
gradient leaves the weights exactly where they were, and in bf16/fp16
storage its rounding error scales with ``|z − y|``, not with ``|z|``: a
bf16 copy of ``z`` would re-round the weights themselves to bf16 precision
on the first step. Since ``y − z = β1·(x − z)``, the average is

    x = y − (1−β1)/β1 · δ                        (y_to_x, and back: x_to_y)

The Ref controller (SPEC.md §3 items 5–6) acts through two more pieces here:
injection, ``x ← (1−λ)·x + λ·z`` on top of the averaging, which is averaging
with ``c_eff = c + λ·(1−c)`` (:func:`ref_weight`); and repair,
``z ← z + ρ·(x − z)`` with ``x`` unchanged, which on the stored pair is
``y ← y − a·δ, δ ← (1−ρ)·δ`` with ``a = ρ·(1−β1)/β1`` (ρ = 1 puts both y and
z at x). :func:`offset_coefficients` folds repair and the averaging step into
one pair of updates, ``y ← y + k_y·δ + s_y·d`` and ``δ ← k_δ·δ + s_δ·d``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def warmup_factor(step: torch.Tensor, warmup_steps: int) -> torch.Tensor:
    """Linear warmup ``min(1, t/warmup_steps)``; 1 when ``warmup_steps == 0``."""
    if warmup_steps <= 0:
        return torch.ones_like(step)
    return (step / warmup_steps).clamp(max=1.0)


def averaging_weight(
    lr_t: torch.Tensor, lr_max: torch.Tensor, weight_sum: torch.Tensor, step: torch.Tensor, power: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(c_t, lr_max_t, Σw)`` after step ``t = step`` (counted from 1) at scheduled lr ``lr_t``,
    with ``w_t = t^power·lr_max_t²``.

    ``c_t`` is 0 while every lr so far has been 0 (nothing to average yet). ``Σw`` may be kept in a
    wider dtype than the lrs (fp64: it grows with every step); ``c_t`` comes back in the lrs' dtype.
    """
    lr_max = torch.maximum(lr_max, lr_t)
    weight = lr_max * lr_max
    if power != 0:  # in Σw's dtype, where t^power fits; with power 0 the weights are exactly as before it existed
        weight = weight.to(weight_sum.dtype) * step.to(weight_sum.dtype) ** power
    weight_sum = weight_sum + weight.to(weight_sum.dtype)
    c = torch.where(weight_sum > 0, weight / weight_sum, 0.0).to(lr_max.dtype)
    return c, lr_max, weight_sum


def y_to_x(y: torch.Tensor, z_minus_y: torch.Tensor, beta1: float) -> torch.Tensor:
    """The average ``x = y − (1−β1)/β1·(z − y)`` from the training point ``y``."""
    return y - ((1.0 - beta1) / beta1) * z_minus_y


def x_to_y(x: torch.Tensor, z_minus_y: torch.Tensor, beta1: float) -> torch.Tensor:
    """The training point ``y = x + (1−β1)/β1·(z − y)`` from the average ``x``."""
    return x + ((1.0 - beta1) / beta1) * z_minus_y


def ref_weight(c: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The averaging weight with a Ref share λ of the iterate on top: ``c + λ·(1−c)``."""
    return c + lam * (1.0 - c)


class OffsetCoefficients(NamedTuple):
    """One step in the stored coordinates: ``y ← y + y_offset·δ + y_step·d``, ``δ ← offset_decay·δ + offset_step·d``."""

    y_offset: torch.Tensor
    y_step: torch.Tensor
    offset_decay: torch.Tensor
    offset_step: torch.Tensor


def offset_coefficients(eta: torch.Tensor, c: torch.Tensor, beta1: float,
                        rho: torch.Tensor | None = None) -> OffsetCoefficients:
    """Repair by ρ (none when ``rho`` is None), then the averaging step with weight ``c`` and step size η.

    Repair first: ``y' = y − a·δ``, ``δ' = (1−ρ)·δ`` with ``a = ρ·(1−β1)/β1``; then
    ``y ← y' + c·δ' + η·(β1·(1−c) − 1)·d`` and ``δ ← (1−c)·(δ' − η·β1·d)``.
    With η = c = ρ = 0 (a skipped step) both are exactly the identity.
    """
    keep = 1.0 - c
    if rho is None:
        y_offset, offset_decay = c, keep
    else:
        y_offset = c * (1.0 - rho) - rho * ((1.0 - beta1) / beta1)
        offset_decay = keep * (1.0 - rho)
    return OffsetCoefficients(y_offset, eta * (beta1 * keep - 1.0), offset_decay, -(keep * eta * beta1))
