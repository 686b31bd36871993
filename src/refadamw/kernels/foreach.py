"""Multi-tensor update: the reference arithmetic with ``torch._foreach_*``.

The equations are in :mod:`refadamw.kernels.reference`. Here tensors are
bucketed by (device, compute dtype); per-tensor scalars (step, norm EMA,
``lr_max``, ``W``) are stacked into one vector per bucket so their arithmetic
is a handful of small ops whatever the tensor count, and the large tensors
are updated in place.
"""

from __future__ import annotations

import torch

from ..auto_lr import step_size, update_norm_ema
from ..averaging import averaging_weight, offset_coefficients, ref_weight, warmup_factor
from ..partition import BlockLayout
from ..precision import Salt, rounding_keys, shift_key
from . import fused as fused_kernel
from .common import (Control, Hyper, StepReport, buckets, buffer_offset, finite_grads, finite_squares, gates,
                     grad_norms, needs_rounding, store, working_copy)


def multi_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    fresh: list[bool],
    norms: list[torch.Tensor] | None = None,
    control: Control | None = None,
    fused: bool = False,
    index_offsets: list[int] | None = None,
) -> StepReport:
    """``fused``: run the elementwise part of Schedule-Free updates as one compiled
    pass per tensor (:mod:`refadamw.kernels.fused`) where the tensor allows it.
    ``index_offsets``: where each (sharded) tensor starts in its whole tensor, for the rounding noise."""
    index_offsets = [0] * len(params) if index_offsets is None else index_offsets
    if norms is None:
        norms = grad_norms(params, grads)
    finite, keep = gates(norms, control)

    lrs, etas = [], []
    for (device, dtype), idx in buckets(params).items():
        lr_t, eta = _update_bucket(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            torch.stack([norms[i] for i in idx]),
            [states[i] for i in idx],
            [layouts[i] for i in idx],
            [fresh[i] for i in idx],
            [index_offsets[i] for i in idx],
            hyper,
            keep.to(device),
            dtype,
            None if control is None else (control.lam.to(device), torch.where(finite, control.pull, 0.0).to(device)),
            fused,
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


CPU_CHUNK_NUMEL = 1 << 18
"""On CPU, large-tensor work runs in chunks of about this many elements (see _update_bucket)."""


def _chunks(params, max_numel: int | None):
    """Consecutive index ranges whose tensors hold at most ``max_numel`` elements (one at least)."""
    if max_numel is None:
        yield slice(0, len(params))
        return
    begin, total = 0, 0
    for i, p in enumerate(params):
        if total and total + p.numel() > max_numel:
            yield slice(begin, i)
            begin, total = i, 0
        total += p.numel()
    yield slice(begin, len(params))


def _rounding_keys(states, step, salt: Salt, targets, dtype, offsets) -> list[torch.Tensor | None]:
    """Per-tensor stochastic-rounding keys for one buffer, computed only if some target is bf16/fp16.

    ``offsets[i]``: the global index of ``targets[i]``'s first element (nonzero only for shards).
    """
    if not any(needs_rounding(t, dtype) for t in targets):
        return [None] * len(targets)
    keys = rounding_keys(_stacked(states, "rounding_key"), step, salt).unbind()
    return [shift_key(key, offset) for key, offset in zip(keys, offsets)]


def _update_bucket(params, grads, norm, states, layouts, fresh, offsets, h: Hyper, keep, dtype, ref, fused=False):
    keep_f = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=keep.device)

    # Per-tensor scalars, as one vector per bucket.
    scalar_keys = ("step", "grad_norm_ema") + (("lr_max", "weight_sum") if h.schedule_free else ())
    old = {key: _stacked(states, key) for key in scalar_keys}
    new = {"step": old["step"] + keep_f}
    step = new["step"]
    lr_t = h.lr * warmup_factor(step, h.warmup_steps)
    ema = new["grad_norm_ema"] = update_norm_ema(old["grad_norm_ema"], norm, step == 1, h.norm_ema_alpha)
    eta = step_size(lr_t, ema, norm, h.min_lr, h.max_lr) if h.auto_lr else lr_t
    eta = torch.where(keep, eta, zero)
    scalars = {
        "v_weight": (1 - h.beta2) * keep_f,
        "sqrt_bias2": (1 - h.beta2 ** step.clamp(min=1)).sqrt(),
    }
    if h.schedule_free:
        c, new["lr_max"], new["weight_sum"] = averaging_weight(lr_t, old["lr_max"], old["weight_sum"])
        rho = None
        if ref is not None:
            lam, rho = ref
            c, rho = ref_weight(c, lam.to(dtype)), rho.to(dtype)
        c = torch.where(keep, c, zero)
        scalars.update(offset_coefficients(eta, c, h.beta1, rho)._asdict())
    else:
        scalars.update(y_step=-eta, m_weight=(1 - h.beta1) * keep_f, bias1=1 - h.beta1 ** step.clamp(min=1))

    # Large tensors in chunks: on CPU every fresh full-size temporary costs
    # page faults, and freeing many at once returns them to the OS, so keep
    # each chunk's temporaries small enough to be reused step after step.
    max_numel = CPU_CHUNK_NUMEL if keep.device.type == "cpu" else None
    per_tensor = {k: list(v.unbind()) if v.dim() else [v] * len(params) for k, v in scalars.items()}
    if fused and h.schedule_free and dtype == torch.float32 and fused_kernel.available():
        per_tensor["coef"] = list(_fused_coefficients(scalars, h, len(params), keep.device).unbind())
    per_tensor["fresh"] = fresh
    per_tensor["key_param"] = _rounding_keys(states, step, Salt.PARAM, params, dtype, offsets)
    vs = [s["exp_avg_sq"] for s in states]
    v_offsets = [buffer_offset(o, p, v) for o, p, v in zip(offsets, params, vs)]
    per_tensor["key_v"] = _rounding_keys(states, step, Salt.EXP_AVG_SQ, vs, dtype, v_offsets)
    buffer, salt = ("z_minus_y", Salt.Z_MINUS_Y) if h.schedule_free else ("exp_avg", Salt.EXP_AVG)
    per_tensor["key_buffer"] = _rounding_keys(states, step, salt, [s[buffer] for s in states], dtype, offsets)
    for part in _chunks(params, max_numel):
        _update_tensors(params[part], grads[part], states[part], layouts[part], h, dtype,
                        {k: v[part] for k, v in per_tensor.items()})

    _commit_scalars(states, new, old, keep)
    return lr_t, eta


