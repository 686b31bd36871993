"""Functional update kernels, and the algorithm they compute, written out here once.

The optimizer class collects a param group's tensors that have gradients and their state; the
kernels do the math. :func:`update` dispatches to

* :func:`refadamw.kernels.reference.single_tensor_update` (``foreach=False``), the readable
  per-tensor ground truth: ``single_tensor_update → _update_one → common.schedule_free_step``;
* :func:`refadamw.kernels.foreach.multi_tensor_update` (the default), the same arithmetic with
  ``torch._foreach_*`` over lists of tensors: ``multi_tensor_update → _update_chunk →
  common.schedule_free_step``, or with ``fused`` the CPU kernel (:mod:`refadamw.kernels.native`,
  called from ``multi_tensor_update``) or the compiled pass (:mod:`refadamw.kernels.fused`, called
  from ``_update_chunk``).

The elementwise update is written once, :func:`refadamw.kernels.common.schedule_free_step`: the
paths call it, the compiled pass traces it and ``native.c`` transcribes it. Tests hold the paths
equal, and each to a float64 reference written from SPEC.md (``tests/spec_reference.py``). Nothing
here knows about trainers or the optimizer class.

The algorithm (SPEC.md §3.1–3.7)
--------------------------------
Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv:2405.15682)
with the Adam-mini block second moment (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain
More", 2024, arXiv:2406.16793), gradient hygiene, warmup, an optional auto learning rate, and the
Ref controller's injection λ, repair pull ρ and skip (decided by :mod:`refadamw.controller`,
applied here). One step of one param group; per tensor: gradient ``g``, its 2-norm ``n = ‖g‖₂``
(of the whole tensor, also for a shard), step ``t`` (counting from 1, advanced only by applied
steps), and the parameter tensor holding ``y``. All math in fp32 (fp64 for fp64 parameters),
whatever the storage dtype.

  Gates, group-wide (StepReport.applied is keep; the optimizer counts the steps it is false):
    finite = every n of the group is finite                §3.1 hygiene: false on a NaN/inf in g, or on g² overflowing
             — when false, nothing changes: the weights and every state stay exactly as they were
    keep   = finite and not the controller's skip          §3.6
             — when false, the gradient is left out: η = c = 0, and t, v, ē, lr_max, W stay;
               repair still acts on a finite skipped step

  Per tensor, in the papers' variables:
    t      ← t + keep
    lr_t   = lr·min(1, t/warmup_steps)                     warmup (lr_t = lr when warmup_steps = 0)
    ē      ← n  if t = 1,  else (1−α)·ē + α·n              §3.2 auto-lr: the norm EMA (kept with auto_lr off too)
    η      = clamp(lr_t·ē/(n + 1e-12), lo, hi)  if auto_lr,  else lr_t;   η = 0 unless keep
             lo = min_lr (None: 0.1·lr_t),  hi = max_lr (None: lr_t);  hi wins when lo > hi
    g      ← g with NaN/±inf read as 0                     (matters only on a skipped step)
    s_b    = mean_{i∈b} g_i² per block b, or g_i² per element    §3.3 Adam-mini (blocks: refadamw.partition);
             an overflowing s is capped at the dtype's largest finite value
    v      ← β2·v + (1−β2)·s                               a lerp of weight (1−β2)·keep; fresh: v = (1−β2)·keep·s
    denom  = sqrt(v)/sqrt(1 − β2^max(t,1)) + eps           broadcast over each block

    d      = g/denom + wd·y                                weight decay at y, where g was taken (before the pull)
    z      ← z + ρ·(x − z)                                 §3.6 repair pull, x kept (ρ = 0 unless finite)
    z      ← z − η·d                                       §3.4 Schedule-Free
    lr_max ← max(lr_max, lr_t);   w = t^r·lr_max²;   W ← W + w;   c = w/W
                                                   (c = 0 while W = 0; W in fp64; r = averaging_power)
    c      ← c + λ·(1−c);   c = 0 unless keep              §3.5 Ref injection: x ← (1−λ)·x + λ·z on top
    x      ← (1−c)·x + c·z                                 the weight average: the parameter after eval()
    y      = (1−β1)·z + β1·x                               the training point: the parameter in train mode

  In the stored coordinates, exactly as every path computes it: the state holds δ = z − y, not z
  (:mod:`refadamw.averaging` says why), which starts at 0 (z = x = y), and x = y − (1−β1)/β1·δ.
  Repair is y ← y − a·δ, δ ← (1−ρ)·δ, and the averaging step y ← y + c·δ + η·(β1·(1−c) − 1)·d,
  δ ← (1−c)·(δ − η·β1·d); both fold into one update (:func:`refadamw.averaging.offset_coefficients`,
  then :func:`refadamw.kernels.common.schedule_free_step`):
    a            = ρ·(1−β1)/β1
    y_offset     = c·(1−ρ) − a                             c      without a controller
    offset_decay = (1−c)·(1−ρ)                             1 − c  without a controller
    y_step       = η·(β1·(1−c) − 1)
    offset_step  = −((1−c)·η·β1)
    d            = g/denom + wd·y
    y            ← (y + y_offset·δ) + y_step·d
    δ            ← offset_decay·δ + offset_step·d
  With η = c = ρ = 0 (a non-finite step) this is exactly the identity, g being read as 0.

  schedule_free=False (AdamW-mini, for ablations; λ and ρ do not apply, the skip does), after v:
    m      ← β1·m + (1−β1)·g                               a lerp of weight (1−β1)·keep; fresh: m = (1−β1)·keep·g
    d      = (m/(1−β1^max(t,1)))/denom + wd·y
    y      ← y − η·d

  Storage (§3.7): every result is computed in the compute dtype and written into bf16/fp16 storage
  (y, δ, m, v) by unbiased stochastic rounding, its noise a counter-based hash of (the element's
  index in the whole tensor, t, the tensor's key from seed and ordinal, the buffer); see
  :mod:`refadamw.precision`. Block ``v`` is stored in fp32, and ``v`` never in fp16. State is
  created on a parameter's first step: a fresh state's ``v`` and ``m`` are computed directly from
  the first gradient (no zero fill), and its δ is 0.
"""

from __future__ import annotations

import torch

from ..lr_free import Observation
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
    lr_free: Observation | None = None,
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
    ``lr_free`` (a lr-free group): the :class:`refadamw.lr_free.Observation` that gets each tensor's
    lr-free terms, from the CPU kernel's pass where it runs, else read before the update; the caller
    commits it with the report's ``applied``.
    """
    fresh = [False] * len(params) if fresh is None else fresh
    offsets = [0] * len(params) if index_offsets is None else index_offsets
    if foreach:
        return multi_tensor_update(params, grads, states, layouts, hyper, fresh, norms, control, fused=fused,
                                   index_offsets=offsets, cache=cache, lr_free=lr_free)
    if lr_free is not None:
        lr_free.read(list(range(len(params))), params, grads)
    return single_tensor_update(params, grads, states, layouts, hyper, fresh, norms, control, index_offsets=offsets)


def grad_norms(params: list[torch.Tensor], grads: list[torch.Tensor], states, layouts, *,
               native: bool = False, cache: dict | None = None) -> list[torch.Tensor]:
    """Each gradient's 2-norm, in its parameter's compute dtype.

    With ``native`` (a fused Schedule-Free group), tensors that the CPU multi-tensor kernel takes get
    theirs from its block sums, which the following :func:`update` with the same ``cache`` reuses, so
    ``g`` is read once for both.
    """
    return bucket_norms(bucket_plans(params, grads, states, layouts, native, cache), params, grads)
