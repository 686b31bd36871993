"""A float64 reference of SPEC.md §3 items 1–4, written from the text, with
the Ref controller's actions of items 5–6 (λ, ρ, skip) given per step.

It shares no code with the library, keeps the Schedule-Free average ``x`` as
an explicit sequence (the library only stores ``z`` and derives ``x``), and
loops over mini blocks one by one. Only the partition's size threshold and
the relative auto-lr bounds are taken from the library, because SPEC.md
leaves those numbers to the implementation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from refadamw.auto_lr import MAX_RATIO, MIN_RATIO
from refadamw.partition import SMALL_NUMEL

F64 = torch.float64


@dataclass
class SpecHyper:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    auto_lr: bool = True
    min_lr: float | None = None
    max_lr: float | None = None
    alpha: float = 0.05
    mini: bool = True
    block_rows: int = 1
    schedule_free: bool = True
    averaging_power: float = 0.0  # r in w_t = t^r·lr_max_t² (SPEC.md §3.4: r = 0)


@dataclass
class SpecParam:
    """One parameter: the value the optimizer exposes (``y``) and its state."""

    y: torch.Tensor
    t: int = 0
    ema: float = 0.0
    v: torch.Tensor | None = None
    z: torch.Tensor | None = None
    x: torch.Tensor | None = None
    m: torch.Tensor | None = None
    lr_max: float = 0.0
    weight_sum: float = 0.0
    blocks: list[tuple[slice, ...]] | None = field(default=None)
    y_grad: torch.Tensor | None = None  # y before this step's repair pull, where g was taken
    layout: object = None  # a per-parameter block layout spec, as refadamw.partition.parse_spec reads it


def _blocks(shape, hp: SpecHyper, layout=None) -> list[tuple[slice, ...]] | None:
    """The index of each set of elements sharing one v, or None for per-element v.

    By shape: one block per dim-0 slice for every 2-D tensor and for 3+-D tensors of at least
    SMALL_NUMEL elements, ``block_rows`` slices per block for those of at least SMALL_NUMEL.
    A ``layout`` spec overrides that: "element"; "rows"/"columns" (dim 0/1);
    (name or block axes, k): one block for each index of the block axes, with
    ``k`` consecutive slices of the last one; every other dim lies whole in it.
    """
    if not hp.mini:
        return None
    if layout is None:
        numel = math.prod(shape)
        if len(shape) < 2 or numel == 0 or (len(shape) > 2 and numel < SMALL_NUMEL):
            return None
        layout = ((0,), hp.block_rows if numel >= SMALL_NUMEL else 1)
    if layout == "element":
        return None
    if isinstance(layout, str):
        layout = (layout, 1)
    axes, k = layout
    axes = {"rows": (0,), "columns": (1,)}.get(axes, axes)
    starts = [range(shape[a]) for a in axes[:-1]] + [range(0, shape[axes[-1]], k)]
    blocks = []
    for index in itertools.product(*starts):
        where = [slice(None)] * len(shape)
        for a, i in zip(axes[:-1], index):
            where[a] = slice(i, i + 1)
        where[axes[-1]] = slice(index[-1], index[-1] + k)
        blocks.append(tuple(where))
    return blocks


def spec_step(params: list[SpecParam], grads: list[torch.Tensor | None], hp: SpecHyper,
              lam: float = 0.0, pull: float = 0.0, skip: bool = False) -> bool:
    """One step of one param group. Returns False when hygiene skipped it.

    ``lam``, ``pull`` and ``skip`` are the Ref controller's decision (§3.5–6).
    """
    live = [(p, g.to(F64)) for p, g in zip(params, grads) if g is not None]
    if not live:
        return True
    # §3.1: a non-finite gradient anywhere in the group skips the group's update.
    if not all(torch.isfinite(g).all() for _, g in live):
        return False
    for p, _ in live:
        p.y_grad = None
    if hp.schedule_free:
        for p, _ in live:
            if p.z is not None:  # §3.6 repair: z ← z + ρ·(x − z); x stays, y follows
                p.z = p.z + pull * (p.x - p.z)
                p.y_grad, p.y = p.y, (1 - hp.beta1) * p.z + hp.beta1 * p.x
    if skip:  # §3.6: the spiking gradient reaches neither v nor z
        return True
    for p, g in live:
        if p.t == 0:  # lazy state on the first step that has a gradient
            p.blocks = _blocks(tuple(p.y.shape), hp, p.layout)
            p.v = torch.zeros(len(p.blocks), dtype=F64) if p.blocks is not None else torch.zeros_like(p.y)
            p.z, p.x = p.y.clone(), p.y.clone()
            p.m = torch.zeros_like(p.y)
        p.t += 1
        t = p.t
        lr_t = hp.lr * (min(1.0, t / hp.warmup_steps) if hp.warmup_steps > 0 else 1.0)
        # §3.2: gradient-norm EMA step size.
        n = math.sqrt(float((g * g).sum()))
        p.ema = n if t == 1 else (1 - hp.alpha) * p.ema + hp.alpha * n
        if hp.auto_lr:
            lo = MIN_RATIO * lr_t if hp.min_lr is None else hp.min_lr
            hi = MAX_RATIO * lr_t if hp.max_lr is None else hp.max_lr
            eta = min(max(lr_t * p.ema / (n + 1e-12), lo), hi)
        else:
            eta = lr_t
        # §3.3: block-wise (or per-element) second moment, bias-corrected.
        denom = torch.empty_like(g)
        if p.blocks is None:
            p.v = hp.beta2 * p.v + (1 - hp.beta2) * g * g
            denom = (p.v / (1 - hp.beta2**t)).sqrt() + hp.eps
        else:
            for b, where in enumerate(p.blocks):
                p.v[b] = hp.beta2 * p.v[b] + (1 - hp.beta2) * (g[where] ** 2).mean()
                denom[where] = math.sqrt(float(p.v[b]) / (1 - hp.beta2**t)) + hp.eps
        if hp.schedule_free:
            # §3.4: the three Schedule-Free sequences, x kept explicitly.
            p.lr_max = max(p.lr_max, lr_t)
            w = t**hp.averaging_power * p.lr_max**2
            p.weight_sum += w
            c = w / p.weight_sum if p.weight_sum > 0 else 0.0
            # weight decay at the point where the gradient was taken
            y_grad = p.y if p.y_grad is None else p.y_grad
            p.z = p.z - eta * (g / denom + hp.weight_decay * y_grad)
            p.x = (1 - c) * p.x + c * p.z
            p.x = (1 - lam) * p.x + lam * p.z  # §3.5 Ref injection on top of the average
            p.y = (1 - hp.beta1) * p.z + hp.beta1 * p.x
        else:
            p.m = hp.beta1 * p.m + (1 - hp.beta1) * g
            m_hat = p.m / (1 - hp.beta1**t)
            p.y = p.y - eta * (m_hat / denom + hp.weight_decay * p.y)
    return True
