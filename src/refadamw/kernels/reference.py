"""Per-tensor reference update: readable, and the ground truth for the fast paths.

It computes the algorithm written out in :mod:`refadamw.kernels` (SPEC.md §3.1–3.7) one tensor at
a time: :func:`single_tensor_update` takes the group's gates, and :func:`_update_one` one tensor's
step, calling :func:`refadamw.kernels.common.schedule_free_step` with one-element lists.
"""

from __future__ import annotations

import torch

from ..auto_lr import step_size, update_norm_ema
from ..averaging import averaging_weight, offset_coefficients, ref_weight, warmup_factor
from ..partition import BlockLayout
from ..precision import Salt, compute_dtype, rounding_keys
from .common import (Control, Hyper, StepReport, buffer_offset, denominators, finite_grads, finite_squares, gates,
                     moments, needs_rounding, schedule_free_step, store)


def single_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    fresh: list[bool],
    norms: list[torch.Tensor] | None = None,
    control: Control | None = None,
    index_offsets: list[int] | None = None,
) -> StepReport:
    """``index_offsets``: where each (sharded) tensor starts in its whole tensor, for the rounding noise."""
    index_offsets = [0] * len(params) if index_offsets is None else index_offsets
    grads = [g.to(compute_dtype(p.dtype)) for p, g in zip(params, grads)]
    if norms is None:
        norms = [torch.linalg.vector_norm(g) for g in grads]
    finite, keep = gates(norms, control)
    lrs, etas = [], []
    for param, grad, norm, state, layout, new, offset in zip(params, grads, norms, states, layouts, fresh,
                                                             index_offsets):
        device = param.device
        lr_t, eta = _update_one(param, grad, norm, state, layout, hyper, keep.to(device), new,
                                _controls(control, finite, hyper, device), offset)
        lrs.append(lr_t.to(keep.device, torch.float32))
        etas.append(eta.to(keep.device, torch.float32))
    return StepReport(keep, torch.stack(lrs).mean(), torch.stack(etas).mean())


def _controls(control: Control | None, finite, h: Hyper, device):
    """``(λ, ρ)`` for this group (ρ = 0 unless finite), or None without a controller."""
    if control is None or not h.schedule_free:
        return None
    return control.lam.to(device), torch.where(finite, control.pull, 0.0).to(device)


def _update_one(param, grad, norm, state, layout: BlockLayout, h: Hyper, keep, fresh: bool, ref, index_offset: int):
    dtype = grad.dtype
    keep_f = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=grad.device)

    step = state["step"] + keep.to(state["step"].dtype)
    step_f = step.to(dtype)
    lr_t = h.lr * warmup_factor(step_f, h.warmup_steps)
    ema = update_norm_ema(state["grad_norm_ema"], norm, step == 1, h.norm_ema_alpha)
    eta = step_size(lr_t, ema, norm, h.min_lr, h.max_lr) if h.auto_lr else lr_t
    eta = torch.where(keep, eta, zero)
    (grad,) = finite_grads([grad])

    blocked_grad = layout.blocked(grad)
    (square,) = finite_squares([layout.mean_square(blocked_grad)])
    (v,) = moments([state], "exp_avg_sq", [square], [(1 - h.beta2) * keep_f], [fresh], dtype)
    (denom,) = denominators([v], [(1 - h.beta2 ** step_f.clamp(min=1)).sqrt()], h.eps)
    denom = layout.broadcastable(denom, param.dim())

    y = param.to(dtype)
    if h.schedule_free:
        c, lr_max, weight_sum = averaging_weight(lr_t, state["lr_max"], state["weight_sum"], step,
                                                 h.averaging_power)
        rho = None
        if ref is not None:
            lam, rho = ref
            c, rho = ref_weight(c, lam.to(dtype)), rho.to(dtype)
        c = torch.where(keep, c, zero)
        k = offset_coefficients(eta, c, h.beta1, rho)
        y_new = y.clone()  # y itself when param is already in the compute dtype
        offset = state["z_minus_y"].to(dtype, copy=True)
        schedule_free_step([layout.blocked(y_new)], [blocked_grad], [layout.blocked(offset)], [denom],
                           h.weight_decay, *([coef] for coef in k))
        store(state["z_minus_y"], offset,
              _key(state, step, Salt.Z_MINUS_Y, state["z_minus_y"], dtype, index_offset))
        state["lr_max"].copy_(torch.where(keep, lr_max, state["lr_max"]))
        state["weight_sum"].copy_(torch.where(keep, weight_sum, state["weight_sum"]))
    else:
        (m,) = moments([state], "exp_avg", [grad], [(1 - h.beta1) * keep_f], [fresh], dtype)
        bias1 = 1 - h.beta1 ** step_f.clamp(min=1)
        m_hat = layout.blocked(m / bias1)
        d = (m_hat / denom + h.weight_decay * layout.blocked(y)).reshape(param.shape)
        y_new = y - eta * d
        store(state["exp_avg"], m, _key(state, step, Salt.EXP_AVG, state["exp_avg"], dtype, index_offset))

    store(param, y_new, _key(state, step, Salt.PARAM, param, dtype, index_offset))
    v_offset = buffer_offset(index_offset, param, state["exp_avg_sq"])
    store(state["exp_avg_sq"], v, _key(state, step, Salt.EXP_AVG_SQ, state["exp_avg_sq"], dtype, v_offset))
    state["grad_norm_ema"].copy_(torch.where(keep, ema, state["grad_norm_ema"]))
    state["step"].copy_(step)
    return lr_t, eta


def _key(state, step, salt: Salt, dst: torch.Tensor, dtype: torch.dtype, index_offset: int) -> torch.Tensor | None:
    return rounding_keys(state["rounding_key"], step, salt, index_offset) if needs_rounding(dst, dtype) else None
