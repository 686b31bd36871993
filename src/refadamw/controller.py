"""The Ref controller: window, divergence, overfit, repair (SPEC.md §3 items 5–6).

An optimizer composes a controller (``AdamWMiniSF(..., controller=RefController(...))``;
``RefAdamWMiniSF`` is exactly that) and uses only this interface: ``decide(Signals)``
→ a :class:`Decision` (λ, ρ, skip; the kernels' ``Control``), ``observe(loss, val_loss)``,
``stats()`` (``GROUP_STATS`` of them mirrored into each param group), ``checkpoint()``
(its keys of the optimizer's ``state_dict``) and ``restored(state_dict)`` (a new,
checked controller; the optimizer installs it only once the whole load is checked),
``total_steps`` and ``to(device)``; a fused backward pass also reads ``standing()`` (the last
decision's λ and pull, applied during the next backward) and ``spike_so_far(seen_sq, share)``.
The equations it feeds are in :mod:`refadamw.kernels`.

A small state machine over 0-d tensors, read as signal → level → action.
``observe()`` feeds signals, ``decide()`` runs once per optimizer step, before
the update. Nothing here syncs with the host: every decision is tensor
arithmetic, so the optimizer can call it inside a CUDA step.

Signals and levels (step ``t`` counts the ``decide()`` calls that did not
skip, from 1):

| signal | statistic | level 1 / 2 / 3 when |
|---|---|---|
| ``loss`` ℓ (when fed) | ``r = 1 + (ℓ−ē)/|ē|`` (ℓ/ē if ē > 0) | ``r >`` 1.2 / 1.5 / 2.0, ``ℓ−ē > k·σ`` |
| ``grad_norm`` n (always; unclipped, see :meth:`RefController.unclipped_norm`) | ``z = (log n − ē)/max(σ, σ_min)`` | ``z >`` 4 / 6 / 9 |

The step's level is the larger of the two, so trainers that never pass a loss
still get repair, and a gradient spike is caught even when the loss it came
with looked normal (a fed loss does not replace the gradient-norm signal; in
a ×1000 gradient-spike test it would otherwise go unnoticed).
| ``val_loss`` | last four strictly rising | *overfit*: suspend injection |

ē and σ are the signal's own running mean and deviation, not the previous
value (SPEC.md §3.6). Per ``decide()`` the seed's order is kept: validation
bookkeeping first, then the divergence level, then the actions.

Actions of one ``decide()``:

| state | ``lam`` | ``pull`` ρ | ``skip`` |
|---|---|---|---|
| level 0, ``t`` in window, not suspended | ``ref_alpha`` | 0 | no |
| level 1 | 0 | 0 | no |
| level 2 or 3 (``≥ skip_level``) | 0 | 0 | yes |
| level ℓ > 0 for ``pull_after`` (4) flagged steps in a row | 0 | ``ladder[ℓ]`` (0.3 / 0.5 / 1.0) | as above |
| ``repair=False`` | as above | 0 | no |
| outside window, ``T`` unknown, or suspended | 0 | as above | as above |

A skipped step leaves every optimizer buffer and ``t`` as they were, so a
run whose spike was skipped is bit-identical to one that never saw those
batches. The pull is kept for divergence that lasts: on a passing spike the
seed-era pull (ρ = 1 at level 3, z ← x) threw away the iterate's progress
and cost up to 18% of final loss on a small MLP.

Window (the seed's test, in float64): ``w0 ≤ t/T ≤ w1``, ``T`` = the latest
``max_steps`` or else ``total_steps``; it is turned into integer bounds on the
host once per new ``T``, so the device only compares integers.

Running statistics (ē, σ² for loss, and for log grad norm) are exponentially
weighted, with Welford weights ``1/n`` until ``1/n < β`` so the estimate is
unbiased from the first value:

    w = max(β, 1/n),   ē ← ē + w·(x−ē),   σ² ← (1−w)·(σ² + w·(x−ē)²)

Rules shared by both detectors: no level during the first ``warmup`` values;
flagged and non-finite values do not enter ē, σ² (a spike must not raise its
own baseline); after ``reanchor_after`` consecutive flagged values the shift
is taken as genuine and the statistics restart from the current value (a new
warm-up). Levels from losses fed between two ``decide()`` calls combine by
max; a step with no fresh loss (after one was seen) has level 0, so stale
signals never keep skipping steps.

Overfit (the seed's rule, SPEC.md §2 "Validation history"): the last 20
``val_loss`` values are kept. *Overfit*: the last four strictly increase; it
sets *suspended*. *Improving*: each of the last ``K`` values is below the one
before, ``K = min(20, max(10, int(1e-4·M)))`` with ``M = T`` or 1000 (the seed
used the call's ``max_steps`` only). With fewer than ``K+1`` stored values it
is False (the seed raised IndexError there). While suspended, each
``decide()`` with *improving* adds one to a counter and any other resets it;
the suspension clears at ``K``.

Defaults (keyword tunables; measured on synthetic clean runs, 2000 steps):

| tunable | default | why |
|---|---|---|
| ``ladder`` | (0, 0.3, 0.5, 1.0) | ρ per level once divergence lasts; the seed's (0.6, 0.8, 1.0) pulled on clean runs' rare false alarms and lost there |
| ``skip_level`` | 2 | a ×10 spike (levels 1–2) applied with a pull cost up to 2.4× on friedman (docs/controller.md); skipping it costs one batch |
| ``pull_after`` | 4 | longer than a burst of bad batches (the bench's is 3), shorter than ``reanchor_after`` |
| ``loss_ratios`` | (1.2, 1.5, 2.0) | the seed's thresholds |
| ``noise_k`` | 4 | losses are right-skewed: lognormal σ=0.3 noise flags 2% at k=3, 0.5% at 4 |
| ``gnorm_z`` | (4, 6, 9) | t(5) noise in log n flags 1% at (3, 5, 8), 0.2% here; ×1000 is +6.9 |
| ``gnorm_min_std`` | 0.05 | with a near-constant norm, level 1 still needs ×e^0.2 ≈ ×1.22 |
| ``beta`` | 0.05 | a ~20-step memory: lags a falling loss only slightly |
| ``warmup`` | 20 | values before any level (= 1/β, where the weights turn exponential) |
| ``reanchor_after`` | 10 | a burst of bad batches is repaired; a real shift costs ≤ 9 steps |
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .validation import check_bool, check_int, check_number, check_sequence, check_steps

logger = logging.getLogger("refadamw")

HISTORY = 20  # val_loss values kept, as in the seed

# name → (dtype, shape) of every state tensor; the whole state_dict.
_STATE: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "t": (torch.int64, ()), "total_steps": (torch.int64, ()),  # total_steps 0 = unknown
    "loss_seen": (torch.bool, ()), "loss_pending": (torch.int64, ()),
    "loss_ema": (torch.float32, ()), "loss_var": (torch.float32, ()),
    "loss_count": (torch.int64, ()), "loss_run": (torch.int64, ()),
    "gnorm_ema": (torch.float32, ()), "gnorm_var": (torch.float32, ()),
    "gnorm_count": (torch.int64, ()), "gnorm_run": (torch.int64, ()),
    "val_history": (torch.float32, (HISTORY,)), "val_count": (torch.int64, ()),
    "suspended": (torch.bool, ()), "improve_run": (torch.int64, ()),
    "lam": (torch.float32, ()), "pull": (torch.float32, ()), "level": (torch.int64, ()),
    "repairs": (torch.int64, ()), "skips": (torch.int64, ()), "flagged_steps": (torch.int64, ()),
    "grad_scale_log2": (torch.float32, ()),  # log2 of the loss scale last seen between backward and step()
}
_OPTIONAL = {"grad_scale_log2", "pull"}  # keys added later: a state_dict without them loads with zeros
MIN_SHARE = 0.25
"""Fused backward pass: the share of the previous step's squared norm the tensors seen so far must hold
before their norm is projected to the whole step's (:meth:`RefController.spike_so_far`); a few tensors'
norms alone vary more than the global one."""
SCALE_TOLERANCE = 1e-5
"""|log2(raw/seen) − k| below this (7e-6 relative) reads as an exact power-of-two scale 2^k: a clipped
step's ratio has an arbitrary mantissa, so a clipped step is taken for a scale change once in ~10⁵."""


