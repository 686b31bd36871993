r"""The seed's arithmetic (SPEC.md §2), kept for reproducing old runs only.

**Unstable by design.** This is what ``RefAdamWminiScheduleFree`` /
``AdamWminiScheduleFree`` computed, defects included (SPEC.md §2 "Defects"):
no bias correction, a step size that grows up to ``max_lr`` when gradient
norms shrink, and an injection into the gradient moment that diverged on
every run we measured (docs/migrating.md). Use :class:`refadamw.RefAdamWMiniSF`
for new work.

Per parameter ``p`` with gradient ``g``, each step (one global counter ``t``)::

    m ← β1·m + (1−β1)·g                      # no bias correction
    v ← β2·v + (1−β2)·g²
    n = ‖g‖₂                                 # a Python float (host sync, as the seed)
    ē = n  on the tensor's first step, else (1−α)·ē + α·n     # α = schedulefree_alpha
    η = clamp(lr·ē/(n + 1e-12), min_lr, max_lr)
    p ← p − weight_decay·η·p
    p ← p − η·m/(sqrt(v) + eps)

Then, only when ``step`` received ``loss`` (:class:`LegacyRefAdamWminiScheduleFree`)::

    level = 3, 2, 1, 0   for   r = loss_t/(loss_prev + 1e-8)  >2.0, >1.5, >1.2, else
    λ = 1.0 if level 3 or ≥3 divergent steps in a row, 0.8 if level 2 or 2,
        0.6 if level 1 or 1, else ref_alpha
    if 0.2 ≤ t/T ≤ 0.8 (t/T = 0.5 without T) and not skip:
        m ← (1−λ)·m + λ·p                     # p after this step's update

``skip`` is set by four strictly rising ``val_loss`` values and cleared by
``K`` consecutive ``improving`` val-loss steps, ``K = min(20, max(10,
int(1e-4·M)))`` with ``M`` = this call's ``max_steps`` or 1000; ``improving``
means the newest ``K`` values each fell. Both are updated on steps that
receive ``val_loss`` (the history is the last 20 values).

What differs from the seed, on purpose:

* state and math are fp32 whatever ``dtype`` says (fp64 for fp64
  parameters); bf16/fp16 parameters are updated in fp32 and rounded to
  nearest once per step. With fp32 parameters and ``dtype`` unset or fp32
  the update is the seed's own op sequence.
* no prints; where the seed raised ``IndexError`` (a val-loss history that
  falls all the way back to its start), the improvement count stops there.
* parameters that never had a gradient are left out of the injection (the
  seed raised ``KeyError``).
* the controller state is in ``state_dict()``; ``train()``/``eval()`` exist
  and do nothing (there is no averaged copy), so kohya sd-scripts can call them.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..validation import check_number, check_steps
from ..precision import parse_state_dtype
from .legacy_controller import LegacyController

logger = logging.getLogger("refadamw")

_noted: set[str] = set()


def note_once(key: str, message: str) -> None:
    """Log ``message`` once per process (per ``key``)."""
    if key not in _noted:
        _noted.add(key)
        logger.warning(message)


def check_seed_dtype(name: str, value: Any) -> None:
    """``None``, a floating ``torch.dtype`` or a dtype name such as ``"bf16"``."""
    if value is None:
        return
    if isinstance(value, torch.dtype):
        if not value.is_floating_point or value.is_complex:
            raise ValueError(f"{name} must be a floating-point dtype, got {value}")
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None, a torch.dtype or a string such as 'bf16', got {value!r}")
    parse_state_dtype(value)  # raises ValueError naming the known names


def _as_float(name: str, value: Any) -> float | None:
    """A loss signal as a Python float (the seed worked on floats; this may sync)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        return float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}")
    return float(value)