def _fused_coefficients(scalars: dict[str, torch.Tensor], h: Hyper, n: int, device) -> torch.Tensor:
    """An ``(n, 5)`` fp32 matrix: each tensor's scalars in the order of ``fused.COEFFICIENTS``."""
    # torch.full launches a fill; torch.tensor(x, device="cuda") would be a synchronizing host-to-device copy
    values = {"weight_decay": torch.full((), float(h.weight_decay), device=device), **scalars}
    return torch.stack([values[name].float().expand(n) for name in fused_kernel.COEFFICIENTS], dim=1)


def _update_tensors(params, grads, states, layouts, h: Hyper, dtype, k: dict[str, list[torch.Tensor]]):
    if "coef" in k and all(fused_kernel.eligible(p, g, s["z_minus_y"]) for p, g, s in zip(params, grads, states)):
        return _fused_update(params, grads, states, layouts, h, dtype, k)
    grads = finite_grads([g.to(dtype) for g in grads])
    blocked_grads = [lay.blocked(g) for lay, g in zip(layouts, grads)]
    squares = finite_squares([lay.mean_square(bg) for lay, bg in zip(layouts, blocked_grads)])
    vs = _moment(states, "exp_avg_sq", squares, k["v_weight"], k["fresh"], dtype)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, k["sqrt_bias2"])
    torch._foreach_add_(denoms, h.eps)
    denoms = [lay.broadcastable(dn, p.dim()) for lay, dn, p in zip(layouts, denoms, params)]

    ys = [working_copy(p, dtype) for p in params]
    blocked_ys = [lay.blocked(y) for lay, y in zip(layouts, ys)]
    if h.schedule_free:
        ds = blocked_grads  # our own finite copies: divide in place, no new buffer
        torch._foreach_div_(ds, denoms)
    else:
        ms = _moment(states, "exp_avg", grads, k["m_weight"], k["fresh"], dtype)
        ds = torch._foreach_div([lay.blocked(m) for lay, m in zip(layouts, ms)], k["bias1"])
        torch._foreach_div_(ds, denoms)
    if h.weight_decay != 0:
        torch._foreach_add_(ds, blocked_ys, alpha=h.weight_decay)

    if h.schedule_free:
        offsets = [working_copy(s["z_minus_y"], dtype) for s in states]
        blocked_offsets = [lay.blocked(o) for lay, o in zip(layouts, offsets)]
        torch._foreach_addcmul_(blocked_ys, blocked_offsets, k["y_offset"])
        torch._foreach_addcmul_(blocked_ys, ds, k["y_step"])
        torch._foreach_mul_(blocked_offsets, k["offset_decay"])
        torch._foreach_addcmul_(blocked_offsets, ds, k["offset_step"])
        for s, offset, key in zip(states, offsets, k["key_buffer"]):
            store(s["z_minus_y"], offset, key)
    else:
        torch._foreach_addcmul_(blocked_ys, ds, k["y_step"])
        for s, m, key in zip(states, ms, k["key_buffer"]):
            store(s["exp_avg"], m, key)

    for p, y, key in zip(params, ys, k["key_param"]):
        store(p, y, key)
    for s, v, key in zip(states, vs, k["key_v"]):
        store(s["exp_avg_sq"], v, key)


