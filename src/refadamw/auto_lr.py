"""Auto learning rate: the seed's gradient-norm EMA step size.

SPEC.md §3 item 2. Each parameter tensor keeps an EMA ``ē`` of its gradient
norm ``n = ‖g‖₂`` and scales its step by ``ē/n``:

    ē_1 = n_1,      ē_t = (1−α)·ē_{t−1} + α·n_t
    η_t = clamp(lr_t·ē_t/(n_t + 1e-12), min_lr, max_lr)

A gradient spike (``n ≫ ē``) shrinks the step; steady gradients leave it at
``lr_t``. ``α`` is the seed's ``schedulefree_alpha``. Where this sits in the
whole step (the EMA is kept on every applied step, auto-lr or not) is written
out in :mod:`refadamw.kernels`.

The seed's bounds were absolute (``min_lr=1e-6, max_lr=1e-2``). That silently
caps Schedule-Free, whose best lr is often above 1e-2, so when the bounds are
left as ``None`` they are relative to ``lr_t``: ``[MIN_RATIO·lr_t,
MAX_RATIO·lr_t]``. With ``MAX_RATIO = 1`` the EMA can only damp a step, never
raise it above the scheduled lr, which is the seed's second defect (η growing
to ``max_lr`` whenever gradient norms shrink).

Everything here is tensor arithmetic on the device (no host sync) and works
elementwise, so the same functions serve one tensor's 0-d scalars and the
multi-tensor path's stacked 1-d vectors.
"""

from __future__ import annotations

import torch

NORM_FLOOR = 1e-12
MIN_RATIO = 0.1
MAX_RATIO = 1.0


def update_norm_ema(ema: torch.Tensor, norm: torch.Tensor, first: torch.Tensor, alpha: float) -> torch.Tensor:
    """``ē ← n`` on a tensor's first step, else ``ē ← (1−α)·ē + α·n``."""
    return torch.where(first, norm, torch.lerp(ema, norm, alpha))


def step_size(
    lr_t: torch.Tensor,
    ema: torch.Tensor,
    norm: torch.Tensor,
    min_lr: float | None,
    max_lr: float | None,
) -> torch.Tensor:
    """``η = clamp(lr_t·ē/(n + 1e-12), lo, hi)``; ``None`` bounds are relative to ``lr_t``.

    When ``lo > hi`` (possible only with one absolute and one relative bound)
    the upper bound wins, as in :func:`torch.clamp`.
    """
    raw = lr_t * ema / (norm + NORM_FLOOR)
    lo = lr_t * MIN_RATIO if min_lr is None else torch.full_like(lr_t, min_lr)
    hi = lr_t * MAX_RATIO if max_lr is None else torch.full_like(lr_t, max_lr)
    return torch.minimum(torch.maximum(raw, lo), hi)