class Decision(NamedTuple):
    lam: torch.Tensor  # 0-d float32: Ref share λ in force this step
    pull: torch.Tensor  # 0-d float32: repair strength ρ, z ← z + ρ·(x − z)
    skip: torch.Tensor  # 0-d bool: skip this step entirely
    level: torch.Tensor  # 0-d int64: divergence level 0..3


def _levels(stat: torch.Tensor, thresholds: tuple[float, float, float]) -> torch.Tensor:
    """Count of increasing thresholds exceeded: the level 0..3 (NaN → 0)."""
    return sum((stat > th).long() for th in thresholds)


def _ew_update(x, ema, var, count, beta: float, take):
    """One exponentially weighted mean/variance step, applied only where ``take``."""
    n = count + 1
    w = n.to(torch.float32).reciprocal().clamp(min=beta)
    dev = x - ema
    new_ema, new_var = ema + w * dev, (1 - w) * (var + w * dev * dev)
    return torch.where(take, new_ema, ema), torch.where(take, new_var, var), torch.where(take, n, count)


def _window_bounds(w0: float, w1: float, total: int) -> tuple[int, int]:
    """Integer ``[lo, hi]`` with ``lo ≤ t ≤ hi ⇔ w0 ≤ t/T ≤ w1`` in float64 (host ints only)."""
    lo = max(1, math.ceil(w0 * total))
    while lo / total < w0:
        lo += 1
    while lo > 1 and (lo - 1) / total >= w0:
        lo -= 1
    hi = math.floor(w1 * total)
    while hi / total > w1:
        hi -= 1
    while (hi + 1) / total <= w1:
        hi += 1
    return lo, hi