def _validate(g: Mapping[str, Any]) -> None:
    for name in ("lr", "eps", "weight_decay", "min_lr", "max_lr", "schedulefree_alpha"):
        if isinstance(g[name], torch.Tensor):  # the seed's arithmetic is on Python floats
            raise TypeError(f"{name} must be a Python number in legacy mode, got a tensor")
    check_number("lr", g["lr"], 0.0)
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, 0.0, high=1.0, high_open=True)
    check_number("eps", g["eps"], 0.0, low_open=True)
    check_number("weight_decay", g["weight_decay"], 0.0)
    check_number("min_lr", g["min_lr"], 0.0)
    check_number("max_lr", g["max_lr"], 0.0)
    if g["min_lr"] > g["max_lr"]:
        raise ValueError(f"min_lr ({g['min_lr']}) must not exceed max_lr ({g['max_lr']})")
    check_number("schedulefree_alpha", g["schedulefree_alpha"], 0.0, high=1.0)
    check_seed_dtype("dtype", g.get("dtype"))


class LegacyAdamWminiScheduleFree(torch.optim.Optimizer):
    """The seed's ``AdamWminiScheduleFree`` update, in fp32 (see the module doc).

    Unstable; for reproducing old runs only. ``step`` takes the seed
    ``RefAdamWminiScheduleFree`` signature so both front doors share it;
    ``loss``, ``max_steps`` and ``val_loss`` are checked and ignored here.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, min_lr: float = 1e-6, max_lr: float = 1e-2,
                 schedulefree_alpha: float = 0.05, dtype: torch.dtype | str | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, min_lr=min_lr, max_lr=max_lr,
                        schedulefree_alpha=schedulefree_alpha, dtype=dtype)
        _validate(defaults)
        super().__init__(params, defaults)
        note_once("legacy", f"{type(self).__name__}: legacy=True reproduces the original arithmetic, which is "
                            "unstable (no bias correction, injection into the gradient moment); use it only to "
                            "reproduce old runs (docs/migrating.md)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate(group)
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"parameters must be real floating point, got a {p.dtype} parameter")
        except Exception:
            self.param_groups.pop()
            raise
        if group["dtype"] not in (None, torch.float32, "fp32", "float32"):
            note_once("legacy-dtype", f"legacy mode keeps its state in fp32; dtype={group['dtype']!r} is ignored")

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None, loss=None, max_steps=None, val_loss=None):
        """One seed step; returns the closure's loss, if any."""
        return self._legacy_step(closure, loss, max_steps, val_loss)

    def _legacy_step(self, closure, loss, max_steps, val_loss):
        loss, val_loss = _as_float("loss", loss), _as_float("val_loss", val_loss)
        check_steps("max_steps", max_steps)
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        lam = self._before_update(loss, max_steps, val_loss)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        if lam is not None:
            self._inject(lam)
        return closure_loss

    def _before_update(self, loss, max_steps, val_loss) -> float | None:
        """The controller's share λ for this step, or None (no controller here)."""
        return None

    def _update(self, p: torch.Tensor, group: Mapping[str, Any]) -> None:
        if p.grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = p.grad.to(dtype)
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        norm = g.norm().item()  # the seed's host sync, one per tensor
        alpha = group["schedulefree_alpha"]
        ema = norm if "grad_norm_ema" not in state else (1 - alpha) * state["grad_norm_ema"] + alpha * norm
        state["grad_norm_ema"] = ema
        eta = max(min(group["max_lr"], group["lr"] * (ema / (norm + 1e-12))), group["min_lr"])
        # Same op order as the seed, so fp32 parameters get its exact fp32 result.
        work = p if p.dtype == dtype else p.to(dtype)
        if group["weight_decay"] != 0:
            work.add_(work, alpha=-group["weight_decay"] * eta)
        work.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-eta)
        if work is not p:
            p.copy_(work)  # one round-to-nearest into bf16/fp16 parameters

    def _inject(self, lam: float) -> None:
        """m ← (1−λ)·m + λ·p for every parameter that has state."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    m = state["exp_avg"]
                    m.mul_(1 - lam).add_(p.to(m.dtype), alpha=lam)

    # -------------------------------------------------------------- modes

    def train(self) -> None:
        """No-op: the seed keeps no averaged copy of the weights (kohya calls this)."""

    def eval(self) -> None:
        """No-op: the parameters are already the weights to evaluate and save."""

    # ---------------------------------------------------------- state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict of this class; ``m``/``v`` stay fp32 whatever the parameter dtype."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        for i, group in enumerate(state_dict["param_groups"]):
            if not isinstance(group, Mapping) or not set(self.defaults) | {"params"} <= set(group):
                raise ValueError(f"param group {i} of the state_dict does not come from {type(self).__name__}")
            _validate(group)
        for key, saved in state_dict["state"].items():
            if not isinstance(saved, Mapping) or not {"exp_avg", "exp_avg_sq"} <= set(saved):
                raise ValueError(f"state of parameter {key} does not come from {type(self).__name__}")
        extra = self._checked_extra(state_dict)  # before anything changes
        super().load_state_dict(state_dict)
        self._apply_extra(extra)
        # torch casts floating state to the parameter dtype; legacy state is fp32 (fp64 for fp64).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for key, p in zip(saved_ids, params):
            saved = state_dict["state"].get(key)
            if saved is not None:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                for name in ("exp_avg", "exp_avg_sq"):
                    self.state[p][name] = saved[name].detach().to(device=p.device, dtype=dtype, copy=True)

    def _checked_extra(self, state_dict: Mapping[str, Any]) -> Any:
        """What a subclass keeps beside the per-parameter state, checked (nothing here)."""
        return None

    def _apply_extra(self, extra: Any) -> None:
        """Install what :meth:`_checked_extra` returned."""


class LegacyRefAdamWminiScheduleFree(LegacyAdamWminiScheduleFree):
    """The seed's ``RefAdamWminiScheduleFree``: the update above plus its controller
    (:mod:`refadamw.compat.legacy_controller`), in fp32. Unstable; for reproducing old runs only.

    ``ref_window``, ``ref_base_eps`` and ``ref_min_eps`` are accepted and unused, as in the seed.
    ``ref_max_steps`` is ``T`` when ``step`` gets no ``max_steps``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, min_lr: float = 1e-6, max_lr: float = 1e-2,
                 schedulefree_alpha: float = 0.05, dtype: torch.dtype | str | None = None, ref_alpha: float = 0.5,
                 ref_window: int = 20, ref_base_eps: float = 1e-3, ref_min_eps: float = 1e-5,
                 ref_max_steps: int | None = None) -> None:
        check_number("ref_alpha", ref_alpha, 0.0, high=1.0)
        check_unused_seed_args(ref_window, ref_base_eps, ref_min_eps)
        check_steps("ref_max_steps", ref_max_steps)
        super().__init__(params, lr, betas, eps, weight_decay, min_lr, max_lr, schedulefree_alpha, dtype)
        self.controller = LegacyController(float(ref_alpha), ref_max_steps)

    @torch.no_grad()
    def step(self, closure=None, loss=None, max_steps=None, val_loss=None):
        """One seed step; ``loss`` drives divergence and injection, ``val_loss`` the overfit skip,
        ``max_steps`` is ``T`` (and ``M`` in ``K``). Returns the closure's loss, if any."""
        return self._legacy_step(closure, loss, max_steps, val_loss)

    def _before_update(self, loss, max_steps, val_loss) -> float | None:
        return self.controller.advance(loss, max_steps, val_loss)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state_dict plus the controller's (the seed lost it on resume)."""
        state = super().state_dict()
        state["legacy_controller"] = self.controller.state_dict()
        return state

    def _checked_extra(self, state_dict: Mapping[str, Any]) -> LegacyController:
        return LegacyController.from_state_dict(state_dict.get("legacy_controller"))

    def _apply_extra(self, extra: LegacyController) -> None:
        self.controller = extra


def check_unused_seed_args(ref_window: Any, ref_base_eps: Any, ref_min_eps: Any) -> None:
    """The seed accepted these and never read them: type-check them, then ignore them."""
    if isinstance(ref_window, bool) or not isinstance(ref_window, int):
        raise TypeError(f"ref_window (unused by the original optimizer) must be an int, got {ref_window!r}")
    for name, value in (("ref_base_eps", ref_base_eps), ("ref_min_eps", ref_min_eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} (unused by the original optimizer) must be a number, got {value!r}")
