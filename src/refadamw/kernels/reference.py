r"""Per-tensor reference update: readable, and the ground truth for the fast path.

SPEC.md §3 items 1–4. For each param group, with per-tensor step ``t``
(counting from 1, advanced only by applied steps), gradient ``g`` and the
parameter tensor holding ``y``; all math in fp32 (fp64 for fp64 params):

    keep   = every gradient norm in the group is finite        (hygiene, §3.1)
             — when false, nothing below is written: state and weights stay
    lr_t   = lr · min(1, t / warmup_steps)
    n      = ‖g‖₂
    ē      = n                      if t = 1                    (auto-lr, §3.2)
             (1−α)·ē + α·n          otherwise
    η      = clamp(lr_t·ē/(n + 1e-12), min_lr, max_lr)  if auto_lr  else lr_t
    s_b    = mean_{i∈b} g_i²   per block b (mini)   or   g_i²   per element
    v      = β2·v + (1−β2)·s        (v = (1−β2)·s on a fresh state) (Adam-mini, §3.3)
    denom  = sqrt(v / (1−β2^t)) + eps       broadcast over each block

  Schedule-Free (§3.4, Defazio et al. 2024):
    d      = g/denom + wd·y
    lr_max = max(lr_max, lr_t),  W = W + lr_max²,  c = lr_max²/W
    y      ← (1−c)·y + c·z + η·(β1·(1−c) − 1)·d
    z      ← z − η·d                                 (z starts equal to y)

  schedule_free=False (AdamW-mini, for ablations):
    m      = β1·m + (1−β1)·g        (m = (1−β1)·g on a fresh state)
    d      = (m/(1−β1^t))/denom + wd·y
    y      ← y − η·d

  Storage (§3.7): every result above is computed in fp32 and written into
  bf16/fp16 storage (y, z, m, v) by unbiased stochastic rounding, keyed by
  (element, t, tensor, seed, buffer); see :mod:`refadamw.precision`. A fresh
  state's v and m are computed directly from the first gradient (no zero fill).
"""

from __future__ import annotations

import torch

from ..auto_lr import step_size, update_norm_ema
from ..averaging import averaging_weight, warmup_factor, y_step_coefficient
from ..partition import BlockLayout
from ..precision import Salt, compute_dtype, rounding_keys
from .common import Hyper, StepReport, all_finite, finite_grads, finite_squares, needs_rounding, store


def single_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    layouts: list[BlockLayout],
    hyper: Hyper,
    fresh: list[bool],
) -> StepReport:
    grads = [g.to(compute_dtype(p.dtype)) for p, g in zip(params, grads)]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    keep = all_finite(norms)
    lrs, etas = [], []
    for param, grad, norm, state, layout, new in zip(params, grads, norms, states, layouts, fresh):
        lr_t, eta = _update_one(param, grad, norm, state, layout, hyper, keep.to(param.device), new)
        lrs.append(lr_t.to(keep.device, torch.float32))
        etas.append(eta.to(keep.device, torch.float32))
    return StepReport(keep, torch.stack(lrs).mean(), torch.stack(etas).mean())


def _update_one(param, grad, norm, state, layout: BlockLayout, h: Hyper, keep, fresh: bool):
    dtype = grad.dtype
    keep_f = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=grad.device)

    step = state["step"] + keep_f
    lr_t = h.lr * warmup_factor(step, h.warmup_steps)
    ema = update_norm_ema(state["grad_norm_ema"], norm, step == 1, h.norm_ema_alpha)
    eta = step_size(lr_t, ema, norm, h.min_lr, h.max_lr) if h.auto_lr else lr_t
    eta = torch.where(keep, eta, zero)
    (grad,) = finite_grads([grad])

    blocked_grad = layout.blocked(grad)
    (square,) = finite_squares([layout.mean_square(blocked_grad)])
    v_weight = (1 - h.beta2) * keep_f
    v = square * v_weight if fresh else torch.lerp(state["exp_avg_sq"].to(dtype), square, v_weight)
    bias2 = 1 - h.beta2 ** step.clamp(min=1)
    denom = layout.broadcastable((v / bias2).sqrt() + h.eps, param.dim())

    y = param.to(dtype)
    if h.schedule_free:
        d = (blocked_grad / denom + h.weight_decay * layout.blocked(y)).reshape(param.shape)
        c, lr_max, weight_sum = averaging_weight(lr_t, state["lr_max"], state["weight_sum"])
        c = torch.where(keep, c, zero)
        z = state["z"].to(dtype)
        y_new = torch.lerp(y, z, c) + y_step_coefficient(eta, c, h.beta1) * d
        store(state["z"], z - eta * d, _key(state, step, Salt.Z, state["z"], dtype))
        state["lr_max"].copy_(torch.where(keep, lr_max, state["lr_max"]))
        state["weight_sum"].copy_(torch.where(keep, weight_sum, state["weight_sum"]))
    else:
        m_weight = (1 - h.beta1) * keep_f
        m = grad * m_weight if fresh else torch.lerp(state["exp_avg"].to(dtype), grad, m_weight)
        bias1 = 1 - h.beta1 ** step.clamp(min=1)
        m_hat = layout.blocked(m / bias1)
        d = (m_hat / denom + h.weight_decay * layout.blocked(y)).reshape(param.shape)
        y_new = y - eta * d
        store(state["exp_avg"], m, _key(state, step, Salt.EXP_AVG, state["exp_avg"], dtype))

    store(param, y_new, _key(state, step, Salt.PARAM, param, dtype))
    store(state["exp_avg_sq"], v, _key(state, step, Salt.EXP_AVG_SQ, state["exp_avg_sq"], dtype))
    state["grad_norm_ema"].copy_(torch.where(keep, ema, state["grad_norm_ema"]))
    state["step"].copy_(step)
    return lr_t, eta


def _key(state, step, salt: Salt, dst: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    return rounding_keys(state["rounding_key"], step, salt) if needs_rounding(dst, dtype) else None
