"""Multi-tensor update: the reference arithmetic with ``torch._foreach_*``.

The equations are in :mod:`refadamw.kernels.reference`. Here tensors are
bucketed by (device, compute dtype); per-tensor scalars (step, norm EMA,
``lr_max``, ``W``) are stacked into one vector per bucket so their arithmetic
is a handful of small ops whatever the tensor count, and the large tensors
are updated in place.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..auto_lr import step_size, update_norm_ema
from ..averaging import averaging_weight, warmup_factor, y_step_coefficient
from ..partition import BlockLayout
from ..precision import compute_dtype
from .common import Hyper, StepReport, all_finite, finite_grads, finite_squares, store, working_copy


def multi_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
) -> StepReport:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, compute_dtype(p.dtype))].append(i)

    grads = [g.to(compute_dtype(p.dtype)) for p, g in zip(params, grads)]
    norms: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    for idx in buckets.values():
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx])):
            norms[i] = n
    keep = all_finite(norms)

    lrs, etas = [], []
    for (device, dtype), idx in buckets.items():
        lr_t, eta = _update_bucket(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            torch.stack([norms[i] for i in idx]),
            [states[i] for i in idx],
            [layouts[i] for i in idx],
            hyper,
            keep.to(device),
            dtype,
        )
        lrs.append(lr_t.to(keep.device, torch.float32))
        etas.append(eta.to(keep.device, torch.float32))
    return StepReport(keep, torch.cat(lrs).mean(), torch.cat(etas).mean())


def _stacked(states, key):
    return torch.stack([s[key] for s in states])


def _commit_scalars(states, new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], keep) -> None:
    """Write per-tensor scalars back, keeping the old values on a skipped step."""
    for key, values in new.items():
        kept = torch.where(keep, values, old[key])
        torch._foreach_copy_([s[key] for s in states], list(kept.unbind()))


def _update_bucket(params, grads, norm, states, layouts, h: Hyper, keep, dtype):
    n = len(params)
    keep_f = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=keep.device)

    scalar_keys = ("step", "grad_norm_ema") + (("lr_max", "weight_sum") if h.schedule_free else ())
    old = {key: _stacked(states, key) for key in scalar_keys}
    new = {"step": old["step"] + keep_f}
    step = new["step"]
    lr_t = h.lr * warmup_factor(step, h.warmup_steps)
    ema = new["grad_norm_ema"] = update_norm_ema(old["grad_norm_ema"], norm, step == 1, h.norm_ema_alpha)
    eta = step_size(lr_t, ema, norm, h.min_lr, h.max_lr) if h.auto_lr else lr_t
    eta = torch.where(keep, eta, zero)
    grads = finite_grads(grads)

    blocked_grads = [lay.blocked(g) for lay, g in zip(layouts, grads)]
    squares = finite_squares([lay.mean_square(bg) for lay, bg in zip(layouts, blocked_grads)])
    vs = [working_copy(s["exp_avg_sq"], dtype) for s in states]
    torch._foreach_lerp_(vs, squares, [(1 - h.beta2) * keep_f] * n)
    sqrt_bias2 = (1 - h.beta2 ** step.clamp(min=1)).sqrt()
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, list(sqrt_bias2.unbind()))
    torch._foreach_add_(denoms, h.eps)
    denoms = [lay.broadcastable(dn, p.dim()) for lay, dn, p in zip(layouts, denoms, params)]

    ys = [working_copy(p, dtype) for p in params]
    blocked_ys = [lay.blocked(y) for lay, y in zip(layouts, ys)]
    if h.schedule_free:
        # The finite gradients are our own copies: divide in place rather than
        # allocate (fresh large buffers cost page faults on every step on CPU).
        ds = blocked_grads
        torch._foreach_div_(ds, denoms)
    else:
        ms = [working_copy(s["exp_avg"], dtype) for s in states]
        torch._foreach_lerp_(ms, grads, [(1 - h.beta1) * keep_f] * n)
        bias1 = 1 - h.beta1 ** step.clamp(min=1)
        ds = torch._foreach_div([lay.blocked(m) for lay, m in zip(layouts, ms)], list(bias1.unbind()))
        torch._foreach_div_(ds, denoms)
    if h.weight_decay != 0:
        torch._foreach_add_(ds, blocked_ys, alpha=h.weight_decay)

    if h.schedule_free:
        c, new["lr_max"], new["weight_sum"] = averaging_weight(lr_t, old["lr_max"], old["weight_sum"])
        c = torch.where(keep, c, zero)
        zs = [working_copy(s["z"], dtype) for s in states]
        blocked_zs = [lay.blocked(z) for lay, z in zip(layouts, zs)]
        torch._foreach_lerp_(blocked_ys, blocked_zs, list(c.unbind()))
        torch._foreach_addcmul_(blocked_ys, ds, list(y_step_coefficient(eta, c, h.beta1).unbind()))
        torch._foreach_addcmul_(blocked_zs, ds, list((-eta).unbind()))
        for s, z in zip(states, zs):
            store(s["z"], z)
    else:
        torch._foreach_addcmul_(blocked_ys, ds, list((-eta).unbind()))
        for s, m in zip(states, ms):
            store(s["exp_avg"], m)

    for p, y in zip(params, ys):
        store(p, y)
    for s, v in zip(states, vs):
        store(s["exp_avg_sq"], v)
    _commit_scalars(states, new, old, keep)
    return lr_t, eta
