"""The seed's Ref controller (SPEC.md §2), as plain Python floats.

A small state machine, read as a table:

================================  =========================================
signal                            effect
================================  =========================================
``val_loss`` (kept: last 20)      four strictly rising values → ``skip``;
                                  while ``skip``: ``K`` improving val-loss
                                  steps in a row clear it
``loss`` ratio to previous loss   >2.0 / >1.5 / >1.2 → level 3 / 2 / 1;
                                  a level > 0 extends the divergent run
level or run length               λ = 1.0 / 0.8 / 0.6 at 3 / 2 / 1, else
                                  ``ref_alpha``
``t/T`` in [0.2, 0.8], no skip    inject λ (only on steps given ``loss``)
================================  =========================================

This is the seed's logic, kept for reproducing old runs; it syncs with the
host and is not the product's controller (:mod:`refadamw.controller`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HISTORY = 20
WINDOW = (0.2, 0.8)
LADDER = ((2.0, 3), (1.5, 2), (1.2, 1))   # loss ratio above → divergence level
LEVEL_LAMBDA = {3: 1.0, 2: 0.8, 1: 0.6}   # λ at a level, or after that many divergent steps in a row

_STATE_KEYS = ("step", "prev_loss", "divergent_steps", "val_history", "skip", "improving_steps")


def improvements_needed(max_steps: int | None) -> int:
    """K = min(20, max(10, int(1e-4·M))), M = this call's max_steps or 1000 (never ref_max_steps)."""
    return min(20, max(10, int(1e-4 * (max_steps if max_steps is not None else 1000))))


def improving_run(history: list[float], limit: int) -> int:
    """How many of the newest values each fell below the one before, counting at most ``limit``.

    The seed read past the start of the history here (IndexError); this stops there.
    """
    run = 0
    while run < limit and run + 1 < len(history) and history[-run - 1] < history[-run - 2]:
        run += 1
    return run


class LegacyController:
    """Global step counter, divergence ladder and overfit skip of the seed."""

    def __init__(self, ref_alpha: float, total_steps: int | None) -> None:
        self.ref_alpha = ref_alpha
        self.total_steps = total_steps
        self.step = 0
        self.prev_loss: float | None = None
        self.divergent_steps = 0
        self.val_history: list[float] = []
        self.skip = False
        self.improving_steps = 0

    def advance(self, loss: float | None, max_steps: int | None, val_loss: float | None) -> float | None:
        """Count the step and return λ to inject after the update, or None for no injection."""
        self.step += 1
        if val_loss is not None:
            self._observe_val_loss(val_loss, max_steps)
        if loss is None:
            return None  # the seed's controller runs only on steps given a loss
        level = self._divergence_level(loss)
        self.divergent_steps = self.divergent_steps + 1 if level > 0 else 0
        if self.skip or not self._in_window(max_steps):
            return None
        for rung in (3, 2, 1):
            if level >= rung or self.divergent_steps >= rung:
                return LEVEL_LAMBDA[rung]
        return self.ref_alpha

    def _observe_val_loss(self, val_loss: float, max_steps: int | None) -> None:
        h = self.val_history
        h.append(val_loss)
        del h[:-HISTORY]
        if len(h) >= 4 and h[-4] < h[-3] < h[-2] < h[-1]:
            self.skip = True  # overfit
        k = improvements_needed(max_steps)
        if self.skip:
            self.improving_steps = self.improving_steps + 1 if improving_run(h, k) >= k else 0
            if self.improving_steps >= k:
                self.skip, self.improving_steps = False, 0

    def _divergence_level(self, loss: float) -> int:
        prev, self.prev_loss = self.prev_loss, loss
        if prev is None:
            return 0
        ratio = loss / (prev + 1e-8)
        return next((level for threshold, level in LADDER if ratio > threshold), 0)

    def _in_window(self, max_steps: int | None) -> bool:
        total = max_steps if max_steps is not None else self.total_steps
        progress = self.step / total if total else 0.5
        return WINDOW[0] <= progress <= WINDOW[1]

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"ref_alpha": self.ref_alpha, "total_steps": self.total_steps, "step": self.step,
                "prev_loss": self.prev_loss, "divergent_steps": self.divergent_steps,
                "val_history": list(self.val_history), "skip": self.skip, "improving_steps": self.improving_steps}

    @classmethod
    def from_state_dict(cls, state: Any) -> LegacyController:
        if not isinstance(state, Mapping) or not set(_STATE_KEYS) | {"ref_alpha", "total_steps"} <= set(state):
            raise ValueError("the state_dict's 'legacy_controller' is missing or malformed")
        for name in ("step", "divergent_steps", "improving_steps"):
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"legacy_controller['{name}'] must be an int >= 0, got {state[name]!r}")
        if not isinstance(state["val_history"], (list, tuple)) or len(state["val_history"]) > HISTORY:
            raise ValueError(f"legacy_controller['val_history'] must be a list of at most {HISTORY} floats")
        controller = cls(float(state["ref_alpha"]), state["total_steps"])
        controller.step, controller.divergent_steps = state["step"], state["divergent_steps"]
        controller.improving_steps = state["improving_steps"]
        controller.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        controller.val_history = [float(v) for v in state["val_history"]]
        controller.skip = bool(state["skip"])
        return controller
