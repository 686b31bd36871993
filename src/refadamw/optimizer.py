"""The optimizer classes: argument checks, param groups, lazy state,
``state_dict``, ``train()``/``eval()``, and the wiring of the pieces.

The math lives in :mod:`refadamw.kernels` (equations in
:mod:`refadamw.kernels.reference`). This module only does bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import operator
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import kernels, sharding
from .averaging import x_to_y, y_to_x
from .controller import RefController
from .partition import BlockLayout, block_layout
from .precision import (AUTO, Salt, compute_dtype, parse_state_dtype, resolve_state_dtype, rounding_keys,
                        second_moment_dtype, tensor_key, write_back)

logger = logging.getLogger("refadamw")

_STAT_KEYS = ("steps", "skipped_steps", "lr", "effective_lr")
_FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16,
                           *(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))})


def _check_number(name: str, value: Any, low: float, *, low_open: bool = False, high: float | None = None,
                  high_open: bool = False, finite: bool = False) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")  # torch's words
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a number or a 1-element float tensor, got {value!r}")
        value = value.detach().cpu().item()  # construction time only, never in step()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _validate_hyperparameters(g: Mapping[str, Any]) -> None:
    """Raise a ValueError/TypeError naming the first bad argument in group ``g``."""
    _check_number("lr", g["lr"], 0.0, finite=True)
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"betas[{i}]", beta, 0.0, high=1.0, high_open=True)
    _check_number("eps", g["eps"], 0.0, low_open=True, finite=True)  # eps = 0 turns a zero gradient into 0/0
    _check_number("weight_decay", g["weight_decay"], 0.0, finite=True)
    warmup = g["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup!r}")
    for flag in ("auto_lr", "mini", "schedule_free"):
        _check_bool(flag, g[flag])
    for bound in ("min_lr", "max_lr"):
        if g[bound] is not None:
            _check_number(bound, g[bound], 0.0, finite=bound == "min_lr")
    if g["min_lr"] is not None and g["max_lr"] is not None and g["min_lr"] > g["max_lr"]:
        raise ValueError(f"min_lr ({g['min_lr']}) must not exceed max_lr ({g['max_lr']})")
    _check_number("schedulefree_alpha", g["schedulefree_alpha"], 0.0, low_open=True, high=1.0)
    if g["schedule_free"] and betas[0] == 0:
        raise ValueError(
            "betas[0] must be > 0 when schedule_free=True: the average x = y - (1-beta1)/beta1·(z - y) "
            "cannot be recovered with beta1 = 0"
        )
    rows = g["block_rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"block_rows must be an int >= 1, got {rows!r}")
    parse_state_dtype(g["state_dtype"])
    if g["foreach"] is not None:
        _check_bool("foreach", g["foreach"])
    if g["fused"] is not None:
        _check_bool("fused", g["fused"])
    if g["fused"] and g["foreach"] is False:
        raise ValueError("fused=True runs inside the multi-tensor path; it cannot be combined with foreach=False")


def _check_block_layouts(group: Mapping[str, Any]) -> None:
    """Every parameter's layout fits it; ``block_layouts``, where a group has it, holds one spec
    (or None) per parameter. (Whether the blocks fit a sharding is checked on the first step.)"""
    specs = group.get("block_layouts")
    if specs is not None and (not isinstance(specs, (list, tuple)) or len(specs) != len(group["params"])):
        raise ValueError(f"block_layouts must be a list with one layout spec (or None) per parameter of its group "
                         f"({len(group['params'])}), got {specs!r:.200}")
    for i, p in enumerate(group["params"]):
        AdamWMiniSF._block_layout(group, p, i)  # raises, naming the parameter, on a spec that does not fit it


@dataclasses.dataclass
class _GroupPlan:
    """What one group's step needs besides the gradients, valid while :meth:`holds`."""

    with_grad: list[int]  # indices in group["params"] of the parameters with gradients
    params: list[torch.Tensor]
    dtypes: list[torch.dtype]
    devices: list[torch.device]
    fresh: list[bool]  # states created for the coming step
    sharded: bool
    local_params: list[torch.Tensor]
    states: list[dict]
    layouts: list[BlockLayout]
    offsets: list[int]
    cache: dict | None  # the kernels' per-group cache (refadamw.kernels.update)

    layout_key: tuple

    state: Any = None  # the optimizer's state mapping and its size when the plan was built
    state_size: int = 0

    def holds(self, group, with_grad: list[int], state) -> bool:
        """Whether the same parameters have gradients, with the same dtypes, devices and block layout
        settings, and the optimizer's state is the same mapping with no entry added or removed (a load
        replaces it; the kernels check that each state still holds the tensors they were planned on)."""
        return (with_grad == self.with_grad and state is self.state and len(state) == self.state_size
                and [p.dtype for p in self.params] == self.dtypes and [p.device for p in self.params] == self.devices
                and _layout_key(group) == self.layout_key)


def _layout_key(group: Mapping[str, Any]) -> tuple:
    specs = group.get("block_layouts")
    return group["mini"], group["block_rows"], None if specs is None else list(specs)


