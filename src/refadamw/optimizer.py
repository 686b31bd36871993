"""The optimizer class: arguments, param groups, lazy state, ``step()``, ``train()``/``eval()``, stats.

Bookkeeping only, in the style of ``torch.optim.adam``: ``_collect_group``
collects the parameters with gradients and their state, and ``step()`` hands
them to :func:`refadamw.kernels.update`, whose module docstring holds the
algorithm. The pieces it composes: :mod:`refadamw.param_state` (what each
parameter carries), :mod:`refadamw.validation` (argument checks), and an
optional controller (:mod:`refadamw.controller`) with the recorder of
backward gradient norms it reads (:mod:`refadamw.backward_norms`).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import back_pass, kernels, lr_free, param_state, sharding
from .averaging import x_to_y, y_to_x
from .back_pass import BackwardRound
from .backward_norms import BackwardNorms, as_vector
from .controller import RefController, Signals
from .precision import AUTO, Salt, compute_dtype, rounding_keys, write_back
from .validation import (NOT_GIVEN, check_alias, check_bool, check_grads, check_hyperparameters, check_seed,
                         check_signal, check_steps)

_STAT_KEYS = ("steps", "skipped_steps", "lr", "effective_lr")


class AdamWMiniSF(torch.optim.Optimizer):
    r"""AdamW with an Adam-mini block second moment and Schedule-Free averaging, and an optional controller.

    The update (SPEC.md §3) is written out in :mod:`refadamw.kernels`.
    Like ``schedulefree.AdamWScheduleFree``, the parameters hold the training
    point ``y`` in train mode and the average ``x`` after :meth:`eval`; call
    ``eval()`` before evaluating or saving weights and ``train()`` before
    training again. A new optimizer starts in train mode.

    The defaults (``lr=None``: the lr-free step size; ``betas=(0.92, 0.999)``,
    ``warmup_steps=20``, ``weight_decay=0.01``, ``averaging_power`` 1 lr-free and 0 with a fixed lr,
    ``auto_lr=False``, bf16 state) come
    from ``refadamw bench`` (docs/lr_free.md, docs/defaults.md, BENCHMARKS.md).

    Args:
        params: tensors, param-group dicts, or ``(name, tensor)`` pairs.
        lr: ``None`` (default): the lr-free step size, estimated per param group (below). A number:
            the peak learning rate (after warmup), exactly as given; nothing is estimated.
        lr_free: estimate the step size per param group (:mod:`refadamw.lr_free`, docs/lr_free.md).
            ``None`` (default): on exactly when ``lr`` is None; ``True`` with a number ``lr``
            ignores that number, with a warning (for trainers that always pass one).
        lr_free_scale: factor on the lr-free estimate (lr-free groups only).
        betas: ``(β1, β2)``; β1 is the Schedule-Free interpolation (or the
            momentum with ``schedule_free=False``), β2 the second-moment EMA.
        eps: added to ``sqrt(v̂)``.
        weight_decay: decoupled weight decay, applied at ``y``.
        warmup_steps: linear lr warmup length, in steps.
        averaging_power: ``r`` in the Schedule-Free weights ``w_t = t^r·lr_max_t²``
            (:mod:`refadamw.averaging`; schedulefree's ``r``): 0 is the lr²-weighted average, and a
            larger ``r`` weighs later iterates more. ``None`` (default): 1 in an lr-free group
            (:data:`refadamw.lr_free.AVERAGING_POWER`), 0 with a fixed lr (docs/defaults.md).
        auto_lr: scale each tensor's step by its gradient-norm EMA ratio.
        min_lr, max_lr: bounds on the auto-lr step; ``None`` means
            relative to the scheduled lr (see :mod:`refadamw.auto_lr`).
        norm_ema_alpha: EMA rate of the gradient-norm average (``schedulefree_alpha``,
            the seed's name, is accepted as an alias).
        mini: block-wise second moment; ``False`` for per-element ``v``.
        schedule_free: ``False`` gives AdamW-mini with momentum, for ablations.
        state_dtype: storage dtype of ``z − y`` (or the momentum): ``"auto"``
            (bf16; fp64 for fp64 parameters), ``"fp32"``, ``"bf16"``,
            ``"fp16"`` or a ``torch.dtype``. ``v`` is stored in the same dtype,
            except that it is never fp16. Writes into bf16/fp16 (state or
            parameters) are stochastically rounded (docs/precision.md).
        block_rows: dim-0 slices per second-moment block (e.g. rows per head).
            A param group may also hold ``block_layouts``: one layout spec per
            parameter (``None`` for the shape rule; see
            :func:`refadamw.partition.parse_spec`); :func:`refadamw.param_groups`
            fills it from the model (Conv1D and MoE expert weights).
        foreach: use the multi-tensor path (default) or the per-tensor one.
        fused: run the elementwise update fused: the CPU kernel, else one
            ``torch.compile``-generated pass per tensor. ``None`` (default)
            means yes wherever that works (``REFADAMW_COMPILE=0`` stays eager).
        seed: seed of the stochastic-rounding noise (a counter-based hash, so
            a resumed run replays the same noise).
        controller: an object that decides each step's Ref share, repair and
            skip from the step's :class:`refadamw.controller.Signals`
            (:class:`refadamw.controller.RefController`; None: none).
            :class:`RefAdamWMiniSF` is this class with one.
        fused_back_pass: step each parameter inside backward with :meth:`step_parameter`, as its
            gradient arrives, so the gradients never exist all at once; ``step()`` then only finishes
            the step (:mod:`refadamw.back_pass`, docs/fused_backward.md; the hooks:
            :func:`refadamw.fused_backward`).
    """

    def __init__(self, params: Iterable[Any], lr: float | None = None, betas: tuple[float, float] = (0.92, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, warmup_steps: int = 20, auto_lr: bool = False,
                 min_lr: float | None = None, max_lr: float | None = None, norm_ema_alpha: float = 0.05,
                 mini: bool = True, schedule_free: bool = True, state_dtype: str | torch.dtype = AUTO,
                 block_rows: int = 1, foreach: bool | None = None, fused: bool | None = None, seed: int = 0,
                 controller: RefController | None = None, *, lr_free: bool | None = None,
                 lr_free_scale: float = 1.0, averaging_power: float | None = None, fused_back_pass: bool = False,
                 schedulefree_alpha: float = NOT_GIVEN) -> None:
        self.seed = check_seed(seed)
        self.fused_back_pass = check_bool("fused_back_pass", fused_back_pass)
        norm_ema_alpha = check_alias("norm_ema_alpha", norm_ema_alpha, 0.05, "schedulefree_alpha", schedulefree_alpha)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, auto_lr=auto_lr, min_lr=min_lr,
                        max_lr=max_lr, norm_ema_alpha=norm_ema_alpha, mini=mini, schedule_free=schedule_free,
                        state_dtype=state_dtype, block_rows=block_rows, foreach=foreach, fused=fused,
                        lr_free=lr_free, lr_free_scale=lr_free_scale, averaging_power=averaging_power)
        spelled = {"norm_ema_alpha": "schedulefree_alpha"} if schedulefree_alpha is not NOT_GIVEN else None
        check_hyperparameters(defaults, spelled)
        if isinstance(params, Mapping):
            raise TypeError("params is a single param group (a dict); pass a list of param groups: [{'params': ...}]")
        if isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        if not isinstance(params, (Iterable, torch.Tensor)):
            raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, "
                            f"got {type(params).__name__}")
        self.controller = controller
        super().__init__(params, defaults)
        if controller is not None:
            controller.to(next((p.device for g in self.param_groups for p in g["params"]), controller.device))
        self._attach()

    # -- what is not state: hooks and caches, built again by a copy or an unpickled optimizer ---------
    def _attach(self) -> None:
        self._plans: dict[int, param_state.GroupPlan] = {}
        self._param_plans: dict[tuple, param_state.GroupPlan] = {}  # fused back pass: one per kernel call's tensors
        self._round: BackwardRound | None = None
        self._shares: tuple = (None, None)
        self._step_called = False
        self._since_step: dict[torch.Tensor, None] = {}  # parameters stepped since the last step()
        self.backward_norms = None if self.controller is None else BackwardNorms(
            [p for g in self.param_groups for p in g["params"]])
        self._own_hooks = {  # torch's own extension points for state_dict and load_state_dict
            "end": self.register_state_dict_pre_hook(AdamWMiniSF._end_backward, prepend=True),
            "save": self.register_state_dict_post_hook(AdamWMiniSF._save_controller, prepend=True),
            "samples": self.register_state_dict_post_hook(AdamWMiniSF._save_lr_free_samples, prepend=True),
            "check": super().register_load_state_dict_pre_hook(AdamWMiniSF._check_load),
            "install": self.register_load_state_dict_post_hook(AdamWMiniSF._install_load, prepend=True),
        }

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups; a copy needs the seed and the controller
        return {**super().__getstate__(), "seed": self.seed, "controller": self.controller,
                "fused_back_pass": self.fused_back_pass}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans, self._param_plans = {}, {}  # loaded or copied state: every plan is rebuilt on the next step
        self._round, self._shares = None, (None, None)
        if "_own_hooks" not in self.__dict__:  # unpickled or deep-copied
            self._attach()

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        """As torch's; the optimizer's own check stays last, so it sees what the hooks return."""
        handle = super().register_load_state_dict_pre_hook(hook, prepend)
        self._optimizer_load_state_dict_pre_hooks.move_to_end(self._own_hooks["check"].id)
        return handle

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated; on error the optimizer is left unchanged)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"a param group needs a 'params' entry, got keys {sorted(param_group)}")
        spelled = {"norm_ema_alpha": "schedulefree_alpha"} if "schedulefree_alpha" in param_group else None
        param_state.rename_seed_keys(param_group)  # in place: the group stored is the caller's dict, as in torch
        params = param_group.get("params")
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)  # a generator can be read only once
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(t) for t in tensors}) != len(tensors):
                raise ValueError("params contains duplicate parameters; each tensor may appear only once")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group, spelled)
            ignored_lr = lr_free.resolve_mode(group)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"complex parameters are not supported (got a {p.dtype} parameter)")
                if not p.is_floating_point():
                    raise TypeError(f"parameters must be floating point, got a {p.dtype} parameter")
                sharding.check_supported(p)  # FSDP1 / ZeRO-3 flat shards
            param_state.check_block_layouts(group)
        except Exception:
            self.param_groups.pop()
            raise
        group.setdefault("train_mode", True)
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group.setdefault("stats", {k: torch.zeros((), device=device) for k in self._stat_keys})
        if group["lr_free"]:
            group["stats"].update(lr_free.init_stats(device))
            group["lr"] = lr_free.step_size(group["stats"], group["lr_free_scale"])
            if ignored_lr is not None:
                warnings.warn(f"lr_free=True: the lr passed ({ignored_lr:g}) is not used; the step size is estimated "
                              "(lr_free_scale multiplies it; docs/lr_free.md)", stacklevel=3)
        if getattr(self, "backward_norms", None) is not None:  # a group added later is watched too
            self.backward_norms.remove()
            self.backward_norms = BackwardNorms([p for g in self.param_groups for p in g["params"]])

    @property
    def _stat_keys(self) -> tuple[str, ...]:
        return _STAT_KEYS + (() if self.controller is None else self.controller.GROUP_STATS)

    @property
    def total_steps(self) -> int | None:
        """The controller's planned training length ``T`` (None without one, or when unknown)."""
        return None if self.controller is None else self.controller.total_steps

    # ------------------------------------------------------------------- state
    def _collect_group(self, group: dict[str, Any], first_ordinal: int):
        """The group's plan (parameters with gradients, their states, created lazily, and layouts), the
        gradients as the kernels read them, the gradients as given, and which states are fresh. The plan is
        rebuilt only when the parameters with gradients, a dtype or device, or a state changes.

        torch's ``_init_group`` under another name: dynamo runs a method of that name outside the graph
        and expects torch's return value."""
        with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        plan = self._plans.get(id(group))
        if plan is None or not plan.holds(group, with_grad, self.state):
            plan = self._plans[id(group)] = param_state.plan_group(group, self.state, self.seed, first_ordinal,
                                                                   with_grad)
        return (plan, *_gradients(plan))

    # -------------------------------------------------------------- fused back pass
    def supports_fused_back_pass(self) -> bool:
        """True: :meth:`step_parameter` exists (OneTrainer's test; the mode is ``fused_back_pass=True``)."""
        return True

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict[str, Any], i: int | None = None) -> None:
        """Apply ``p``'s update now, from its gradient (``fused_back_pass=True``): the call a
        post-accumulate-grad hook makes. ``group`` is ``p``'s param group, ``i`` its index there
        (OneTrainer passes it; found when None). The caller frees ``p.grad`` afterwards.

        The update is the one ``step()`` applies to the whole group; with a controller, its decision
        comes from the previous step, and a spike is skipped from the first tensor that shows it
        (:mod:`refadamw.back_pass`). A parameter stepped a second time begins the next step (a
        loop that never calls ``step()``, as kohya's); once ``step()`` has been called, that is
        gradient accumulation across backward passes, which is refused."""
        if not self.fused_back_pass:
            raise RuntimeError(f"{type(self).__name__}.step_parameter() needs fused_back_pass=True (pass it when "
                               "building the optimizer); otherwise step() would apply this update a second time")
        if p.grad is None:
            return
        check_grads([{"params": [p]}], type(self).__name__)
        if self._step_called and p in self._since_step:
            raise RuntimeError(
                "step_parameter() was called twice for one parameter before step(): with fused_back_pass=True "
                "each backward applies its gradients, so gradient accumulation over several backward passes "
                "cannot work; use an accumulation of 1 (or call step() after every backward)")
        if self._round is not None and self._round.has(p):
            self._end_backward()
        if self._round is None:
            self._begin_backward(p)
        group, index = self._locate(p, group, i)
        self._round.mark(p)
        self._since_step[p] = None
        task = torch._C._current_graph_task_id()
        if p.numel() >= back_pass.STAGE_NUMEL or task == -1:
            self._apply(group, [index], [p.grad])
            return
        # inside backward, small tensors are applied together, at the latest when this backward ends
        if task != self._round.flush_task:
            self._round.flush_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        if self._round.stage(group, index, p.grad):
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        if self._round is not None:
            for group, indices, grads in self._round.take_staged():
                self._apply(group, indices, grads)

    def _apply(self, group: dict[str, Any], indices: list[int], given: list[torch.Tensor]) -> None:
        """The update of ``group``'s parameters ``indices`` from the gradients ``given``: one kernel call."""
        plan = self._param_plan(group, indices)
        grads, _, fresh = _gradients(plan, given)
        norms = control = finite = None
        if self.controller is not None:
            native = group["schedule_free"] and group["foreach"] is not False and group["fused"] is not False
            norms = kernels.grad_norms(plan.params, grads, plan.states, plan.layouts, cache=plan.cache, native=native)
            for p, norm in zip(plan.whole, norms):
                self._round.see(p, norm, self.backward_norms.pop(p))
            skip = self._round.skip | self.controller.spike_so_far(self._round.sq, self._round.share)
            finite = kernels.all_finite(norms).to(skip.device)
            self._round.skip = skip | ~finite  # the rest of this backward too
            standing = self.controller.standing()
            control = kernels.Control(standing.lam, standing.pull, skip)
        seen = _observe_lr_free(group, plan)
        report = kernels.update(plan.params, grads, plan.states, plan.layouts, param_state.hyper(group), fresh=fresh,
                                norms=norms, control=control, foreach=group["foreach"] is not False,
                                fused=group["fused"] is not False, index_offsets=plan.offsets, cache=plan.cache,
                                lr_free=seen)
        self._round.record(group, report.applied, report.lr, report.effective_lr, len(indices))
        if seen is not None:
            pull = _pull_applied(group, control, finite)
            self._round.record_lr_free(group, indices, *seen.commit(report.applied), seen.a, pull)

    step_param = step_parameter
    """kohya sd-scripts' name: its ``--fused_backward_pass`` hooks call ``optimizer.step_param(p, group)``."""

    def _locate(self, p: torch.Tensor, group: dict[str, Any], i: int | None) -> tuple[dict[str, Any], int]:
        """``p``'s current param group and index. A hook may hold a group dict that a ``load_state_dict``
        replaced since (accelerate's ``prepare`` loads one): the current group is the one holding ``p``."""
        if any(g is group for g in self.param_groups):
            params = group["params"]
            if i is not None and 0 <= i < len(params) and params[i] is p:
                return group, i
        where = self.__dict__.setdefault("_where", {})
        found = where.get(id(p))
        if found is None or found[0] >= len(self.param_groups) or \
                found[1] >= len(self.param_groups[found[0]]["params"]) or \
                self.param_groups[found[0]]["params"][found[1]] is not p:
            where.clear()
            where.update({id(q): (k, j) for k, g in enumerate(self.param_groups) for j, q in enumerate(g["params"])})
            found = where.get(id(p))
            if found is None:
                raise ValueError("step_parameter(): the parameter is not in this optimizer's param groups")
        return self.param_groups[found[0]], found[1]

    def _param_plan(self, group: dict[str, Any], indices: list[int]) -> param_state.GroupPlan:
        key = (id(group), tuple(indices))
        plan = self._param_plans.get(key)
        if plan is None or not plan.holds(group, indices, self.state):
            if any(sharding.is_sharded(group["params"][i]) for i in indices):
                raise RuntimeError("fused_back_pass=True does not support sharded (FSDP) parameters: their "
                                   "gradients are reduce-scattered after the hook that would step them")
            first = 0
            for g in self.param_groups:
                if g is group:
                    break
                first += len(g["params"])
            plan = self._param_plans[key] = param_state.plan_group(group, self.state, self.seed, first, indices)
        return plan

    def _begin_backward(self, p: torch.Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("fused_back_pass=True needs a single process: under DDP a hook sees its rank's own "
                               "gradient before the ranks average it")
        self._check_train_mode()
        if self.controller is not None and p.device != self.controller.device:
            self.controller.to(p.device)
        device = p.device if self.controller is None else self.controller.device
        self._round = BackwardRound(device, *self._shares)

    def _end_backward(self, loss=None, val_loss=None, max_steps=None) -> None:
        """Finish the open backward's step, if any: group stats and the controller's decision."""
        self._flush()
        done, self._round = self._round, None
        if done is None:
            return
        for group, dots, l1, applied, a, pull in done.take_lr_free():
            _advance_lr_free(group, dots, l1, applied, a, pull)
        done.finish_stats()
        if self.controller is not None:
            device = self.controller.device
            self.controller.decide(Signals(loss=loss, val_loss=val_loss, max_steps=max_steps,
                                           seen_norms=kernels.stacked(done.seen, device, torch.float32),
                                           backward_norms=as_vector(done.recorded, device)))
            self.backward_norms.clear()
            self._mirror_controller_stats()
            self._shares = done.shares()

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, loss=None, max_steps=None, val_loss=None):
        """One step; returns the closure's loss, if any. Never synchronizes with the host.

        With a controller, ``loss``/``val_loss`` (floats or 0-d tensors) feed it (without ``loss``, a
        closure's return value does) and ``max_steps`` sets its ``T``."""
        return self._step(closure, loss=loss, max_steps=max_steps, val_loss=val_loss)

    def _step(self, closure, loss=None, max_steps=None, val_loss=None):
        # The seed front doors call this, not step(): torch wraps each class's step() with the step
        # hooks, and calling a wrapped step from another would run every hook twice.
        self._check_signals(loss=loss, val_loss=val_loss, max_steps=max_steps)
        if self.fused_back_pass:
            return self._step_after_backward(closure, loss, val_loss, max_steps)
        self._check_train_mode()
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if self.controller is not None and isinstance(closure_loss, torch.Tensor) and closure_loss.dim() != 0:
            raise ValueError(f"the closure returned a loss of shape {tuple(closure_loss.shape)}; to feed the "
                             "controller it must be a Python float or a 0-dim tensor")
        check_grads(self.param_groups, type(self).__name__)
        work, ordinal = [], 0
        for group in self.param_groups:
            plan, grads, whole, fresh = self._collect_group(group, ordinal)
            ordinal += len(group["params"])
            if plan.params:
                work.append((group, plan, grads, whole, fresh))
        if not work:
            return closure_loss  # no gradients: a no-op, as in torch.optim (the controller's clock stays too)
        norms = control = None
        if self.controller is not None or any(plan.cache is None for _, plan, *_ in work):
            norms = self._grad_norms(work)  # a sharded group's kernels alone would see only the local shards
        if self.controller is not None:
            if loss is None and isinstance(closure_loss, (torch.Tensor, numbers.Real)) \
                    and not isinstance(closure_loss, bool):
                loss = closure_loss.detach().reshape(()) if isinstance(closure_loss, torch.Tensor) else closure_loss
            control = self._decide(work, norms, loss, val_loss, max_steps)
        for i, (group, plan, grads, whole, fresh) in enumerate(work):
            seen = _observe_lr_free(group, plan)
            report = kernels.update(plan.params, grads, plan.states, plan.layouts, param_state.hyper(group),
                                    fresh=fresh, norms=None if norms is None else norms[i], control=control,
                                    foreach=group["foreach"] is not False, fused=group["fused"] is not False,
                                    index_offsets=plan.offsets, cache=plan.cache, lr_free=seen)
            if seen is not None:
                dots, l1 = seen.commit(report.applied)
                if plan.cache is None:  # sharded: each rank saw its own shards
                    dots, l1 = (torch.stack(sharding.global_sums(whole, list(v.unbind()))) for v in (dots, l1))
                pull = _pull_applied(group, control, None if control is None else kernels.all_finite(norms[i]))
                _advance_lr_free(group, dots, l1, report.applied, seen.a, pull)
            stats = group["stats"]
            applied = report.applied.to(stats["steps"])
            stats["steps"].add_(applied)
            stats["skipped_steps"].add_(1 - applied)
            stats["lr"].copy_(report.lr)
            stats["effective_lr"].copy_(report.effective_lr)
        if self.controller is not None:
            self._mirror_controller_stats()
        return closure_loss

    def _step_after_backward(self, closure, loss, val_loss, max_steps) -> None:
        if closure is not None:
            raise RuntimeError("step(closure) cannot run with fused_back_pass=True: the closure's backward would "
                               "apply the updates inside it, before step() could decide anything; run forward and "
                               "backward yourself, then call step()")
        unapplied = sum(1 for g in self.param_groups for p in g["params"]
                        if p.grad is not None and p not in self._since_step)
        if unapplied:
            raise RuntimeError(f"fused_back_pass=True, but step() found {unapplied} gradient(s) that no "
                               "step_parameter() call applied: register the hooks with refadamw.fused_backward("
                               "model, optimizer), or call optimizer.step_parameter(p, group, i) from your own "
                               "post-accumulate-grad hooks")
        self._step_called = True
        self._since_step.clear()
        self._end_backward(loss, val_loss, max_steps)

    def _check_train_mode(self) -> None:
        for group in self.param_groups:
            if group["schedule_free"] and not group["train_mode"]:
                raise RuntimeError(f"{type(self).__name__}.step() was called in eval mode; call optimizer.train() "
                                   "before training (the parameters currently hold the averaged weights x)")

    def _mirror_controller_stats(self) -> None:
        mirrored = self.controller.stats()
        for group in self.param_groups:
            for key in self.controller.GROUP_STATS:
                group["stats"][key].copy_(mirrored[key])

    def _check_signals(self, **signals) -> None:
        for name, value in signals.items():
            if value is not None and self.controller is None:
                raise TypeError(f"step() got an unexpected keyword argument {name!r}: {type(self).__name__} has no "
                                "controller to feed (RefAdamWMiniSF has one)")
            if name == "max_steps":
                check_steps(name, value)
            else:
                check_signal(name, value)

    @staticmethod
    def _grad_norms(work) -> list[list[torch.Tensor]]:
        """Per-group lists of whole-tensor gradient norms (all-reduced over shards, no host sync)."""
        out = []
        for group, plan, grads, whole, _ in work:
            native = group["schedule_free"] and group["foreach"] is not False and group["fused"] is not False
            norms = kernels.grad_norms(plan.params, grads, plan.states, plan.layouts, cache=plan.cache, native=native)
            out.append(norms if plan.cache is not None else sharding.global_norms(whole, norms))
        return out

    def _decide(self, work, norms, loss, val_loss, max_steps) -> kernels.Control:
        controller = self.controller
        device = next(p.device for g in self.param_groups for p in g["params"])
        if device != controller.device:  # the model moved: the controller follows, as on load
            controller.to(device)
        seen = [n for group_norms in norms for n in group_norms]
        signals = Signals(
            loss=loss, val_loss=val_loss, max_steps=max_steps,
            seen_norms=kernels.stacked(seen, controller.device, torch.float32),
            backward_norms=self.backward_norms.take([p for _, plan, *_ in work for p in plan.whole], controller.device))
        decision = controller.decide(signals)
        return kernels.Control(decision.lam, decision.pull, decision.skip)

    def observe(self, loss=None, val_loss=None, grad_norm=None) -> None:
        """Feed the controller from a callback; it acts on the next ``step()``. ``grad_norm`` is the global
        gradient norm before clipping, for a loop that measures it itself (it replaces the recorded one for
        the next ``step()`` only)."""
        if self.controller is None:
            raise TypeError(f"{type(self).__name__} has no controller to observe signals (RefAdamWMiniSF has one)")
        for name, value in (("loss", loss), ("val_loss", val_loss), ("grad_norm", grad_norm)):
            check_signal(name, value)
        self.controller.observe(loss=loss, val_loss=val_loss, grad_norm=grad_norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.backward_norms is not None:
            self.backward_norms.clear()  # a backward that never reached step() (a scaler's inf skip) is forgotten
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------- train/eval
    @torch.no_grad()
    def _switch(self, to_train: bool, groups: list[dict[str, Any]] | None = None) -> None:
        self._end_backward()  # a loop that never calls step() switches after the backward it stepped
        for group in self.param_groups if groups is None else groups:
            if not group["schedule_free"] or group["train_mode"] == to_train:
                continue
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z_minus_y" not in state:
                    continue  # never stepped: y = x = z, nothing to convert
                convert = x_to_y if to_train else y_to_x
                key = rounding_keys(state["rounding_key"], state["step"], Salt.MODE_SWITCH, sharding.index_offset(p))
                current, offset = sharding.local(p), sharding.local(state["z_minus_y"])  # elementwise: shard-local
                dtype = compute_dtype(p.dtype)
                write_back(current, convert(current.to(dtype), offset.to(dtype), group["betas"][0]), key)
            group["train_mode"] = to_train

    def train(self) -> None:
        """Put the training point ``y`` in the parameters (no-op if already there)."""
        self._switch(True)

    def eval(self) -> None:
        """Put the averaged weights ``x`` in the parameters, for evaluation or saving."""
        self._switch(False)

    @contextlib.contextmanager
    def averaged(self):
        """The averaged weights ``x`` in the parameters inside the block; the mode it found, after."""
        training = [g for g in self.param_groups if g["train_mode"]]
        self.eval()
        try:
            yield self
        finally:
            self._switch(True, training)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, torch.Tensor]:
        """Step statistics as 0-d tensors (read them outside ``step()``).

        ``steps``: updates applied (the most of any group); ``skipped_steps``: group updates skipped for a
        non-finite gradient, summed over groups; ``lr`` and ``effective_lr``: the first group's scheduled lr
        and mean step size at the last update. With a controller, its stats too
        (:meth:`refadamw.controller.RefController.stats`). Each group's own values are in
        ``param_groups[i]["stats"]``.
        """
        self._end_backward()
        groups = [g["stats"] for g in self.param_groups]
        device = groups[0]["steps"].device
        out = {"steps": torch.stack([g["steps"].to(device) for g in groups]).max(),
               "skipped_steps": torch.stack([g["skipped_steps"].to(device) for g in groups]).sum(),
               "lr": groups[0]["lr"].clone(), "effective_lr": groups[0]["effective_lr"].clone()}
        return out if self.controller is None else {**out, **self.controller.stats()}

    # ------------------------------------------------------------- state_dict
    def _save_controller(self, state_dict: dict[str, Any]) -> None:
        if self.controller is not None:
            state_dict.update(self.controller.checkpoint())

    def _save_lr_free_samples(self, state_dict: dict[str, Any]) -> None:
        param_state.checkpoint_form(state_dict["state"], [p for g in self.param_groups for p in g["params"]])

    def _check_load(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Everything checked before anything changes (torch's load then only sets the param groups). State
        tensors keep the dtype this optimizer stores them in; torch would cast them to the parameter's."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        name = type(self).__name__
        if self.controller is not None:  # first: a state_dict of the other class is named as such
            controller = self.controller.restored(state_dict)
        else:
            controller = None
            extra = sorted(k for k, v in state_dict.items() if k not in ("state", "param_groups")
                           and isinstance(v, Mapping))
            if extra:
                raise ValueError(f"the state_dict does not come from {name}: it holds {extra}, the state of a "
                                 "controller this optimizer does not have; load it into RefAdamWMiniSF")
        groups, state = param_state.checked_load(name, self.param_groups, self.defaults, self._stat_keys, state_dict)
        self._loaded = (state, controller)
        return {**state_dict, "param_groups": groups, "state": {}}

    def _install_load(self) -> None:
        state, controller = self.__dict__.pop("_loaded")
        self.state.update(state)
        if controller is not None:
            self.controller = controller


def _observe_lr_free(group: dict[str, Any], plan: param_state.GroupPlan) -> lr_free.Observation | None:
    """What collects this call's lr-free terms (None: the group has a fixed lr)."""
    if not group["lr_free"]:
        return None
    return lr_free.Observation(plan.states, lr_free.weight(group["stats"], group["warmup_steps"]), _beta3(group))


def _advance_lr_free(group: dict[str, Any], dots, l1, applied, a, pull) -> None:
    lr_free.advance(group["stats"], dots, l1, applied.to(a.device), a, _beta3(group), pull)
    group["lr"] = lr_free.step_size(group["stats"], group["lr_free_scale"])  # shown to loggers; read by nothing


def _pull_applied(group: dict[str, Any], control: kernels.Control | None,
                  finite: torch.Tensor | None) -> torch.Tensor | None:
    """The controller's pull as the kernels apply it (None: no controller, or a group without Schedule-Free's
    ``z``): none where ``finite``, the kernels' gate (:func:`refadamw.kernels.all_finite` of the call's
    gradient norms), is false."""
    if control is None or not group["schedule_free"]:
        return None
    return torch.where(finite.to(control.pull.device), control.pull, 0.0)


def _beta3(group: dict[str, Any]) -> float:
    return group["betas"][1] ** 0.5


def _gradients(plan: param_state.GroupPlan, given: list[torch.Tensor] | None = None):
    """The plan's gradients (``given``, else ``p.grad``) as the kernels read them, as given, and which states
    are fresh (consumed)."""
    fresh, plan.fresh = plan.fresh, [False] * len(plan.params)
    given = [p.grad for p in plan.whole] if given is None else given
    # bf16/fp16 gradients are read as they are; a wider one than the math is narrowed first
    whole = [g.to(torch.float32) if g.dtype == torch.float64 and p.dtype != torch.float64 else g
             for p, g in zip(plan.whole, given)]
    grads = [sharding.local(g) for g in whole] if plan.cache is None else whole
    return grads, whole, fresh


class RefAdamWMiniSF(AdamWMiniSF):
    """:class:`AdamWMiniSF` with a :class:`refadamw.controller.RefController` (SPEC.md §3 items 5–6).

    Each step the controller reads the training loss, if one is fed, and the
    global gradient norm, recorded when backward accumulates each gradient,
    before a trainer clips it or an fp16 scaler unscales it, and decides:

    * **injection**: inside ``ref_window`` of ``total_steps`` the weight
      average takes a share ``ref_alpha`` of the iterate, ``x ← (1−λ)·x + λ·z``;
    * **repair**: while the loss (or gradient norm) diverges there is no
      injection; from level 2 the step is skipped, so the spiking gradient
      never reaches ``v`` or ``z``; divergence that lasts 4 flagged steps also
      pulls the fast iterate back toward the average, ``z ← z + ρ·(x − z)``;
    * **overfit**: four rising ``val_loss`` values suspend injection until
      the validation loss improves again.

    Feed it with ``step(loss=...)``, :meth:`observe`, or a closure; trainers
    that call plain ``step()`` still get repair from the gradient norm.

    Extra args:
        ref_alpha: injection share λ of the iterate into the average.
        ref_window: ``(start, end)`` fractions of ``total_steps`` where injection is active.
        total_steps: planned training length ``T`` (``ref_max_steps``, the seed's name, is an alias);
            ``step(max_steps=...)`` sets it too. Without it there is no injection (one warning says
            so); repair works regardless.
        repair: act on divergence (detection and statistics run regardless).
    """

    def __init__(self, params, *args: Any, ref_alpha: float = 0.05, ref_window: tuple[float, float] = (0.2, 0.8),
                 total_steps: int | None = None, repair: bool = True, ref_max_steps: int | None = NOT_GIVEN,
                 **kwargs: Any) -> None:
        if "controller" in kwargs:
            raise TypeError("RefAdamWMiniSF builds its own controller; pass controller= to AdamWMiniSF instead")
        if ref_max_steps is not NOT_GIVEN:
            check_steps("ref_max_steps", ref_max_steps, " (it is the seed's name for total_steps)")
        total_steps = check_alias("total_steps", total_steps, None, "ref_max_steps", ref_max_steps)
        # the controller checks its arguments, before the optimizer checks its own
        super().__init__(params, *args, controller=RefController(ref_alpha, ref_window, total_steps, repair),
                         **kwargs)
