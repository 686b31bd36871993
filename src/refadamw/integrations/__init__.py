"""Trainer integrations: :mod:`refadamw.integrations.hf` (Hugging Face Trainer)
and :mod:`refadamw.integrations.lightning` (Lightning).

Each module imports its trainer library; ``import refadamw`` imports neither.
Both callbacks do the same three jobs:

* feed the Ref controller the training loss, the eval loss and the planned
  step count (``max_steps``), using ``optimizer.observe`` and a step pre-hook
  that passes ``max_steps`` to ``step()``;
* put the averaged weights ``x`` in the model around evaluation;
* make checkpoints hold ``x`` (with the optimizer state saved in eval mode
  to match, so resuming works).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import unwrap_optimizer
from ..optimizer import AdamWMiniSF


def ours(optimizers: Any) -> list[AdamWMiniSF]:
    """The refadamw optimizers among ``optimizers`` (wrapped or not); others are skipped."""
    found = []
    for optimizer in optimizers:
        try:
            found.append(unwrap_optimizer(optimizer))
        except TypeError:
            continue
    return found


def feed_max_steps(optimizer: AdamWMiniSF, max_steps: int):
    """Pass ``max_steps`` to every ``optimizer.step()`` that does not pass its own.

    Returns the hook handle (``handle.remove()`` undoes it); None for an
    optimizer without the Ref controller.
    """
    if optimizer.controller is None:
        return None
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")

    def add_max_steps(opt, args, kwargs):
        if kwargs.get("max_steps") is None:
            kwargs = {**kwargs, "max_steps": max_steps}
        return args, kwargs

    return optimizer.register_step_pre_hook(add_max_steps)


def as_signal(value: Any) -> float | torch.Tensor | None:
    """A logged metric as a controller signal: floats and 0-d tensors pass, anything else is None."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def check_callback_args(metric_name: str, metric: Any, bn_batches: Any) -> None:
    """The arguments both callbacks share: the loss metric's key and the BatchNorm batch count."""
    if not isinstance(metric, str) or not metric:
        raise TypeError(f"{metric_name} must be a non-empty string, got {metric!r}")
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an int >= 0, got {bn_batches!r}")