class AdamWMiniSF(torch.optim.Optimizer):
    r"""AdamW with an Adam-mini block second moment and Schedule-Free averaging.

    The update (SPEC.md §3 items 1–4) is written out in
    :mod:`refadamw.kernels.reference`. In short: a per-tensor step size
    damped by a gradient-norm EMA (``auto_lr``), one second moment per row
    (``mini``), and Schedule-Free averaging instead of an lr schedule.

    Like ``schedulefree.AdamWScheduleFree``, the parameters hold the training
    point ``y`` in train mode and the average ``x`` after :meth:`eval`; call
    ``eval()`` before evaluating or saving weights and ``train()`` before
    training again. A new optimizer starts in train mode.

    The defaults (``lr=3e-3``, ``betas=(0.9, 0.999)``, ``warmup_steps=20``,
    ``weight_decay=0``, ``auto_lr=False``, bf16 state) come from
    ``refadamw bench`` on its three workloads (docs/defaults.md, BENCHMARKS.md).

    Args:
        params: tensors, param-group dicts, or ``(name, tensor)`` pairs.
        lr: peak learning rate (after warmup). The default 3e-3 was chosen on models trained
            from scratch; pass a much smaller one to fine-tune a pretrained model
            (docs/defaults.md, "Fine-tuning").
        betas: ``(β1, β2)``; β1 is the Schedule-Free interpolation (or the
            momentum with ``schedule_free=False``), β2 the second-moment EMA.
        eps: added to ``sqrt(v̂)``.
        weight_decay: decoupled weight decay, applied at ``y``.
        warmup_steps: linear lr warmup length, in steps.
        auto_lr: scale each tensor's step by its gradient-norm EMA ratio.
        min_lr, max_lr: bounds on the auto-lr step; ``None`` means
            relative to the scheduled lr (see :mod:`refadamw.auto_lr`).
        schedulefree_alpha: EMA rate of the gradient-norm average (the
            seed's name).
        mini: block-wise second moment; ``False`` for per-element ``v``.
        block_rows: dim-0 slices per second-moment block (e.g. rows per head).
            A param group may also hold ``block_layouts``: one layout spec per
            parameter (``None`` for the shape rule; see
            :func:`refadamw.partition.parse_spec`), overriding the shape rule
            and ``block_rows``; :func:`refadamw.param_groups` fills it from
            the model (Conv1D and MoE expert weights).
        schedule_free: ``False`` gives AdamW-mini with momentum, for ablations.
        state_dtype: storage dtype of ``z − y`` (or the momentum): ``"auto"``
            (bf16; fp64 for fp64 parameters), ``"fp32"``, ``"bf16"``,
            ``"fp16"`` or a ``torch.dtype``. ``v`` is stored in the same dtype,
            except that it is never fp16. Writes into bf16/fp16 (state or
            parameters) are stochastically rounded (docs/precision.md).
        foreach: use the multi-tensor path (default) or the per-tensor one.
        fused: run the elementwise Schedule-Free update as one
            ``torch.compile``-generated pass per tensor (kernels/fused.py).
            ``None`` (default) means yes wherever compiling works (set
            ``REFADAMW_COMPILE=0`` to stay eager); the first step then
            compiles for a few seconds.
        seed: seed of the stochastic-rounding noise (a counter-based hash, so
            a resumed run replays the same noise; the per-tensor key lives in
            the state).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        auto_lr: bool = False,
        min_lr: float | None = None,
        max_lr: float | None = None,
        schedulefree_alpha: float = 0.05,
        mini: bool = True,
        schedule_free: bool = True,
        state_dtype: str | torch.dtype = AUTO,
        block_rows: int = 1,
        foreach: bool | None = None,
        fused: bool | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, warmup_steps=warmup_steps, auto_lr=auto_lr, min_lr=min_lr,
            max_lr=max_lr, schedulefree_alpha=schedulefree_alpha, mini=mini,
            schedule_free=schedule_free, state_dtype=state_dtype, block_rows=block_rows, foreach=foreach,
            fused=fused,
        )
        _validate_hyperparameters(defaults)
        self.seed = seed
        if isinstance(params, Mapping):
            raise TypeError("params is a single param group (a dict); pass a list of param groups: [{'params': ...}]")
        if isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        if not isinstance(params, (Iterable, torch.Tensor)):
            raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or param-group dicts, "
                            f"got {type(params).__name__}")
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups; a copy without the seed could not
        # create state for a parameter's first step.
        return {**super().__getstate__(), "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = {}  # loaded or copied state: every group's plan is rebuilt on the next step

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated; on error the optimizer is left unchanged)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"a param group needs a 'params' entry, got keys {sorted(param_group)}")
        params = param_group.get("params")
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)  # a generator can be read only once
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(t) for t in tensors}) != len(tensors):
                raise ValueError("params contains duplicate parameters; each tensor may appear only once")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        group.setdefault("train_mode", True)
        # An empty group (e.g. a no-decay group of a model without biases) never steps.
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group.setdefault("stats", self._new_stats(device))

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_hyperparameters(group)
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"complex parameters are not supported (got a {p.dtype} parameter)")
            if not p.is_floating_point():
                raise TypeError(f"parameters must be floating point, got a {p.dtype} parameter")
            sharding.check_supported(p)  # FSDP1 / ZeRO-3 flat shards
        _check_block_layouts(group)

    _stat_keys: tuple[str, ...] = _STAT_KEYS

    @classmethod
    def _new_stats(cls, device: torch.device) -> dict[str, torch.Tensor]:
        return {key: torch.zeros((), dtype=torch.float32, device=device) for key in cls._stat_keys}

    # ------------------------------------------------------------------- state

    @staticmethod
    def _block_layout(group: Mapping[str, Any], param: torch.Tensor, index: int | None = None) -> BlockLayout:
        """The second-moment layout of ``param``, the ``index``-th parameter of ``group`` (found if None)."""
        specs = group.get("block_layouts")
        if specs is None:
            return block_layout(param.shape, group["mini"], group["block_rows"])
        if index is None:
            index = next(i for i, p in enumerate(group["params"]) if p is param)
        names = group.get("param_names")
        name = f"parameter {names[index]!r}" if names else f"parameter {index} of its param group"
        return block_layout(param.shape, group["mini"], group["block_rows"], specs[index], name)

    def _expected_state(self, group: Mapping[str, Any], param: torch.Tensor,
                        index: int | None = None) -> dict[str, tuple]:
        """State key → (shape, dtype) that a parameter of ``group`` carries."""
        scalar = ((), compute_dtype(param.dtype))
        storage = resolve_state_dtype(group["state_dtype"], param.dtype)
        layout = self._block_layout(group, param, index)
        # An int64 step keeps counting (and the rounding noise keeps changing) past 2^24 steps, where an
        # fp32 counter stops; the weight sum grows with every step, so it accumulates in fp64.
        expected = {"step": ((), torch.int64), "grad_norm_ema": scalar, "rounding_key": ((), torch.int32)}
        expected["exp_avg_sq"] = (layout.state_shape(param.shape), second_moment_dtype(storage, layout))
        if group["schedule_free"]:
            expected.update(lr_max=scalar, weight_sum=((), torch.float64))
            expected["z_minus_y"] = (param.shape, storage)
        else:
            expected["exp_avg"] = (param.shape, storage)
        return expected

    def _init_state(self, group: Mapping[str, Any], param: torch.Tensor, ordinal: int,
                    index: int | None = None) -> dict[str, torch.Tensor]:
        """Fresh state for ``param``'s first step.

        ``z_minus_y`` starts at exactly 0 (Schedule-Free starts with
        z = x = y); the moment buffers are left uninitialised because the
        kernels compute them directly from the first gradient.
        """
        # Once per parameter, for parameters put into a group behind add_param_group's back (accelerate maps
        # an optimizer built before FSDP1 wrapping onto the flat parameters; ZeRO-1/2 swaps in its partitions).
        sharding.check_supported(param)
        sharding.warn_if_flat_partition(group["params"], group["mini"])
        state = {}
        expected = self._expected_state(group, param, index)
        shard = sharding.local(param)  # a DTensor's state is built shard-local, then wrapped like it
        layout = sharding.local_layout(self._block_layout(group, param, index), param)
        local_shapes = {"exp_avg_sq": layout.state_shape(shard.shape), "exp_avg": shard.shape,
                        "z_minus_y": shard.shape}
        for key, (shape, dtype) in expected.items():
            if key == "rounding_key":
                state[key] = torch.tensor(tensor_key(self.seed, ordinal), dtype=dtype, device=shard.device)
            elif key in local_shapes:
                make = torch.zeros if key == "z_minus_y" else torch.empty
                state[key] = sharding.like_param(make(local_shapes[key], dtype=dtype, device=shard.device),
                                                 param, shape)
            else:
                state[key] = torch.zeros(shape, dtype=dtype, device=shard.device)
        return state

    def _collect(self, group: dict[str, Any], first_ordinal: int):
        """The group's params with gradients, their grads, states (created lazily), layouts, freshness,
        the gradients as given, and the kernels' cache for the group (None when sharded).

        Everything but the gradients comes from the group's plan, which is rebuilt only when the set of
        parameters with gradients, a parameter's dtype or device, or a state changes. For ``DTensor``
        parameters (FSDP2) these are the local shards, their local gradients and local views of the
        state (:mod:`refadamw.sharding`).
        """
        params = group["params"]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        plan = self.__dict__.setdefault("_plans", {}).get(id(group))
        if plan is None or not plan.holds(group, with_grad, self.state):
            plan = self._plans[id(group)] = self._plan(group, first_ordinal, with_grad)
        fresh, plan.fresh = plan.fresh, [False] * len(plan.params)
        whole = [p.grad for p in plan.params]
        # bf16/fp16 gradients are read as they are; a wider one than the math is narrowed first
        whole = [g.to(torch.float32) if g.dtype == torch.float64 and p.dtype != torch.float64 else g
                 for g, p in zip(whole, plan.params)]
        grads = [sharding.local(g) for g in whole] if plan.sharded else whole
        return plan.local_params, grads, plan.states, plan.layouts, fresh, whole, plan.cache, plan.offsets

    def _plan(self, group: dict[str, Any], first_ordinal: int, with_grad: list[int]) -> _GroupPlan:
        params, states, layouts, fresh = [], [], [], []
        for index in with_grad:
            p = group["params"][index]
            state = self.state[p]
            fresh.append(not state)
            if not state:
                state.update(self._init_state(group, p, first_ordinal + index, index))
            elif state["grad_norm_ema"].dtype != compute_dtype(p.dtype) or state["step"].device != p.device:
                self._follow_conversion(group, p, state)
            layout = self._block_layout(group, p, index)
            if state["exp_avg_sq"].shape != layout.state_shape(p.shape):
                raise ValueError(
                    f"the second-moment state of a parameter of shape {tuple(p.shape)} has shape "
                    f"{tuple(state['exp_avg_sq'].shape)}, which does not match mini={group['mini']}, "
                    f"block_rows={group['block_rows']} and its block_layouts; these cannot change after the first step"
                )
            params.append(p)
            states.append(state)
            layouts.append(sharding.local_layout(layout, p))
        sharded = any(sharding.is_sharded(p) for p in params)
        return _GroupPlan(
            with_grad=with_grad, params=params, dtypes=[p.dtype for p in params], devices=[p.device for p in params],
            fresh=fresh, sharded=sharded,
            local_params=[sharding.local(p) for p in params] if sharded else params,
            states=[sharding.local_state(s) for s in states] if sharded else states,
            layouts=layouts, offsets=[sharding.index_offset(p) for p in params],
            cache=None if sharded else {}, layout_key=_layout_key(group), state=self.state,
            state_size=len(self.state))

    def _follow_conversion(self, group: Mapping[str, Any], param: torch.Tensor, state: dict) -> None:
        """``model.double()`` or ``model.to(device)`` after some steps: lay the state out for the
        parameter as it is now, exactly as ``load_state_dict`` would (the step counter's dtype and
        device tell that the parameter changed, in one check per tensor)."""
        for key, (_, dtype) in self._expected_state(group, param).items():
            state[key] = state[key].to(device=param.device, dtype=dtype)
        stats = group["stats"]
        for key, value in stats.items():
            stats[key] = value.to(param.device)

    @staticmethod
    def _hyper(group: Mapping[str, Any]) -> kernels.Hyper:
        return kernels.Hyper(
            lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], warmup_steps=group["warmup_steps"],
            auto_lr=group["auto_lr"], min_lr=group["min_lr"], max_lr=group["max_lr"],
            norm_ema_alpha=group["schedulefree_alpha"], schedule_free=group["schedule_free"],
        )

    # -------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss, if any.

        Never synchronizes with the host: every decision (hygiene skips,
        step sizes) is tensor arithmetic on the parameters' device.
        """
        return self._step(closure)

    def _step(self, closure, **signals):
        # Subclasses call this, not super().step(): torch wraps each class's
        # step() with the step hooks, and calling a wrapped step from another
        # would run every hook twice.
        for group in self.param_groups:
            if group["schedule_free"] and not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}.step() was called in eval mode; call optimizer.train() "
                    "before training (the parameters currently hold the averaged weights x)"
                )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_closure_loss(loss)
        self._check_grads()
        work, ordinal = [], 0
        for group in self.param_groups:
            collected = self._collect(group, ordinal)
            ordinal += len(group["params"])
            if collected[0]:
                work.append((group, *collected))
        if not work:
            return loss  # no gradients: a no-op, as in torch.optim (the controller's clock stays too)
        norms, control = self._control(work, loss, **signals)
        if norms is None and any(cache is None for *_, cache, _ in work):  # no cache: a sharded group
            norms = self._grad_norms(work)  # the kernels alone would see only the local shards
        for i, (group, params, grads, states, layouts, fresh, whole, cache, offsets) in enumerate(work):
            foreach = True if group["foreach"] is None else group["foreach"]
            report = kernels.update(params, grads, states, layouts, self._hyper(group), fresh=fresh,
                                    norms=None if norms is None else norms[i], control=control,
                                    foreach=foreach, fused=group.get("fused") is not False,
                                    index_offsets=offsets, cache=cache)
            stats = group["stats"]
            applied = report.applied.to(stats["steps"])
            stats["steps"].add_(applied)
            stats["skipped_steps"].add_(1 - applied)
            stats["lr"].copy_(report.lr)
            stats["effective_lr"].copy_(report.effective_lr)
        self._after_step()
        return loss

    def _check_closure_loss(self, loss) -> None:
        """Raise on a closure loss the controller cannot read (nothing here)."""

    def _check_grads(self) -> None:
        """Refuse a bad gradient before anything (state, controller) has changed."""
        for group in self.param_groups:
            params = group["params"]
            # one cheap pass per step; the detailed checks run only for a gradient that fails it
            if all(g is None or (g.dtype in _FLOAT_DTYPES and g.layout is torch.strided and g.shape == p.shape)
                   for g, p in zip([p.grad for p in params], params)):
                continue
            ordinal = sum(len(g["params"]) for g in self.param_groups[:self.param_groups.index(group)])
            for index, p in enumerate(params):
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                    if g.is_complex():
                        raise TypeError("complex gradients are not supported")
                    if not g.is_floating_point():
                        raise TypeError(f"the gradient of parameter {ordinal + index} has dtype {g.dtype}; "
                                        "gradients must be floating point")
                    if g.shape != p.shape:
                        raise ValueError(f"the gradient of parameter {ordinal + index} has shape {tuple(g.shape)}, "
                                         f"but the parameter has shape {tuple(p.shape)}")

    def _control(self, work, loss, **signals) -> tuple[list | None, kernels.Control | None]:
        """Per-group gradient norms and a controller decision; none without a controller."""
        return None, None

    @staticmethod
    def _grad_norms(work) -> list[list[torch.Tensor]]:
        """Per-group lists of whole-tensor gradient norms (all-reduced over shards, no host sync)."""
        norms = [kernels.grad_norms(
                    params, grads, states, layouts, cache=cache,
                    native=group["schedule_free"] and group["foreach"] is not False and group["fused"] is not False)
                 for group, params, grads, states, layouts, _, whole, cache, _ in work]
        # a group without a cache is a sharded one: its local norms are combined across ranks
        return [sharding.global_norms(whole, norms_i) if cache is None else norms_i
                for norms_i, (*_, whole, cache, _) in zip(norms, work)]

    def _after_step(self) -> None:
        """Called at the end of every ``step()``."""

    # ------------------------------------------------------------- train/eval

    @torch.no_grad()
    def _switch(self, to_train: bool, groups: list[dict[str, Any]] | None = None) -> None:
        for group in self.param_groups if groups is None else groups:
            if not group["schedule_free"] or group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z_minus_y" not in state:
                    continue  # never stepped: y = x = z, nothing to convert
                dtype = compute_dtype(p.dtype)
                convert = x_to_y if to_train else y_to_x
                key = rounding_keys(state["rounding_key"], state["step"], Salt.MODE_SWITCH, sharding.index_offset(p))
                current, offset = sharding.local(p), sharding.local(state["z_minus_y"])  # elementwise: shard-local
                write_back(current, convert(current.to(dtype), offset.to(dtype), beta1), key)
            group["train_mode"] = to_train

    def train(self) -> None:
        """Put the training point ``y`` in the parameters (no-op if already there)."""
        self._switch(True)

    def eval(self) -> None:
        """Put the averaged weights ``x`` in the parameters, for evaluation or saving."""
        self._switch(False)

    @contextlib.contextmanager
    def averaged(self):
        """Context manager: the averaged weights ``x`` in the parameters inside it.

        Switches to eval mode and back to the mode it found on exit, also when
        the body raises::

            with optimizer.averaged():
                evaluate(model)
        """
        training = [g for g in self.param_groups if g["train_mode"]]
        self.eval()
        try:
            yield self
        finally:
            self._switch(True, training)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, torch.Tensor]:
        """Step statistics as 0-d tensors (read them outside ``step()``).

        ``steps``: updates applied (the most of any group); ``skipped_steps``:
        group updates skipped for a non-finite gradient, summed over groups;
        ``lr`` and ``effective_lr``: the first group's scheduled lr and mean
        auto-lr step size at the last update. Each group's own values are in
        ``param_groups[i]["stats"]``.
        """
        groups = [g["stats"] for g in self.param_groups]
        device = groups[0]["steps"].device
        stacked = {k: torch.stack([g[k].to(device) for g in groups]) for k in ("steps", "skipped_steps")}
        return {
            "steps": stacked["steps"].max(),
            "skipped_steps": stacked["skipped_steps"].sum(),
            "lr": groups[0]["lr"].clone(),
            "effective_lr": groups[0]["effective_lr"].clone(),
        }

    # ------------------------------------------------------------- state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a ``state_dict`` from this optimizer class.

        Unlike ``torch.optim.Optimizer``, state tensors keep the dtype this
        optimizer stores them in (they are not cast to the parameter dtype).
        Everything is checked before anything changes: a state_dict from
        another optimizer, with other groups or with malformed state raises
        ``ValueError``/``TypeError`` and leaves the optimizer as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_origin(state_dict)
        groups, state = self._checked_state(state_dict)
        self._load_extra_state(state_dict)  # checks first too; raises before anything changed
        # A defaultdict, as torch.optim keeps it: parameters without saved state get theirs lazily.
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        """Load what a subclass keeps beside the per-parameter state (nothing here)."""

    def _check_origin(self, state_dict: Mapping[str, Any]) -> None:
        held = sorted({"ref_config", "ref_controller"} & set(state_dict))
        if held:
            raise ValueError(f"the state_dict does not come from {type(self).__name__}: it holds the Ref controller's "
                             f"state {held}; load it into RefAdamWMiniSF")

    def _checked_state(self, state_dict: Mapping[str, Any]):
        name = type(self).__name__
        missing = {"state", "param_groups"} - set(state_dict)
        if missing:
            raise ValueError(f"not an optimizer state_dict: missing {sorted(missing)}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, Mapping):
            raise TypeError("state_dict['param_groups'] must be a list and state_dict['state'] a mapping")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        # torch's __setstate__ adds "differentiable" to defaults (not to groups) on every load.
        required = (set(self.defaults) - {"differentiable"}) | {"params", "train_mode", "stats"}
        new_groups, new_state = [], {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, Mapping):
                raise TypeError(f"param group {i} of the state_dict is not a dict")
            lacking = required - set(saved)
            if lacking:
                raise ValueError(
                    f"the state_dict does not come from {name} (param group {i} lacks {sorted(lacking)})"
                )
            if not isinstance(saved["params"], (list, tuple)):
                raise TypeError(f"param group {i} of the state_dict: 'params' must be a list of parameter ids, "
                                f"got {type(saved['params']).__name__}")
            _check_bool("train_mode", saved["train_mode"])
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} has {len(group['params'])} parameters, the state_dict's has "
                    f"{len(saved['params'])}"
                )
            new_group = {k: v for k, v in saved.items() if k not in ("params", "stats")}
            _validate_hyperparameters(new_group)
            new_group["params"] = group["params"]
            if "param_names" not in saved and "param_names" in group:
                new_group["param_names"] = group["param_names"]
            _check_block_layouts(new_group)
            new_group["stats"] = self._checked_stats(saved["stats"], group["stats"], i)
            for index, (param, key) in enumerate(zip(group["params"], saved["params"])):
                if key in saved_state:
                    new_state[param] = self._checked_param_state(new_group, param, saved_state[key], key, index)
            new_groups.append(new_group)
        listed = {key for saved in saved_groups for key in saved["params"]}
        unlisted = sorted(set(saved_state) - listed, key=str)
        if unlisted:
            raise ValueError(f"state_dict['state'] has entries for parameter ids {unlisted} that no param group lists")
        return new_groups, new_state

    def _checked_stats(self, saved: Any, current: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        if not isinstance(saved, Mapping) or set(saved) != set(self._stat_keys) or not all(
            isinstance(v, torch.Tensor) and v.numel() == 1 for v in saved.values()
        ):
            raise ValueError(f"param group {index} of the state_dict has malformed 'stats'")
        return {k: saved[k].detach().to(current[k], copy=True).reshape(()) for k in self._stat_keys}

    def _checked_param_state(self, group, param, saved: Any, key: Any, index: int) -> dict[str, torch.Tensor]:
        if not isinstance(saved, Mapping):
            raise TypeError(f"state of parameter {key} is not a dict")
        expected = self._expected_state(group, param, index)
        if set(saved) != set(expected):
            raise ValueError(
                f"state of parameter {key} has keys {sorted(saved)}, expected {sorted(expected)} "
                f"(is the state_dict from another optimizer or schedule_free setting?)"
            )
        out = {}
        for name, (shape, dtype) in expected.items():
            value = saved[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state '{name}' of parameter {key} is not a tensor")
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"state '{name}' of parameter {key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                )
            if value.is_floating_point() != dtype.is_floating_point and not (name == "step" and value.dim() == 0):
                raise TypeError(f"state '{name}' of parameter {key} has dtype {value.dtype}, expected {dtype}")
            out[name] = value.detach().to(device=param.device, dtype=dtype, copy=True)
            if out[name].dim() == 0 and dtype.is_floating_point and not math.isfinite(out[name].item()):
                raise ValueError(f"state '{name}' of parameter {key} is {out[name].item()}: scalar state must be finite")
        return out


def _check_steps(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_signal(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must be a Python float or a real 0-dim tensor, got a {value.dtype} tensor")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-dim tensor, got shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float or a 0-dim tensor, got {type(value).__name__}")


class RefAdamWMiniSF(AdamWMiniSF):
    """:class:`AdamWMiniSF` plus the Ref controller (SPEC.md §3 items 5–6).

    Each step the controller (:mod:`refadamw.controller`) reads the training
    loss, if one is fed, or else the global gradient norm, and decides:

    * **injection**: inside ``ref_window`` of ``total_steps`` the weight
      average takes a share ``ref_alpha`` of the iterate, ``x ← (1−λ)·x + λ·z``;
    * **repair**: while the loss (or gradient norm) diverges there is no
      injection; from level 2 the step is skipped, so the spiking gradient
      never reaches ``v`` or ``z``; divergence that lasts 4 flagged steps
      also pulls the fast iterate back toward the average,
      ``z ← z + ρ·(x − z)``, with ρ growing with the level;
    * **overfit**: four rising ``val_loss`` values suspend injection until
      the validation loss improves again.

    Every decision is tensor arithmetic (no host sync), and the controller's
    state is part of ``state_dict()``. Feed it with ``step(loss=...)``,
    :meth:`observe`, or a closure; trainers that call plain ``step()`` still
    get repair from the gradient-norm signal. That norm is recorded when
    backward accumulates each gradient, before a trainer clips it or an
    fp16 scaler unscales it, so clipping does not hide a spike.

    Extra args:
        ref_alpha: injection share λ of the iterate into the average.
        ref_window: ``(start, end)`` fractions of ``total_steps`` where
            injection is active.
        total_steps: planned training length ``T`` (alias ``ref_max_steps``);
            ``step(max_steps=...)`` sets it too. Without it there is no
            injection (one warning says so); repair works regardless.
        repair: act on divergence (detection and statistics run regardless).
    """

    _stat_keys = _STAT_KEYS + ("lam", "divergence_level", "repairs", "skips", "flagged_steps", "overfit")

    def __init__(self, params, *args: Any, ref_alpha: float = 0.05, ref_window: tuple[float, float] = (0.2, 0.8),
                 total_steps: int | None = None, ref_max_steps: int | None = None, repair: bool = True,
                 **kwargs: Any) -> None:
        _check_number("ref_alpha", ref_alpha, 0.0, high=1.0)
        if not isinstance(ref_window, (tuple, list)) or len(ref_window) != 2:
            raise TypeError(f"ref_window must be a pair (start, end), got {ref_window!r}")
        _check_number("ref_window[0]", ref_window[0], 0.0, high=1.0)
        _check_number("ref_window[1]", ref_window[1], 0.0, high=1.0)
        if ref_window[0] > ref_window[1]:
            raise ValueError(f"ref_window start must not exceed its end, got {tuple(ref_window)}")
        if total_steps is not None and ref_max_steps is not None and total_steps != ref_max_steps:
            raise ValueError(f"total_steps={total_steps} and its alias ref_max_steps={ref_max_steps} disagree")
        if ref_max_steps is not None and (isinstance(ref_max_steps, bool) or not isinstance(ref_max_steps, int)
                                          or ref_max_steps < 1):
            raise ValueError(f"ref_max_steps must be a positive int or None (it is the seed's name for total_steps), "
                             f"got {ref_max_steps!r}")
        total_steps = total_steps if total_steps is not None else ref_max_steps
        _check_steps("total_steps", total_steps)
        _check_bool("repair", repair)
        super().__init__(params, *args, **kwargs)
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self.controller = RefController(float(ref_alpha), tuple(ref_window), total_steps, repair, device)
        self._watch_gradients()

    # -- the raw gradient norm: recorded as backward accumulates it, before any trainer clips ----------
    def _watch_gradients(self) -> None:
        """Record each parameter's gradient norm when backward has accumulated it.

        Trainers clip (and fp16 scalers unscale) between backward and
        ``step()``; the controller must see the gradient before that. The
        hooks are not state: a copy or an unpickled optimizer registers its
        own. They hold the optimizer weakly, so they outlive it harmlessly.
        DTensor (FSDP2) parameters are not watched: their shards are
        reduce-scattered after the hook would run.
        """
        self._raw_norms: dict[torch.Tensor, torch.Tensor] = {}
        self._fed_grad_norm: torch.Tensor | None = None
        owner = weakref.ref(self)

        def record(param: torch.Tensor) -> None:
            opt = owner()
            if opt is not None and param.grad is not None:  # a device tensor: no host sync
                opt._raw_norms[param] = torch.linalg.vector_norm(param.grad.detach(), dtype=compute_dtype(param.dtype))

        self._grad_hooks = [p.register_post_accumulate_grad_hook(record) for g in self.param_groups
                            for p in g["params"] if p.requires_grad and not sharding.is_sharded(p)]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_grad_hooks"):  # a group added after construction is watched too
            self._unwatch_gradients()
            self._watch_gradients()

    def _unwatch_gradients(self) -> None:
        for handle in self.__dict__.pop("_grad_hooks", []):
            handle.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._raw_norms.clear()  # a backward that never reached step() (a scaler's inf skip) is forgotten
        super().zero_grad(set_to_none)

    def _raw_grad_norm(self, work, seen: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm the controller reads: fed by :meth:`observe`, else recorded at
        backward (all-reduced under data parallelism), else the one ``step()`` sees."""
        device = self.controller.device
        fed, self._fed_grad_norm = self._fed_grad_norm, None
        recorded = [self._raw_norms.get(p) for _, params, *_ in work for p in params]
        self._raw_norms.clear()
        if fed is not None:
            return fed.to(device, torch.float32)
        seen = kernels.stacked(seen, device, torch.float32) if seen else torch.zeros(0, device=device)
        if all(r is None for r in recorded):
            return torch.linalg.vector_norm(seen)
        if any(r is None for r in recorded):
            recorded = [torch.zeros((), device=device) if r is None else r for r in recorded]
        raw = kernels.stacked(recorded, device, torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # DDP's hooks see each rank's own gradient: average the squares so every rank decides alike.
            import torch.distributed._functional_collectives as funcol

            raw = (funcol.all_reduce(raw.square(), "sum", torch.distributed.group.WORLD)
                   / torch.distributed.get_world_size()).sqrt()
        return self.controller.unclipped_norm(raw, seen)

    @property
    def total_steps(self) -> int | None:
        return self.controller._total

    @torch.no_grad()
    def step(self, closure=None, *, loss=None, max_steps=None, val_loss=None):
        """One step. ``loss``/``val_loss`` (floats or 0-d tensors) feed the controller;
        without ``loss``, a closure's return value does. ``max_steps`` sets ``T``."""
        _check_signal("loss", loss)
        _check_signal("val_loss", val_loss)
        _check_steps("max_steps", max_steps)
        return self._step(closure, loss=loss, val_loss=val_loss, max_steps=max_steps)

    def observe(self, loss=None, val_loss=None, grad_norm=None) -> None:
        """Feed the controller from a callback; it acts on the next ``step()``.

        ``grad_norm`` is the global gradient norm before clipping, for a loop
        that measures it itself; it replaces the recorded one for the next
        ``step()`` only."""
        _check_signal("loss", loss)
        _check_signal("val_loss", val_loss)
        _check_signal("grad_norm", grad_norm)
        self.controller.observe(loss=loss, val_loss=val_loss)
        if grad_norm is not None:
            self._fed_grad_norm = self.controller._signal("grad_norm", grad_norm)

    def _control(self, work, closure_loss, *, loss=None, val_loss=None, max_steps=None):
        device = next((p.device for g in self.param_groups for p in g["params"]), self.controller.device)
        if device != self.controller.device:  # the model moved: the controller follows, as on load
            self.controller.to(device)
        if loss is None and isinstance(closure_loss, (torch.Tensor, numbers.Real)) and not isinstance(
                closure_loss, bool):
            loss = closure_loss if not isinstance(closure_loss, torch.Tensor) else closure_loss.detach().reshape(())
        self.controller.observe(loss=loss, val_loss=val_loss)
        norms = self._grad_norms(work)
        global_norm = self._raw_grad_norm(work, [n for group_norms in norms for n in group_norms])
        decision = self.controller.decide(global_norm, max_steps)
        return norms, kernels.Control(decision.lam, decision.pull, decision.skip)

    def _after_step(self) -> None:
        mirror = self._controller_stats()
        for group in self.param_groups:
            for key, value in mirror.items():
                group["stats"][key].copy_(value)

    def _controller_stats(self) -> dict[str, torch.Tensor]:
        c = self.controller.stats()
        return {"lam": c["lam"], "divergence_level": c["divergence_level"], "repairs": c["repairs"],
                "skips": c["skips"], "flagged_steps": c["flagged_steps"], "overfit": c["overfit"]}

    def stats(self) -> dict[str, torch.Tensor]:
        """:meth:`AdamWMiniSF.stats` plus the controller's: ``lam`` (λ in force),
        ``divergence_level`` (0–3), ``repairs`` and ``skips`` (step counts),
        ``flagged_steps`` (steps at level > 0), ``overfit`` (1 while injection is
        suspended) and ``controller_steps``. Mirrored into each
        ``param_groups[i]["stats"]`` after every step."""
        out = super().stats()
        out.update({k: v.clone() for k, v in self._controller_stats().items()})
        out["controller_steps"] = self.controller.stats()["controller_steps"]
        return out

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state_dict plus the controller's settings and state.

        Like the param groups' hyperparameters, the controller's settings
        (``ref_alpha``, ``ref_window``, ``repair``) are restored on load.
        """
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()  # run below, once the controller's keys are in
        try:
            state = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        c = self.controller
        state["ref_config"] = {"ref_alpha": c.ref_alpha, "ref_window": tuple(c.ref_window), "repair": c.repair}
        state["ref_controller"] = c.state_dict()
        for hook in post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "controller": self.controller}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_grad_hooks" not in self.__dict__:  # unpickled or deep-copied: watch the new parameters
            self._watch_gradients()

    def _check_origin(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"ref_config", "ref_controller"} - set(state_dict)
        if missing:
            raise ValueError(f"the state_dict lacks {sorted(missing)}: it does not come from RefAdamWMiniSF")

    def _check_closure_loss(self, loss) -> None:
        if isinstance(loss, torch.Tensor) and loss.dim() != 0:
            raise ValueError(f"the closure returned a loss of shape {tuple(loss.shape)}; to feed the controller it "
                             "must be a Python float or a 0-dim tensor")

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        config = state_dict["ref_config"]
        if not isinstance(config, Mapping) or set(config) != {"ref_alpha", "ref_window", "repair"}:
            raise ValueError("the state_dict's 'ref_config' is malformed")
        controller = RefController(config["ref_alpha"], tuple(config["ref_window"]), None, config["repair"],
                                   self.controller.device)
        controller.load_state_dict(state_dict["ref_controller"])
        self.controller = controller
