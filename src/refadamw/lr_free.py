"""The learning-rate-free step size: a Prodigy distance estimate, per param group, on a sample of each tensor.

Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024,
arXiv:2306.06101), after D-Adaptation (Defazio & Mishchenko, ICML 2023, arXiv:2301.07733), estimates
``D = ‖x0 − x*‖`` from below and steps with it. Here it runs on Schedule-Free's fast iterate ``z``
(the online learner whose regret the averaging turns into convergence) and on every
:data:`STRIDE`-th element of each tensor, ``S``, so the state is two fp32 samples per tensor
(8/97 ≈ 0.08 byte per parameter) instead of two parameter-sized buffers. Per param group, at a step
with estimate ``d`` (``d = D0`` at first) and warmup factor ``w_t = min(1, t/warmup_steps)``:

    η      = lr_free_scale·c·d̄·w_t                   the step size the kernels get as ``lr``·warmup
    a      = (d/D0)²·w_t                              this step's weight (0 on a skipped step)
    r      ← β3·r + a·Σ_tensors ⟨g_S, x0_S − z_S⟩       z = y + δ before this step's update
    s_i    ← β3·s_i + a·g_S                             one sample buffer per tensor
    d      ← max(d, r / Σ_tensors ‖s_i‖₁)                for the next step; unchanged while the sum is 0
    d̄      ← d̄ + (d − d̄)/τ                            the step follows d with a lag (d̄ = D0 at first)
    d̄      ← (1 − κ·ρ)·d̄                              where the controller pulls z toward x by ρ

with ``c = STEP_FRACTION``, ``τ = LAG_STEPS``, ``κ = REPAIR_CUT``, ``β3 = sqrt(β2)`` and ``x0`` the tensor's
sampled values at its first step. ``r``, ``d`` and ``d̄`` live in the group's ``stats`` (``lr_free_numerator``,
``lr_free_d``, ``lr_free_d_lagged``); ``s`` and ``x0`` in each parameter's state. Everything is tensor
arithmetic: nothing reads a value on the host. The sums over a group's tensors are taken per tensor and
then added in the group's parameter order; under FSDP2 each rank samples its own shard and the two sums
are all-reduced (:func:`refadamw.sharding.global_sums`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .averaging import warmup_factor

STRIDE = 97
"""Every STRIDE-th element of a tensor is sampled (a prime, so the sample does not align with rows)."""
D0 = 1e-6
"""The first estimate of the distance: the first steps are tiny, and ``d`` grows from there (Prodigy's d0)."""
STEP_FRACTION = 0.85
"""The step is this fraction of the lagged estimate ``d̄``. Like Prodigy's ``d_coef``, it scales the step
only: the weights ``a`` use ``d`` itself. Chosen with :data:`LAG_STEPS` by measurement (docs/lr_free.md)."""
LAG_STEPS = 50
"""The time constant ``τ`` of the lag with which the step follows ``d``. The estimate rises by orders of
magnitude within a few steps (on the bench's transformer from 1e-3 to 7e-3 in ten steps, well after the
warmup), and a step that jumps with it makes the loss jump (3.3 to 4.1 there): a jump of the estimate
becomes a ramp of about τ steps instead, as a warmup would make it. Without the lag, 0.5·d was stable
there and 0.7·d was not (1.20× tuned AdamW+cosine); with it 0.85·d̄ is (docs/lr_free.md)."""
AVERAGING_POWER = 1.0
"""The ``averaging_power`` an lr-free group gets when none is given (a fixed-lr group gets 0, Schedule-Free's):
the average weighs iterates by ``t·lr_max_t²`` rather than ``lr_max_t²``. On Shakespeare over seeds 0–11 the
lr-free default with 0 blew up on one seed (+14%) and with 1 on none, and on the other eleven 1 was 0.3% lower
in the mean; with the HF Trainer's two param groups, 2 blow-ups of 12 with 0 and 1 with 1 (docs/lr_free.md)."""
REPAIR_CUT = 0.5
"""``κ``: on a step where the Ref controller pulls ``z`` toward ``x`` by ``ρ`` (a divergence that lasted
``pull_after`` flagged steps; :mod:`refadamw.controller`), the step size is cut to ``1 − κ·ρ`` of itself
(0.85 / 0.75 / 0.5 on the ladder's rungs), as one would lower a fixed lr that diverges, and then climbs back
toward ``d`` with the lag, as after a new warmup. ``d`` and ``r`` stand: the distance is still what it was,
the step was too large for where the run is. With the HF Trainer's two param groups, Shakespeare seed 6
ended at 2.477 with the pull alone, 2.093 without repair and 1.864 with the cut; cutting ``d`` and ``r``
too left the step low for the rest of the run (seed 1: 1.980, against 1.928 with the pull alone and 1.888
with this cut; docs/lr_free.md)."""
STAT_KEYS = ("lr_free_d", "lr_free_numerator", "lr_free_d_lagged")
"""The group ``stats`` entries the estimate keeps: the estimate ``d``, the running numerator ``r`` and the
lagged estimate ``d̄`` that the step uses."""
STATE_KEYS = ("lr_free_anchor", "lr_free_sum")
"""The per-parameter state: ``x0`` and ``s`` on the sampled elements (fp32)."""


def resolve_mode(group: dict) -> float | None:
    """Settle a param group's mode, in place: ``lr_free`` None means on exactly when ``lr`` is None, and
    ``averaging_power`` None means :data:`AVERAGING_POWER` in the lr-free mode and 0 with a fixed lr.
    Returns a number ``lr`` that an explicit ``lr_free=True`` leaves unused (None otherwise).

    A number ``lr`` with ``lr_free`` left at None is a fixed lr, exactly as given; ``lr=None`` with
    ``lr_free=False`` is refused, and so is an ``lr_free_scale`` other than 1 on a fixed-lr group
    (it would silently do nothing)."""
    lr, mode = group["lr"], group["lr_free"]
    if mode is None:
        mode = lr is None
    if not mode and lr is None:
        raise ValueError("lr=None asks for the lr-free step size, but lr_free=False: pass a number for lr, "
                         "or leave lr_free unset")
    if not mode and group["lr_free_scale"] != 1.0:
        raise ValueError(f"lr_free_scale={group['lr_free_scale']} multiplies the lr-free step size, but this group "
                         f"has a fixed lr={lr}: drop lr to make it lr-free, or drop lr_free_scale")
    group["lr_free"] = mode
    if group["averaging_power"] is None:
        group["averaging_power"] = AVERAGING_POWER if mode else 0.0
    return lr if mode and isinstance(lr, (int, float)) else None


def sample_size(numel: int) -> int:
    return -(-numel // STRIDE)


def sampled(t: torch.Tensor) -> torch.Tensor:
    """The sampled elements of ``t`` (a view when ``t`` is contiguous)."""
    return t.reshape(-1)[::STRIDE]


def init_state(shard: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sampled anchor ``x0`` (the values now, before the first step) and a zero ``s``."""
    anchor = sampled(shard.detach()).to(torch.float32, copy=True)
    return {"lr_free_anchor": anchor, "lr_free_sum": torch.zeros_like(anchor)}


def init_stats(device: torch.device) -> dict[str, torch.Tensor]:
    return {"lr_free_d": torch.full((), D0, device=device), "lr_free_numerator": torch.zeros((), device=device),
            "lr_free_d_lagged": torch.full((), D0, device=device)}


def upgrade_stats(saved: Any) -> Any:
    """A group's saved ``stats`` from before the lag (no ``lr_free_d_lagged``): the step resumes from ``d``."""
    if isinstance(saved, Mapping) and "lr_free_d" in saved and "lr_free_d_lagged" not in saved:
        saved = {**saved, "lr_free_d_lagged": saved["lr_free_d"]}
    return saved


def weight(stats: dict[str, torch.Tensor], warmup_steps: int) -> torch.Tensor:
    """``(d/D0)²·w_t`` for the group's next step, ``t`` its applied steps + 1."""
    warm = warmup_factor(stats["steps"].to(torch.float32) + 1, warmup_steps)
    return (stats["lr_free_d"] / D0).square() * warm.to(stats["lr_free_d"])


def step_size(stats: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The group's ``lr`` for the kernels: ``lr_free_scale·STEP_FRACTION·d̄`` (the kernels apply the warmup)."""
    return stats["lr_free_d_lagged"] * (scale * STEP_FRACTION)


def segment_sums(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each tensor's sum of its consecutive ``lengths`` values: a tensor's sum depends on its own values
    alone, so the fused backward pass, which sees the tensors a few at a time, adds exactly as ``step()``."""
    return torch.segment_reduce(values, "sum", lengths=lengths)


class Observation:
    """One kernel call's lr-free terms for a group's tensors (``states``, in the call's order), seen before
    their update: per tensor ``⟨g_S, x0_S − z_S⟩``, then ``s_i`` updated where the step applies and
    ``‖s_i‖₁``. The CPU kernel adds the terms of the tensors it updates in the same pass (:meth:`record`);
    :meth:`read` computes the others' with tensor ops. ``a`` is the step's weight (:func:`weight`)."""

    def __init__(self, states: list[dict[str, torch.Tensor]], a: torch.Tensor, beta3: float) -> None:
        self.states, self.a, self.beta3 = states, a, beta3
        self._parts: list[tuple] = []

    def read(self, positions: list[int], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """The terms of the tensors at ``positions`` (``params`` and ``grads`` theirs), before their update."""
        states = [self.states[i] for i in positions]
        sizes = [s["lr_free_anchor"].numel() for s in states]
        g = torch.cat([sampled(t).to(torch.float32) for t in grads])
        z = torch.cat([sampled(p).to(torch.float32) for p in params])
        if "z_minus_y" in states[0]:  # Schedule-Free: z = y + δ; without it, the iterate is y
            z = z + torch.cat([sampled(s["z_minus_y"]).to(torch.float32) for s in states])
        anchor = torch.cat([s["lr_free_anchor"] for s in states])
        lengths = torch.tensor(sizes).to(g.device, non_blocking=True)
        # a non-finite gradient gives a non-finite product; the update's gate then leaves everything as it was
        dots = segment_sums(g * (anchor - z), lengths)
        self._parts.append((list(positions), dots, None, (states, g, sizes, lengths)))

    def record(self, positions: list[int], dots: torch.Tensor, l1: torch.Tensor) -> None:
        """Terms the CPU kernel computed for the tensors at ``positions`` (their ``s`` already updated)."""
        self._parts.append((list(positions), dots, l1, None))

    def commit(self, applied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s_i ← β3·s_i + a·g_S`` where ``applied`` for the tensors :meth:`read` saw; returns each tensor's
        ``⟨g_S, x0_S − z_S⟩`` and ``‖s_i‖₁`` after, in the order of ``states``."""
        positions, dots, l1 = [], [], []
        for at, part_dots, part_l1, read in self._parts:
            if read is not None:
                states, g, sizes, lengths = read
                buffers = [s["lr_free_sum"] for s in states]
                old = torch.cat(buffers)
                new = torch.where(applied.to(old.device), old * self.beta3 + g * self.a.to(old.device), old)
                torch._foreach_copy_(buffers, list(new.split(sizes)))
                part_l1 = segment_sums(new.abs(), lengths)
            positions += at
            dots.append(part_dots)
            l1.append(part_l1.to(part_dots.device))
        dots, l1 = (torch.cat(dots), torch.cat(l1)) if len(dots) > 1 else (dots[0], l1[0])
        if positions != list(range(len(positions))):
            order = torch.tensor(sorted(range(len(positions)), key=positions.__getitem__), device=dots.device)
            dots, l1 = dots[order], l1[order]
        return dots, l1


def advance(stats: dict[str, torch.Tensor], dots: torch.Tensor, l1: torch.Tensor, applied: torch.Tensor,
            a: torch.Tensor, beta3: float, pull: torch.Tensor | None = None) -> None:
    """End of a group's step: ``r ← β3·r + a·Σ dots``, ``d ← max(d, r/Σ ‖s‖₁)`` and ``d̄ ← d̄ + (d − d̄)/τ``,
    where ``applied``; then, with the controller's ``pull`` ρ as the kernels applied it (0 on a step whose
    gradients were not finite; None without a controller), ``d̄ ← (1 − REPAIR_CUT·ρ)·d̄``, also on a skipped
    step, where the pull acts too.

    ``dots`` and ``l1`` are the per-tensor values of the step's tensors in the group's parameter order
    (already summed over the ranks for sharded tensors)."""
    d, numerator = stats["lr_free_d"], stats["lr_free_numerator"]
    new_numerator = numerator * beta3 + a * dots.sum()
    denominator = l1.sum()
    estimate = new_numerator / denominator
    usable = applied & (denominator > 0) & estimate.isfinite()
    numerator.copy_(torch.where(applied & new_numerator.isfinite(), new_numerator, numerator))
    d.copy_(torch.where(usable, torch.maximum(d, estimate), d))
    lagged = stats["lr_free_d_lagged"]
    lagged.copy_(torch.where(applied, lagged + (d - lagged) / LAG_STEPS, lagged))
    if pull is not None:
        lagged.mul_(1 - REPAIR_CUT * pull.to(lagged.device, lagged.dtype))