class Signals(NamedTuple):
    """What one optimizer step tells the controller (all optional; tensors stay on the device).

    ``grad_norm``: a global gradient norm the caller measured before clipping; it replaces the two
    below. ``seen_norms``: each gradient's norm as ``step()`` sees it. ``backward_norms``: each
    gradient's norm when backward accumulated it, before a trainer clipped it (0 where none was
    recorded; None: nothing recorded). ``max_steps``: the planned training length ``T``.
    """

    grad_norm: torch.Tensor | None = None
    seen_norms: torch.Tensor | None = None
    backward_norms: torch.Tensor | None = None
    loss: Any = None
    val_loss: Any = None
    max_steps: int | None = None


class RefController:
    """Signal → level → action, as tensors. See the module docstring for the tables."""

    def __init__(self, ref_alpha: float, ref_window: tuple[float, float], total_steps: int | None,
                 repair: bool, device: torch.device | str = torch.device("cpu"), *,
                 ladder: tuple[float, float, float, float] = (0.0, 0.3, 0.5, 1.0),
                 loss_ratios: tuple[float, float, float] = (1.2, 1.5, 2.0), noise_k: float = 4.0,
                 gnorm_z: tuple[float, float, float] = (4.0, 6.0, 9.0), gnorm_min_std: float = 0.05,
                 beta: float = 0.05, warmup: int = 20, reanchor_after: int = 10, skip_level: int = 2,
                 pull_after: int = 4) -> None:
        self._tunables = dict(ladder=ladder, loss_ratios=loss_ratios, noise_k=noise_k, gnorm_z=gnorm_z,
                              gnorm_min_std=gnorm_min_std, beta=beta, warmup=warmup, reanchor_after=reanchor_after,
                              skip_level=skip_level, pull_after=pull_after)
        self.ref_alpha = check_number("ref_alpha", ref_alpha, 0.0, high=1.0)
        self.ref_window = check_sequence("ref_window", ref_window, 2, 0.0, 1.0, what="a pair (start, end)")
        if self.ref_window[0] > self.ref_window[1]:
            raise ValueError(f"ref_window start must not exceed its end, got {tuple(ref_window)}")
        self.repair = check_bool("repair", repair)
        self.ladder = check_sequence("ladder", ladder, 4, 0.0, 1.0, increasing=True)
        self.loss_ratios = check_sequence("loss_ratios", loss_ratios, 3, 1.0, increasing=True)
        self.gnorm_z = check_sequence("gnorm_z", gnorm_z, 3, 0.0, increasing=True)
        self.noise_k = check_number("noise_k", noise_k, 0.0)
        self.gnorm_min_std = check_number("gnorm_min_std", gnorm_min_std, 0.0)
        self.beta = check_number("beta", beta, 0.0, low_open=True, high=1.0)
        self.warmup, self.reanchor_after, self.pull_after = (
            check_int(name, value, 1) for name, value in
            (("warmup", warmup), ("reanchor_after", reanchor_after), ("pull_after", pull_after)))
        self.skip_level = check_int("skip_level", skip_level, 1, 4, " (4: never skip)")
        self.device = torch.device(device)
        self._s = {k: torch.zeros(shape, dtype=dt, device=self.device) for k, (dt, shape) in _STATE.items()}
        self._ladder = torch.tensor(self.ladder, dtype=torch.float32, device=self.device)
        self._warned = False
        self._fed_grad_norm: torch.Tensor | None = None
        self._set_total(check_steps("total_steps", total_steps))

    # -- host-side T: window bounds and K are Python ints, derived once per new T -----------------
    def _set_total(self, total: int | None) -> None:
        self._total = total
        self._s["total_steps"] = torch.full((), total or 0, dtype=torch.int64, device=self.device)
        self._lo, self._hi = _window_bounds(*self.ref_window, total) if total else (1, 0)  # (1, 0): empty
        self._k = min(20, max(10, int(1e-4 * (total or 1000))))

    def _signal(self, name: str, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.dim() != 0:
                raise ValueError(f"{name} must be a Python float or a 0-dim tensor, got shape {list(value.shape)}")
            return value.detach().to(self.device, torch.float32)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a Python float or a 0-dim tensor, got {type(value).__name__}")
        return torch.full((), float(value), dtype=torch.float32, device=self.device)  # a fill: no H2D sync

    def _detect(self, prefix: str, x: torch.Tensor, stat: torch.Tensor, gate: torch.Tensor,
                thresholds: tuple[float, float, float]) -> torch.Tensor:
        """Level from ``stat`` (computed from ``x`` against the running stats), then update them."""
        s = self._s
        ema, var, count, run = (s[f"{prefix}_{k}"] for k in ("ema", "var", "count", "run"))
        finite = torch.isfinite(x)
        level = torch.where(finite & gate & (count >= self.warmup), _levels(stat, thresholds), 0)
        run = torch.where(level > 0, run + 1, torch.where(finite, 0, run))
        reanchor = run >= self.reanchor_after  # a lasting shift is the new normal: start over from x
        level = torch.where(reanchor, 0, level)
        count = torch.where(reanchor, 0, count)
        take = finite & (level == 0)  # spikes and NaNs stay out of their own baseline
        s[f"{prefix}_ema"], s[f"{prefix}_var"], s[f"{prefix}_count"] = _ew_update(
            x, ema, var, count, self.beta, take)
        s[f"{prefix}_run"] = torch.where(reanchor, 0, run)
        return level

    def observe(self, loss: float | torch.Tensor | None = None, val_loss: float | torch.Tensor | None = None,
                grad_norm: float | torch.Tensor | None = None) -> None:
        """Feed a training loss and/or a validation loss (floats or 0-d tensors; no sync). ``grad_norm``, a
        global gradient norm the caller measured before clipping, replaces the norms of the next
        ``decide()`` only (it is not state)."""
        if grad_norm is not None:
            self._fed_grad_norm = self._signal("grad_norm", grad_norm)
        x = None if loss is None else self._signal("loss", loss)
        v = None if val_loss is None else self._signal("val_loss", val_loss)
        s = self._s
        if x is not None:
            ema = s["loss_ema"]
            dev = x - ema
            ratio = 1 + dev / ema.abs().clamp(min=1e-8)  # = ℓ/ē for ē > 0; still "rise" for ē < 0
            gate = dev > self.noise_k * s["loss_var"].sqrt()  # well above the minibatch noise
            level = self._detect("loss", x, ratio, gate, self.loss_ratios)
            s["loss_pending"] = torch.maximum(s["loss_pending"], level)
            s["loss_seen"] = torch.ones_like(s["loss_seen"])
        if v is not None:  # a NaN/inf validation loss is ignored: it would sit in the history for 20 evaluations
            finite = v.isfinite()
            s["val_history"] = torch.where(finite, torch.cat((s["val_history"][1:], v.reshape(1))), s["val_history"])
            s["val_count"] = torch.where(finite, (s["val_count"] + 1).clamp(max=HISTORY), s["val_count"])

    def decide(self, signals: Signals | torch.Tensor | float, max_steps: int | None = None) -> Decision:
        """Advance ``t`` and decide this step's λ, pull and skip (before the update).

        ``signals``: this step's :class:`Signals`, or just the global gradient norm (and ``max_steps``)."""
        if not isinstance(signals, Signals):
            signals = Signals(grad_norm=signals, max_steps=max_steps)
        self.observe(loss=signals.loss, val_loss=signals.val_loss)
        max_steps = signals.max_steps
        g = self._signal("grad_norm", self._global_norm(signals))
        if check_steps("max_steps", max_steps) is not None and max_steps != self._total:
            self._set_total(max_steps)
        if self._total is None and not self._warned:
            self._warned = True
            logger.warning("RefController: no total_steps or max_steps given, so the Ref injection window "
                           "is unknown and λ stays 0 (divergence and overfit detection still run)")
        s = self._s
        s["t"] = t = s["t"] + 1

        # 1. overfit bookkeeping (seed order: validation first)
        h, n = s["val_history"], s["val_count"]
        overfit = (n >= 4) & (h[-3:] > h[-4:-1]).all()
        if self._k < HISTORY:  # K = 20 needs 21 values in a 20-long history: never improving
            improving = (n >= self._k + 1) & (h[-self._k:] < h[-self._k - 1:-1]).all()
        else:
            improving = torch.zeros_like(overfit)
        run = torch.where(s["suspended"] & improving, s["improve_run"] + 1, 0)
        cleared = run >= self._k
        s["suspended"] = (s["suspended"] & ~cleared) | overfit
        s["improve_run"] = torch.where(cleared, 0, run)

        # 2. divergence level: the larger of the loss's and the log grad norm's z-score's
        log_g = g.log()
        z = self._gnorm_z(log_g)
        g_level = self._detect("gnorm", log_g, z, torch.ones_like(s["loss_seen"]), self.gnorm_z)
        # Both signals count: a fed loss does not reveal a gradient spike that leaves the loss alone
        # (an overflowing fp16 batch, say), and the gradient norm alone misses a loss that creeps up.
        level = torch.maximum(s["loss_pending"], g_level)
        s["loss_pending"] = torch.zeros_like(level)

        # 3. actions
        allowed = (t >= self._lo) & (t <= self._hi) & (level == 0) & ~s["suspended"]
        lam = allowed.to(torch.float32) * self.ref_alpha
        if self.repair:
            # A spike is skipped and costs nothing else; only a divergence that lasts pull_after flagged
            # steps in a row pulls z back (a pull on a passing spike threw away the iterate's progress).
            sustained = torch.maximum(s["gnorm_run"], s["loss_run"]) >= self.pull_after
            rung = self._ladder.gather(0, level.reshape(1)).reshape(())
            pull, skip = torch.where(sustained, rung, 0.0), level >= self.skip_level
        else:
            pull, skip = torch.zeros_like(lam), torch.zeros_like(allowed)
        s["lam"], s["pull"], s["level"] = lam, pull, level
        # A skipped step leaves the clock too: the window then falls on the same updates as in a run
        # without the bad batch (with the clock running on, the spiked run lost 3 injected updates at
        # the window's end, which alone cost up to 1.5% of final loss on a small MLP).
        s["t"] = torch.where(skip, t - 1, t)
        s["repairs"] = s["repairs"] + (pull > 0).long()
        s["skips"] = s["skips"] + skip.long()
        s["flagged_steps"] = s["flagged_steps"] + (level > 0).long()
        return Decision(lam, pull, skip, level)

    def standing(self) -> Decision:
        """The last decision's λ and pull, without its skip: what a fused backward pass applies during the
        next backward, whose own signals are known only once it ends. Kept in the state, so a resumed run
        applies the same."""
        s = self._s
        return Decision(s["lam"], s["pull"], torch.zeros((), dtype=torch.bool, device=self.device), s["level"])

    def spike_so_far(self, seen_sq: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Fused backward pass: whether the step being applied tensor by tensor is already known to be at
        level ``skip_level`` or more, before its global norm is (a 0-d bool; never while warming up, or
        with ``repair=False``).

        ``seen_sq``: the sum of the squared (unclipped) norms of the gradients seen so far in this
        backward; ``share``: the share of the previous step's squared global norm those tensors held
        (0: unknown). Two estimates of the log global norm are tested against the running statistics,
        with the z-score threshold of ``skip_level``: ``½·log seen_sq``, a lower bound, so certain,
        and, once ``share ≥`` :data:`MIN_SHARE`, the projection ``½·log(seen_sq / share)``, which sees a
        spike that hits every tensor alike from its first tensors on. A loss fed by :meth:`observe`
        before backward counts too.
        """
        s = self._s
        if not self.repair or self.skip_level > 3:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        threshold = self.gnorm_z[self.skip_level - 1]
        log_seen = 0.5 * seen_sq.to(self.device, torch.float32).log()
        share = share.to(self.device, torch.float32)
        bound = self._gnorm_z(log_seen) > threshold
        projected = (share >= MIN_SHARE) & (self._gnorm_z(log_seen - 0.5 * share.log()) > threshold)
        return ((s["gnorm_count"] >= self.warmup) & (bound | projected)) | (s["loss_pending"] >= self.skip_level)

    def _gnorm_z(self, log_norm: torch.Tensor) -> torch.Tensor:
        """The z-score of a log gradient norm against the running statistics (σ at least ``gnorm_min_std``)."""
        s = self._s
        return (log_norm - s["gnorm_ema"]) / s["gnorm_var"].sqrt().clamp(min=self.gnorm_min_std)

    def _global_norm(self, signals: Signals) -> torch.Tensor:
        """The caller's measured norm, else the unclipped one from the recorded and seen norms."""
        fed, self._fed_grad_norm = self._fed_grad_norm, None
        if signals.grad_norm is not None:
            return signals.grad_norm
        if fed is not None:
            return fed
        seen = signals.seen_norms
        seen = torch.zeros(0, device=self.device) if seen is None else seen.to(self.device, torch.float32)
        if signals.backward_norms is None:
            return torch.linalg.vector_norm(seen)
        return self.unclipped_norm(signals.backward_norms.to(self.device), seen)

    def unclipped_norm(self, raw: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The global gradient norm before the trainer clipped it, from per-tensor norms.

        ``raw[i]`` is tensor i's gradient norm when backward accumulated it
        (0 where none was recorded), ``seen[i]`` its norm at ``step()``. In
        between, trainers rescale uniformly: an fp16 loss scaler's unscale
        (÷ S, S a power of two) and clipping (× k ≤ 1). On a step that was not
        clipped ``raw/seen`` is exactly S; that ratio, when it is a power of
        two, updates the stored ``log2 S``. The result is
        ``‖max(raw_i / S, seen_i)‖``: the recorded norm in the gradient's own
        units, and never less than what ``step()`` sees (a gradient enlarged
        after backward counts too).
        """
        recorded = raw > 0
        seen_recorded = torch.linalg.vector_norm(torch.where(recorded, seen, 0.0))
        log2_ratio = torch.log2(torch.linalg.vector_norm(raw)) - torch.log2(seen_recorded)
        k = log2_ratio.round()
        exact = torch.isfinite(log2_ratio) & ((log2_ratio - k).abs() < SCALE_TOLERANCE)
        s = self._s["grad_scale_log2"] = torch.where(exact, k.clamp(min=0), self._s["grad_scale_log2"])
        return torch.linalg.vector_norm(torch.maximum(raw * torch.exp2(-s), seen))

    @property
    def total_steps(self) -> int | None:
        """The planned training length ``T`` in force (None: unknown)."""
        return self._total

    GROUP_STATS = ("lam", "divergence_level", "repairs", "skips", "flagged_steps", "overfit")
    """The :meth:`stats` an optimizer mirrors into each of its param groups."""

    def stats(self) -> dict[str, torch.Tensor]:
        s = self._s
        return {"lam": s["lam"].clone(), "divergence_level": s["level"].clone(), "repairs": s["repairs"].clone(),
                "skips": s["skips"].clone(), "flagged_steps": s["flagged_steps"].clone(),
                "overfit": s["suspended"].to(torch.float32), "controller_steps": s["t"].clone()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._s.items()}

    # -- in an optimizer's state_dict: the settings and the state, under two keys ------------------
    CONFIG_KEY, STATE_KEY = "ref_config", "ref_controller"

    def checkpoint(self) -> dict[str, Any]:
        """What an optimizer's ``state_dict()`` holds of this controller. Like the param groups'
        hyperparameters, the settings (``ref_alpha``, ``ref_window``, ``repair``) are restored on load."""
        return {self.CONFIG_KEY: {"ref_alpha": self.ref_alpha, "ref_window": tuple(self.ref_window),
                                  "repair": self.repair},
                self.STATE_KEY: self.state_dict()}

    def restored(self, state_dict: Mapping[str, Any]) -> RefController:
        """A new controller with this one's tunables and device and the settings and state that an
        optimizer ``state_dict`` holds (see :meth:`checkpoint`); ``self`` is not changed."""
        missing = {self.CONFIG_KEY, self.STATE_KEY} - set(state_dict)
        if missing:
            raise ValueError(f"the state_dict lacks {sorted(missing)}: it does not come from RefAdamWMiniSF "
                             "(an optimizer with a Ref controller)")
        config = state_dict[self.CONFIG_KEY]
        if not isinstance(config, Mapping) or set(config) != {"ref_alpha", "ref_window", "repair"}:
            raise ValueError(f"the state_dict's {self.CONFIG_KEY!r} is malformed")
        controller = RefController(config["ref_alpha"], tuple(config["ref_window"]), None, config["repair"],
                                   self.device, **self._tunables)
        controller.load_state_dict(state_dict[self.STATE_KEY])
        return controller

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Check every key, dtype and shape first; on any error ``self`` is left unchanged."""
        if not isinstance(state, Mapping):
            raise TypeError(f"RefController state must be a mapping, got {type(state).__name__}")
        missing, extra = set(_STATE) - set(state) - _OPTIONAL, set(state) - set(_STATE)
        if missing or extra:
            raise ValueError(f"RefController state: missing keys {sorted(missing)}, unexpected {sorted(extra)}")
        new = {}
        for k, (dtype, shape) in _STATE.items():
            v = state[k] if k in state else torch.zeros(shape, dtype=dtype)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"RefController state[{k!r}] must be a tensor, got {type(v).__name__}")
            if v.dtype != dtype or tuple(v.shape) != shape:
                raise ValueError(f"RefController state[{k!r}] must be {dtype} of shape {shape}, "
                                 f"got {v.dtype} of shape {tuple(v.shape)}")
            new[k] = v.detach().to(self.device).clone()
        total = int(new["total_steps"])  # load time only, never in observe()/decide()
        if total < 0:
            raise ValueError(f"RefController state['total_steps'] must be >= 0, got {total}")
        self._s = new
        self._set_total(total or None)

    def to(self, device: torch.device | str) -> RefController:
        self.device = torch.device(device)
        self._s = {k: v.to(self.device) for k, v in self._s.items()}
        self._ladder = self._ladder.to(self.device)
        return self
