"""Schedule-Free averaging.

SPEC.md §3 item 4, after Defazio et al., "The Road Less Scheduled" (NeurIPS
2024), https://arxiv.org/abs/2405.15682. Three sequences:

    z_{t+1} = z_t − η_t·d_t                      (fast iterate, stored)
    x_{t+1} = (1−c_t)·x_t + c_t·z_{t+1}          (weight average, evaluated)
    y_t     = (1−β1)·z_t + β1·x_t                (where gradients are taken)

with weights ``c_t = w_t/Σ_{s≤t} w_s`` and ``w_t = lr_max_t²``, ``lr_max_t``
being the largest warmup-scaled lr seen so far. The parameter tensor holds
``y`` while training and ``x`` after ``eval()``; only ``z`` is stored, and
``x = (y − (1−β1)·z)/β1`` is recovered from the other two.

Substituting the three lines into each other gives the in-place update used
by the kernels (no ``x`` needed):

    y_{t+1} = (1−c_t)·y_t + c_t·z_t + η_t·(β1·(1−c_t) − 1)·d_t

The Ref controller (SPEC.md §3 items 5–6) acts through two more pieces here:

* injection: the average also takes a share λ of the iterate,
  ``x ← (1−λ)·x + λ·z``, which is the same as averaging with
  ``c_eff = c + λ·(1−c)`` (:func:`ref_weight`);
* repair: the fast iterate is pulled back toward the average,
  ``z ← z + ρ·(x − z)``, with ``x`` unchanged. Since ``x − z = (y − z)/β1``,
  in terms of the stored pair this is, with ``a = ρ·(1−β1)/β1``,

      y ← y + a·(y − z)                       = lerp(y, z, −a)
      z ← z + (a+ρ)/(1+a)·(y_new − z)          = lerp(z, y_new, (a+ρ)/(1+a))

  (:func:`pull_weights`): two in-place lerps with no temporary, and no
  division that can vanish. ρ = 1 puts both y and z at x.
"""

from __future__ import annotations

import torch


def warmup_factor(step: torch.Tensor, warmup_steps: int) -> torch.Tensor:
    """Linear warmup ``min(1, t/warmup_steps)``; 1 when ``warmup_steps == 0``."""
    if warmup_steps <= 0:
        return torch.ones_like(step)
    return (step / warmup_steps).clamp(max=1.0)


def averaging_weight(
    lr_t: torch.Tensor, lr_max: torch.Tensor, weight_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(c_t, lr_max_t, Σw)`` after one step at scheduled lr ``lr_t``.

    ``c_t`` is 0 while every lr so far has been 0 (nothing to average yet).
    """
    lr_max = torch.maximum(lr_max, lr_t)
    weight = lr_max * lr_max
    weight_sum = weight_sum + weight
    c = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight))
    return c, lr_max, weight_sum


def y_step_coefficient(eta: torch.Tensor, c: torch.Tensor, beta1: float) -> torch.Tensor:
    """The factor ``η·(β1·(1−c) − 1)`` multiplying ``d`` in the ``y`` update."""
    return eta * (beta1 * (1.0 - c) - 1.0)


def y_to_x(y: torch.Tensor, z: torch.Tensor, beta1: float) -> torch.Tensor:
    """The average ``x = (y − (1−β1)·z)/β1`` from the training point ``y``."""
    return torch.lerp(y, z, 1.0 - 1.0 / beta1)


def x_to_y(x: torch.Tensor, z: torch.Tensor, beta1: float) -> torch.Tensor:
    """The training point ``y = (1−β1)·z + β1·x`` from the average ``x``."""
    return torch.lerp(x, z, 1.0 - beta1)


def ref_weight(c: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The averaging weight with a Ref share λ of the iterate on top: ``c + λ·(1−c)``."""
    return c + lam * (1.0 - c)


def pull_weights(rho: torch.Tensor, beta1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lerp weights ``(−a, (a+ρ)/(1+a))`` for ``y`` then ``z`` that pull ``z`` toward ``x`` by ρ."""
    a = rho * ((1.0 - beta1) / beta1)
    return -a, (a + rho) / (1.0 + a)
