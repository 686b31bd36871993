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
from .common import Control, Hyper, StepReport, all_finite, stacked
from .foreach import bucket_norms, bucket_plans, multi_tensor_update
from .reference import single_tensor_update

__all__ = ["Control", "Hyper", "StepReport", "all_finite", "stacked", "grad_norms", "update", "single_tensor_update", "multi_tensor_update"]


def update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    *,
    fresh: list[bool] | None = None,
    norms: list[torch.Tensor] | None = None,
    control: Control | None = None,
    foreach: bool = True,
    fused: bool = False,
    index_offsets: list[int] | None = None,
    cache: dict | None = None,
) -> StepReport:
    """Apply one step to a param group's tensors that have gradients.

    ``fresh[i]`` marks a state created for this step, whose moment buffers
    are uninitialised and get computed directly from the gradient. ``norms``
    are the gradients' 2-norms when the caller already has them, and
    ``control`` the Ref controller's decision (None: no controller).
    ``fused`` lets the multi-tensor path run its elementwise Schedule-Free
    work as one compiled pass per tensor (:mod:`refadamw.kernels.fused`).
    ``index_offsets[i]`` is where ``params[i]``, a shard, starts in its whole
    flattened tensor (None: every tensor is whole); the stochastic rounding
    draws the noise of the global element index (:mod:`refadamw.precision`).
    ``cache`` is a dict the caller keeps per group while its tensors and their state stay the same
    objects; the multi-tensor path keeps its per-group plan there (see :func:`multi_tensor_update`).
    """
    fresh = [False] * len(params) if fresh is None else fresh
    offsets = [0] * len(params) if index_offsets is None else index_offsets
    if foreach:
        return multi_tensor_update(params, grads, states, layouts, hyper, fresh, norms, control, fused=fused,
                                   index_offsets=offsets, cache=cache)
    return single_tensor_update(params, grads, states, layouts, hyper, fresh, norms, control, index_offsets=offsets)


def grad_norms(params: list[torch.Tensor], grads: list[torch.Tensor], states, layouts, *,
               native: bool = False, cache: dict | None = None) -> list[torch.Tensor]:
    """Each gradient's 2-norm, in its parameter's compute dtype.

    With ``native`` (a fused Schedule-Free group), tensors that the CPU multi-tensor kernel takes get
    theirs from its block sums, which the following :func:`update` with the same ``cache`` reuses, so
    ``g`` is read once for both.
    """
    return bucket_norms(bucket_plans(params, grads, states, layouts, native, cache), params, grads)