def _fused_update(params, grads, states, layouts, h: Hyper, dtype, k) -> None:
    """The block-sized work here, the elementwise pass compiled (kernels/fused.py).

    Gradients are read as they are: a non-finite block mean square only
    matters on a skipped step, whose ``v`` weight is 0, so it is set to 0 to
    keep ``v`` exact; the fused pass reads NaN/inf gradients as 0 itself.
    """
    grads = [g.to(dtype) for g in grads]
    squares = [torch.nan_to_num_(lay.mean_square(lay.blocked(g)), nan=0.0, posinf=torch.finfo(dtype).max)
               for lay, g in zip(layouts, grads)]
    vs = _moment(states, "exp_avg_sq", squares, k["v_weight"], k["fresh"], dtype)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, k["sqrt_bias2"])
    torch._foreach_add_(denoms, h.eps)
    for i, (p, g, s, dn, lay) in enumerate(zip(params, grads, states, denoms, layouts)):
        args = (lay.grid(p), lay.grid(g), lay.grid(s["z_minus_y"]), lay.grid_v(dn, p.shape),
                k["coef"][i], k["key_param"][i], k["key_buffer"][i])
        if not fused_kernel.fused_pass(*args):
            fused_kernel.sf_pass(*args)  # compiling failed: the same arithmetic, uncompiled, this once
    for s, v, key in zip(states, vs, k["key_v"]):
        store(s["exp_avg_sq"], v, key)


def _moment(states, name, targets, weights, fresh, dtype) -> list[torch.Tensor]:
    """Working copies of the EMA buffer ``name`` after ``buf ← lerp(buf, target, w)``.

    A fresh state's buffer is uninitialised storage: its EMA is computed
    directly as ``w·target`` (the lerp from zero) instead of being zero-filled first.
    """
    work = [None] * len(states)
    old = [i for i, f in enumerate(fresh) if not f]
    new = [i for i, f in enumerate(fresh) if f]
    if old:
        buffers = [working_copy(states[i][name], dtype) for i in old]
        torch._foreach_lerp_(buffers, [targets[i] for i in old], [weights[i] for i in old])
        for i, b in zip(old, buffers):
            work[i] = b
    for i in new:
        work[i] = torch.mul(targets[i], weights[i])
    return work
