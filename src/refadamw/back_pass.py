"""The fused backward pass: each parameter is stepped as backward produces its gradient, which is then freed.

The gradients then never exist all at once: a step holds one tensor's gradient at a time instead of
2–4 bytes per parameter (the diffusion trainers' ``--fused_backward_pass``; Adafactor's in kohya
sd-scripts, and OneTrainer's ``step_parameter`` interface). Three pieces:

* the optimizer's mode, ``AdamWMiniSF(..., fused_back_pass=True)``: :meth:`step_parameter` (OneTrainer's
  name; ``step_param`` is kohya's) applies one parameter's update, the same
  :func:`refadamw.kernels.update` that ``step()`` applies to a whole group, and ``step()`` only
  finishes the step's bookkeeping. Inside backward, tensors under :data:`STAGE_NUMEL` elements are held
  and applied together in one call (by the end of that backward at the latest);
* :class:`BackwardRound`: what one backward's per-parameter steps add up to (group stats, the norms the
  controller reads, the held small gradients), kept by the optimizer between its first
  ``step_parameter`` and ``step()``;
* :func:`fused_backward`: the hooks for a plain PyTorch loop, with optional clipping.

What needs every gradient at once is decided without them (docs/fused_backward.md):

* **non-finite gradients**: each kernel call's own hygiene gate (one tensor, or the small ones held
  together); with a controller, the rest of the backward
  is skipped too once one is seen (the tensors already stepped stay stepped);
* **the controller's signal**: the global norm is assembled tensor by tensor and fed to ``decide()``
  when the backward ends, so λ and the repair pull it decides apply from the next step on;
* **the level-2/3 skip** of a spiking step: :meth:`RefController.spike_so_far` tests the norm seen so far
  (a lower bound of the global norm) and its projection by the previous step's share, against the
  controller's running statistics, before each kernel call; from the first call that shows the spike
  on, the rest of the backward is skipped;
* **clipping**: :func:`fused_backward` scales each gradient by ``min(1, c / n̂)``, ``n̂`` the larger of
  the previous backward's global norm and the norm seen so far in this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .validation import check_number


STAGE_NUMEL = 1 << 19
"""Inside backward, a tensor under this many elements is not stepped on its own: its gradient is held and
applied with the other small ones in one kernel call (a call's fixed cost, about 0.2 ms on CPU, would
otherwise dominate a transformer's or LoRA's hundreds of tensors; with 2^16 and 2^21 the step suite's
transformer took 1.54× the ordinary step, with these 1.22×)."""
FLUSH_NUMEL = 1 << 22
"""The held small gradients are applied once they reach this many elements (16 MB in fp32), or when the
backward ends (an autograd callback), whichever comes first."""


class BackwardRound:
    """One backward's per-parameter steps: which parameters were stepped, the small tensors' gradients held
    to be applied together, per group whether every update applied and the sums of their lr and step
    size, and, with a controller, the norms it reads and the skip decided so far (0-d tensors: nothing
    syncs)."""

    def __init__(self, device: torch.device, previous_sq: dict[torch.Tensor, torch.Tensor] | None = None,
                 previous_total: torch.Tensor | None = None) -> None:
        self.stepped: dict[torch.Tensor, None] = {}  # insertion-ordered set
        self.groups: dict[int, dict[str, Any]] = {}
        self.seen: list[torch.Tensor] = []
        self.recorded: list[torch.Tensor | None] = []
        self.sq_by_param: dict[torch.Tensor, torch.Tensor] = {}
        self.sq = torch.zeros((), device=device)
        self.share = torch.zeros((), device=device)
        self.skip = torch.zeros((), dtype=torch.bool, device=device)
        self._previous_sq, self._previous_total = previous_sq or {}, previous_total
        self.staged: list[tuple[dict[str, Any], int, torch.Tensor]] = []
        self.staged_numel = 0
        self.flush_task: int | None = None  # the backward whose end applies what is held
        self.lr_free: dict[int, dict[str, Any]] = {}

    def stage(self, group: dict[str, Any], index: int, grad: torch.Tensor) -> bool:
        """Hold a small tensor's gradient (held here, the caller may drop ``p.grad``); True once
        :data:`FLUSH_NUMEL` elements are held."""
        self.staged.append((group, index, grad))
        self.staged_numel += grad.numel()
        return self.staged_numel >= FLUSH_NUMEL

    def take_staged(self) -> list[tuple[dict[str, Any], list[int], list[torch.Tensor]]]:
        """The held gradients as ``(group, indices, grads)`` per group, in the order held; forgotten."""
        by_group: dict[int, tuple[dict[str, Any], list[int], list[torch.Tensor]]] = {}
        for group, index, grad in self.staged:
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(index)
            entry[2].append(grad)
        self.staged, self.staged_numel = [], 0
        return list(by_group.values())

    def has(self, param: torch.Tensor) -> bool:
        return param in self.stepped

    def mark(self, param: torch.Tensor) -> None:
        self.stepped[param] = None

    def see(self, param: torch.Tensor, seen: torch.Tensor, recorded: torch.Tensor | None) -> None:
        """Add a tensor's norm as the update sees it and as backward recorded it, before a clip (None: not
        recorded); the larger counts toward the global norm, as in ``unclipped_norm``."""
        norm = seen.to(self.sq.device, torch.float32)
        if recorded is not None:
            norm = torch.maximum(norm, recorded.to(norm.device, torch.float32))
        square = norm.square()
        self.sq = self.sq + square
        self.sq_by_param[param] = square
        previous = self._previous_sq.get(param)
        if previous is not None:
            self.share = self.share + previous / self._previous_total
        self.seen.append(seen)
        self.recorded.append(recorded)

    def record(self, group: dict[str, Any], applied: torch.Tensor, lr: torch.Tensor, effective_lr: torch.Tensor,
               count: int) -> None:
        """Add one kernel call's report: ``count`` tensors of ``group``, ``lr`` and ``effective_lr`` their means."""
        entry = self.groups.get(id(group))
        if entry is None:
            self.groups[id(group)] = {"group": group, "applied": applied, "lr": lr * count,
                                      "effective_lr": effective_lr * count, "count": count}
            return
        entry["applied"] = entry["applied"] & applied
        entry["lr"] = entry["lr"] + lr * count
        entry["effective_lr"] = entry["effective_lr"] + effective_lr * count
        entry["count"] += count

    def record_lr_free(self, group: dict[str, Any], indices: list[int], dots: torch.Tensor, l1: torch.Tensor,
                       a: torch.Tensor, pull: torch.Tensor | None) -> None:
        """Add one kernel call's per-tensor lr-free sums (:mod:`refadamw.lr_free`); ``a`` is the step's weight,
        ``pull`` the controller's pull as that call applied it (None without a controller): the step size is cut
        only when every call of the group pulled."""
        entry = self.lr_free.get(id(group))
        if entry is None:
            entry = self.lr_free[id(group)] = {"group": group, "indices": [], "dots": [], "l1": [], "a": a,
                                               "pull": pull}
        elif pull is not None:
            entry["pull"] = torch.minimum(entry["pull"], pull)
        entry["indices"] += indices
        entry["dots"].append(dots)
        entry["l1"].append(l1)

    def take_lr_free(self) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor | None]]:
        """Per lr-free group: ``(group, dots, l1, applied, a, pull)``, the sums in the group's parameter order, as
        ``step()`` adds them, so the estimate is the same bit for bit."""
        out = []
        for key, entry in self.lr_free.items():
            order = sorted(range(len(entry["indices"])), key=entry["indices"].__getitem__)
            at = torch.tensor(order, device=entry["a"].device)
            applied = self.groups[key]["applied"]
            out.append((entry["group"], torch.cat(entry["dots"])[at], torch.cat(entry["l1"])[at], applied, entry["a"],
                        entry["pull"]))
        return out

    def finish_stats(self) -> None:
        """Add this backward to each stepped group's stats: a step applied when every update of the group
        applied, skipped otherwise; lr and step size are the means over its tensors."""
        for entry in self.groups.values():
            stats = entry["group"]["stats"]
            applied = entry["applied"].to(stats["steps"])
            stats["steps"].add_(applied)
            stats["skipped_steps"].add_(1 - applied)
            stats["lr"].copy_(entry["lr"] / entry["count"])
            stats["effective_lr"].copy_(entry["effective_lr"] / entry["count"])

    def shares(self) -> tuple[dict[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Each tensor's squared norm and their sum, the next backward's reference for its shares."""
        return self.sq_by_param, self.sq


class FusedBackward:
    """The hooks :func:`fused_backward` registered; :meth:`remove` takes them out."""

    def __init__(self, optimizer, params: list[tuple[torch.Tensor, int, int]], max_grad_norm: float | None):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self._seen: set[torch.Tensor] = set()
        self._sq: torch.Tensor | None = None
        self._previous_norm: torch.Tensor | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(group_index, index))
                         for p, group_index, index in params]

    def _hook(self, group_index: int, index: int):
        def step(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if self.max_grad_norm is not None:
                self._clip(param)
            # the group is looked up now: a load_state_dict (accelerate's prepare does one) replaces the dicts
            self.optimizer.step_parameter(param, self.optimizer.param_groups[group_index], index)
            param.grad = None
        return step

    def _clip(self, param: torch.Tensor) -> None:
        if param in self._seen:  # a new backward: the last one's norm is the reference
            self._previous_norm, self._sq = self._sq.sqrt(), None
            self._seen.clear()
        self._seen.add(param)
        grad = param.grad
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self._sq = square if self._sq is None else self._sq + square
        estimate = self._sq.sqrt() if self._previous_norm is None else torch.maximum(self._previous_norm,
                                                                                     self._sq.sqrt())
        grad.mul_((self.max_grad_norm / (estimate + 1e-6)).clamp(max=1.0).to(grad.dtype))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def fused_backward(model: torch.nn.Module | Iterable[torch.Tensor], optimizer, *,
                   max_grad_norm: float | None = None) -> FusedBackward:
    """Step ``optimizer`` inside backward, one parameter at a time, and free each gradient at once.

    ``model``: the module (or its parameters) whose backward drives the steps; every parameter of
    ``optimizer`` that requires a gradient must be in it. ``optimizer``: one built with
    ``fused_back_pass=True`` (or any with ``supports_fused_back_pass()`` and ``step_parameter``).
    ``max_grad_norm``: clip each gradient by ``min(1, max_grad_norm / n̂)``, ``n̂`` the larger of the
    previous backward's global norm and the norm of the gradients seen so far in this one (the
    global norm of this backward is not known until it ends; None: no clipping).

    The loop is then ``loss.backward(); optimizer.step(); optimizer.zero_grad()``: ``step()``
    finishes the step's bookkeeping. Gradient accumulation cannot work (each backward steps) and a
    closure cannot either; both are refused. Returns a handle whose ``remove()`` takes the hooks out.
    """
    supports = getattr(optimizer, "supports_fused_back_pass", None)
    if not callable(supports) or not supports() or not callable(getattr(optimizer, "step_parameter", None)):
        raise TypeError(f"{type(optimizer).__name__} has no fused backward pass (supports_fused_back_pass() and "
                        "step_parameter(p, group, i))")
    if getattr(optimizer, "fused_back_pass", True) is not True:
        raise ValueError(f"build the optimizer with fused_back_pass=True: {type(optimizer).__name__}.step() "
                         "would step every parameter a second time")
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, 0.0, low_open=True)
    in_model = {id(p) for p in (model.parameters() if isinstance(model, torch.nn.Module) else model)}
    params = []
    for group_index, group in enumerate(optimizer.param_groups):
        for index, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            if id(p) not in in_model:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in the optimizer is not in the model: "
                                 "its gradient would never be stepped")
            params.append((p, group_index, index))
    return FusedBackward(optimizer, params, max_grad_norm)
