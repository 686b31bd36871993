"""Functional update kernels.

The optimizer class collects the parameters that have gradients and their
state; the kernels do the math. :func:`update` dispatches to

* :func:`refadamw.kernels.reference.single_tensor_update`, the readable
  per-tensor ground truth, whose docstring carries the equations, and
* :func:`refadamw.kernels.foreach.multi_tensor_update`, the same arithmetic
  with ``torch._foreach_*`` over lists of tensors.

Tests hold the two equal, and both to a float64 reference written from
SPEC.md. Nothing here knows about trainers or the optimizer class.
"""

from __future__ import annotations

import torch

from ..partition import BlockLayout
from .common import Hyper, StepReport, all_finite
from .foreach import multi_tensor_update
from .reference import single_tensor_update

__all__ = ["Hyper", "StepReport", "all_finite", "update", "single_tensor_update", "multi_tensor_update"]


def update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    *,
    fresh: list[bool] | None = None,
    foreach: bool = True,
) -> StepReport:
    """Apply one step to a param group's tensors that have gradients.

    ``fresh[i]`` marks a state created for this step, whose moment buffers
    are uninitialised and get computed directly from the gradient.
    """
    impl = multi_tensor_update if foreach else single_tensor_update
    return impl(params, grads, states, layouts, hyper, [False] * len(params) if fresh is None else fresh)
