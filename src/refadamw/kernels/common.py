"""Pieces every kernel path shares: the hyperparameter bundle, the hygiene gate, the moment EMAs and
denominators, the one elementwise update (:func:`schedule_free_step`), and fp32 working copies of
low-precision storage. The algorithm they compute is written out in :mod:`refadamw.kernels`."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from ..precision import LOW_PRECISION, compute_dtype, write_back


class Hyper(NamedTuple):
    """One param group's hyperparameters, as the kernels need them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    warmup_steps: int
    auto_lr: bool
    min_lr: float | None
    max_lr: float | None
    norm_ema_alpha: float
    schedule_free: bool
    averaging_power: float


class Control(NamedTuple):
    """The Ref controller's decision for one step, as 0-d tensors (SPEC.md §3 items 5–6)."""

    lam: torch.Tensor  # float: share λ of the iterate injected into the average
    pull: torch.Tensor  # float: repair strength ρ, z ← z + ρ·(x − z)
    skip: torch.Tensor  # bool: leave the gradient out of this step entirely


class StepReport(NamedTuple):
    """What one group's update did, as 0-d tensors (never read on the host here)."""

    applied: torch.Tensor  # bool: False when a non-finite gradient skipped the group
    lr: torch.Tensor  # mean warmup-scaled lr over the group's tensors
    effective_lr: torch.Tensor  # mean per-tensor step size η over the group's tensors


def stacked(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """0-d tensors as one vector on ``device`` (in ``dtype``; None: their promoted dtype): one stack and
    one copy, or a copy per tensor when they lie on several devices (a model split across GPUs)."""
    try:
        return torch.stack(tensors).to(device, dtype)
    except RuntimeError:
        return torch.stack([t.to(device) for t in tensors]).to(dtype)


def all_finite(norms: list[torch.Tensor]) -> torch.Tensor:
    """True when every gradient norm is finite: the group-wide hygiene gate. ``norms``: 0-d tensors,
    or vectors of them.

    A norm is non-finite when its gradient holds a NaN or inf, or when its
    squares overflow, which would poison ``v`` just the same.
    """
    if norms[0].dim() == 0:
        return stacked(norms, norms[0].device).isfinite().all()
    return stacked([n.isfinite().all() for n in norms], norms[0].device).all()  # one vector per bucket


def buckets(params: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by (device, compute dtype), for multi-tensor ops."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, compute_dtype(p.dtype))].append(i)
    return out


def gates(norms: list[torch.Tensor], control: Control | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(finite, keep)``: the hygiene gate, and whether the gradient is applied.

    ``keep`` is ``finite`` unless the controller skips the step. Repair still
    acts on a controller-skipped step, but never on a non-finite one, which
    must leave everything untouched.
    """
    finite = all_finite(norms)
    if control is None:
        return finite, finite
    return finite, finite & ~control.skip.to(finite.device)


def finite_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients with NaN/inf replaced by 0.

    A skipped step (``keep`` false) runs with η = c = 0 and the moment mixing
    weights at 0, which leaves every buffer exactly as it was *provided* the
    operands are finite (0·NaN would be NaN). ``nan_to_num`` is a fast
    elementwise pass, unlike ``torch.where`` on CPU.
    """
    return [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]


def finite_squares(squares: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block mean squares with overflow (finite g, g² > max float) capped, in place."""
    return [torch.nan_to_num_(s, posinf=torch.finfo(s.dtype).max) for s in squares]


def moments(states, name, targets, weights, fresh, dtype) -> list[torch.Tensor]:
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


def denominators(vs, sqrt_bias2, eps: float) -> list[torch.Tensor]:
    """Adam's denominators ``sqrt(v)/sqrt(1−β2^t) + eps`` of working ``v`` buffers (every path's, once;
    ``native.c`` computes the same per block). ``sqrt_bias2``: one 0-d tensor per buffer."""
    out = torch._foreach_sqrt(vs)
    torch._foreach_div_(out, sqrt_bias2)
    torch._foreach_add_(out, eps)
    return out


def schedule_free_step(ys, ds, offsets, denoms, weight_decay, y_offset, y_step, offset_decay, offset_step) -> None:
    """The elementwise Schedule-Free update, in place on lists of working tensors (every path's, once;
    the last three lines of the algorithm in :mod:`refadamw.kernels`, in its stored coordinates):

        d  = g/denom + wd·y
        y ← y + y_offset·δ + y_step·d
        δ ← offset_decay·δ + offset_step·d

    ``ds`` holds the finite gradients on entry (blocked views, like ``ys`` and ``offsets``) and the
    directions ``d`` on exit; ``denoms`` broadcast against them. The coefficients are lists of one 0-d
    tensor per tensor (:func:`refadamw.averaging.offset_coefficients`); ``weight_decay`` is one float
    or 0-d tensor. The per-tensor path calls it with one-element lists, the multi-tensor path with a
    chunk's tensors, and the compiled pass (:mod:`refadamw.kernels.fused`) traces it into one loop;
    the CPU kernel (``native.c``) writes the same operations in the same order.
    """
    torch._foreach_div_(ds, denoms)
    if nonzero(weight_decay):
        if isinstance(weight_decay, torch.Tensor):  # alpha= would read it on the host
            torch._foreach_addcmul_(ds, ys, [weight_decay.to(ys[0].dtype)] * len(ys))
        else:
            torch._foreach_add_(ds, ys, alpha=weight_decay)
    torch._foreach_addcmul_(ys, offsets, y_offset)
    torch._foreach_addcmul_(ys, ds, y_step)
    torch._foreach_mul_(offsets, offset_decay)
    torch._foreach_addcmul_(offsets, ds, offset_step)


def device_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A hyperparameter as a 0-d fp32 tensor on ``device``, without a host sync: a float is filled in
    (``torch.tensor(x, device="cuda")`` would be a synchronizing copy), a tensor is used as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32)
    return torch.full((), float(value), dtype=torch.float32, device=device)


def nonzero(value: float | torch.Tensor) -> bool:
    """Whether a hyperparameter may be nonzero, decided without reading a tensor's value on the host."""
    return isinstance(value, torch.Tensor) or value != 0


def working_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when it is already in the compute dtype, else an upcast copy."""
    return t if t.dtype == dtype else t.to(dtype)


def needs_rounding(dst: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether writing a ``dtype`` result into ``dst`` is stochastically rounded."""
    return dst.dtype in LOW_PRECISION and dst.dtype != dtype


def buffer_offset(index_offset: int, param: torch.Tensor, buffer: torch.Tensor) -> int:
    """The global index of ``buffer``'s first element, given that of ``param``'s shard.

    A state buffer is parameter-shaped, or (mini ``v``) one value per dim-0
    block; either way it is sharded along dim 0 like the parameter, with the
    same share of elements per row, and shard boundaries fall on block boundaries.
    """
    if not index_offset or not param.numel():
        return 0
    return index_offset * buffer.numel() // param.numel()


def store(dst: torch.Tensor, work: torch.Tensor, key: torch.Tensor | None = None) -> None:
    """Write a working copy back into its storage (no-op when it *is* the storage).

    ``key`` is the stochastic-rounding key, needed when ``dst`` is bf16/fp16.
    """
    if work is not dst:
        write_back(dst, work, key)
