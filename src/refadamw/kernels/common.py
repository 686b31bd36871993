"""Pieces both kernel paths share: the hyperparameter bundle, the hygiene gate,
and fp32 working copies of low-precision storage."""

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


def all_finite(norms: list[torch.Tensor]) -> torch.Tensor:
    """True when every gradient norm is finite: the group-wide hygiene gate.

    A norm is non-finite when its gradient holds a NaN or inf, or when its
    squares overflow, which would poison ``v`` just the same.
    """
    device = norms[0].device
    return torch.stack([n.isfinite().to(device) for n in norms]).all()


def buckets(params: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by (device, compute dtype), for multi-tensor ops."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, compute_dtype(p.dtype))].append(i)
    return out


def grad_norms(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's 2-norm, computed in its parameter's compute dtype."""
    norms: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    for (_, dtype), idx in buckets(params).items():
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], dtype=dtype)):
            norms[i] = n
    return norms


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
