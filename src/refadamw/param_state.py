"""The per-parameter optimizer state: what each parameter carries, how it is created, how it follows
``.to()``/``.double()``, and how a loaded one is checked.

A parameter of a group with ``schedule_free=True`` carries (the math is in
:mod:`refadamw.kernels`):

| key | shape | dtype |
|---|---|---|
| ``step`` | () | int64 (keeps counting past 2^24, where fp32 stops) |
| ``grad_norm_ema``, ``lr_max`` | () | the compute dtype (fp32; fp64 for fp64 parameters) |
| ``weight_sum`` | () | fp64 (it grows with every step) |
| ``rounding_key`` | () | int32 (:mod:`refadamw.precision`) |
| ``exp_avg_sq`` | the block layout's (:mod:`refadamw.partition`) | the state dtype; fp32 for block ``v`` |
| ``z_minus_y`` | the parameter's | the state dtype |

With ``schedule_free=False`` ``exp_avg`` replaces ``z_minus_y``, ``lr_max`` and ``weight_sum``.
Nothing here knows the optimizer class: each function takes a param group mapping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import kernels, lr_free, sharding
from .partition import BlockLayout, block_layout
from .precision import compute_dtype, resolve_state_dtype, second_moment_dtype, tensor_key
from .validation import check_bool, check_hyperparameters


def layout_of(group: Mapping[str, Any], param: torch.Tensor, index: int | None = None) -> BlockLayout:
    """The second-moment layout of ``param``, the ``index``-th parameter of ``group`` (found if None)."""
    specs = group.get("block_layouts")
    if specs is None:
        return block_layout(param.shape, group["mini"], group["block_rows"])
    if index is None:
        index = next(i for i, p in enumerate(group["params"]) if p is param)
    names = group.get("param_names")
    name = f"parameter {names[index]!r}" if names else f"parameter {index} of its param group"
    return block_layout(param.shape, group["mini"], group["block_rows"], specs[index], name)


def check_block_layouts(group: Mapping[str, Any]) -> None:
    """Every parameter's layout fits it; ``block_layouts``, where a group has it, holds one spec
    (or None) per parameter. (Whether the blocks fit a sharding is checked on the first step.)"""
    specs = group.get("block_layouts")
    if specs is not None and (not isinstance(specs, (list, tuple)) or len(specs) != len(group["params"])):
        raise ValueError(f"block_layouts must be a list with one layout spec (or None) per parameter of its group "
                         f"({len(group['params'])}), got {specs!r:.200}")
    for i, p in enumerate(group["params"]):
        layout_of(group, p, i)  # raises, naming the parameter, on a spec that does not fit it


def hyper(group: Mapping[str, Any]) -> kernels.Hyper:
    """The kernels' hyperparameters of a param group."""
    # an lr-free group's step size comes from its estimate, not from group["lr"], which only shows it
    lr = lr_free.step_size(group["stats"], group["lr_free_scale"]) if group["lr_free"] else group["lr"]
    return kernels.Hyper(
        lr=lr, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
        weight_decay=group["weight_decay"], warmup_steps=group["warmup_steps"], auto_lr=group["auto_lr"],
        min_lr=group["min_lr"], max_lr=group["max_lr"], norm_ema_alpha=group["norm_ema_alpha"],
        schedule_free=group["schedule_free"], averaging_power=group["averaging_power"],
    )


def expected(group: Mapping[str, Any], param: torch.Tensor, index: int | None = None) -> dict[str, tuple]:
    """State key → (shape, dtype) that a parameter of ``group`` carries (the table above)."""
    scalar = ((), compute_dtype(param.dtype))
    storage = resolve_state_dtype(group["state_dtype"], param.dtype)
    layout = layout_of(group, param, index)
    out = {"step": ((), torch.int64), "grad_norm_ema": scalar, "rounding_key": ((), torch.int32)}
    out["exp_avg_sq"] = (layout.state_shape(param.shape), second_moment_dtype(storage, layout))
    if group["schedule_free"]:
        out.update(lr_max=scalar, weight_sum=((), torch.float64))
        out["z_minus_y"] = (param.shape, storage)
    else:
        out["exp_avg"] = (param.shape, storage)
    if group["lr_free"]:
        sample = (lr_free.sample_size(sharding.local(param).numel()),)
        out.update({key: (sample, torch.float32) for key in lr_free.STATE_KEYS})
    return out


def init_state(group: Mapping[str, Any], param: torch.Tensor, seed: int, ordinal: int,
               index: int | None = None) -> dict[str, torch.Tensor]:
    """Fresh state for ``param``'s first step; ``ordinal`` is its position among all the optimizer's
    parameters, which keys its rounding noise.

    ``z_minus_y`` starts at exactly 0 (Schedule-Free starts with z = x = y);
    the moment buffers are left uninitialised because the kernels compute them
    directly from the first gradient.
    """
    # Once per parameter, for parameters put into a group behind add_param_group's back (accelerate maps
    # an optimizer built before FSDP1 wrapping onto the flat parameters; ZeRO-1/2 swaps in its partitions).
    sharding.check_supported(param)
    sharding.warn_if_flat_partition(group["params"], group["mini"])
    state = {}
    shard = sharding.local(param)  # a DTensor's state is built shard-local, then wrapped like it
    layout = sharding.local_layout(layout_of(group, param, index), param)
    local_shapes = {"exp_avg_sq": layout.state_shape(shard.shape), "exp_avg": shard.shape, "z_minus_y": shard.shape}
    for key, (shape, dtype) in expected(group, param, index).items():
        if key == "rounding_key":
            state[key] = torch.tensor(tensor_key(seed, ordinal), dtype=dtype, device=shard.device)
        elif key in lr_free.STATE_KEYS:
            continue  # below, both at once
        elif key in local_shapes:
            make = torch.zeros if key == "z_minus_y" else torch.empty
            state[key] = sharding.like_param(make(local_shapes[key], dtype=dtype, device=shard.device), param, shape)
        else:
            state[key] = torch.zeros(shape, dtype=dtype, device=shard.device)
    if group["lr_free"]:
        state.update(lr_free.init_state(shard))
    return state


def converted(group: Mapping[str, Any], param: torch.Tensor, state: dict) -> bool:
    """After ``model.double()`` or ``model.to(device)``, lay ``state`` out for the parameter as it is now,
    exactly as a load would; True if it had to (the step counter's dtype and device tell, in one check)."""
    if state["grad_norm_ema"].dtype == compute_dtype(param.dtype) and state["step"].device == param.device:
        return False
    for key, (_, dtype) in expected(group, param).items():
        state[key] = state[key].to(device=param.device, dtype=dtype)
    return True


def checkpoint_form(state: dict[int, dict[str, torch.Tensor]], params: list[torch.Tensor]) -> None:
    """In place on a ``state_dict``'s ``state`` (parameter id → state; ``params[id]`` the parameter): the
    lr-free samples of a sharded parameter, which are the rank's own and no shard of a whole tensor, become
    its row of a per-rank ``DTensor`` (:func:`refadamw.sharding.per_rank`), so that a distributed
    checkpoint keeps every rank's; :func:`checked_param_state` takes the row back."""
    for key, saved in list(state.items()):
        param = params[key]
        if sharding.is_sharded(param) and lr_free.STATE_KEYS[0] in saved:
            length = lr_free.sample_size(sharding.largest_local_numel(param))
            state[key] = {**saved, **{name: sharding.per_rank(saved[name], param, length)
                                      for name in lr_free.STATE_KEYS}}


def checked_param_state(group, param, saved: Any, key: Any, index: int) -> dict[str, torch.Tensor]:
    """A saved state of ``param`` (id ``key``), checked and converted to what it carries here."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"state of parameter {key} is not a dict")
    wanted = expected(group, param, index)
    if set(saved) != set(wanted):
        raise ValueError(
            f"state of parameter {key} has keys {sorted(saved)}, expected {sorted(wanted)} "
            f"(is the state_dict from another optimizer or schedule_free setting?)"
        )
    out = {}
    for name, (shape, dtype) in wanted.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state '{name}' of parameter {key} is not a tensor")
        if name in lr_free.STATE_KEYS:  # saved under FSDP2 as this rank's row (checkpoint_form)
            value = sharding.from_per_rank(value, shape[0])
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"state '{name}' of parameter {key} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if value.is_floating_point() != dtype.is_floating_point and not (name == "step" and value.dim() == 0):
            raise TypeError(f"state '{name}' of parameter {key} has dtype {value.dtype}, expected {dtype}")
        out[name] = value.detach().to(device=param.device, dtype=dtype, copy=True)
        if out[name].dim() == 0 and dtype.is_floating_point and not math.isfinite(out[name].item()):
            raise ValueError(f"state '{name}' of parameter {key} is {out[name].item()}: scalar state must be finite")
    return out


SEED_GROUP_KEYS = {"schedulefree_alpha": "norm_ema_alpha"}
"""Param-group keys under their seed names (checkpoints written before the rename) → today's."""
EARLIER_GROUP_KEYS = {"lr_free": False, "lr_free_scale": 1.0, "averaging_power": 0.0}
"""Param-group keys that checkpoints written before they existed lack, and the value that reproduces those
runs (a fixed lr, the unweighted average)."""


def rename_seed_keys(group: dict[str, Any]) -> None:
    """Put ``group``'s seed-named keys under today's names, in place (a group may not hold both)."""
    for old, new in SEED_GROUP_KEYS.items():
        if old in group:
            if new in group:
                raise ValueError(f"a param group holds both {old!r} and its new name {new!r}; give only one")
            group[new] = group.pop(old)


def checked_load(class_name: str, groups: list[dict[str, Any]], defaults: Mapping[str, Any], stat_keys: tuple,
                 state_dict: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[torch.Tensor, dict]]:
    """The param groups (``params`` still the saved ids) and the state, keyed by this optimizer's
    parameters, that loading ``state_dict`` into ``groups`` gives; raises before anything is kept."""
    missing = {"state", "param_groups"} - set(state_dict)
    if missing:
        raise ValueError(f"not an optimizer state_dict: missing {sorted(missing)}")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, Mapping):
        raise TypeError("state_dict['param_groups'] must be a list and state_dict['state'] a mapping")
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}")
    # torch's __setstate__ adds "differentiable" to defaults (not to groups) on every load.
    required = (set(defaults) - {"differentiable"}) | {"params", "train_mode", "stats"}
    new_groups, new_state = [], {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, Mapping):
            raise TypeError(f"param group {i} of the state_dict is not a dict")
        saved = dict(saved)
        rename_seed_keys(saved)
        for key, value in EARLIER_GROUP_KEYS.items():
            saved.setdefault(key, value)
        lacking = required - set(saved)
        if lacking:
            raise ValueError(f"the state_dict does not come from {class_name} (param group {i} lacks {sorted(lacking)})")
        if not isinstance(saved["params"], (list, tuple)):
            raise TypeError(f"param group {i} of the state_dict: 'params' must be a list of parameter ids, "
                            f"got {type(saved['params']).__name__}")
        check_bool("train_mode", saved["train_mode"])
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {i} has {len(group['params'])} parameters, the state_dict's has "
                             f"{len(saved['params'])}")
        new_group = {k: v for k, v in saved.items() if k != "stats"}
        check_hyperparameters(new_group)
        here = {**new_group, "params": group["params"]}
        if "param_names" not in saved and "param_names" in group:
            here["param_names"] = group["param_names"]
        check_block_layouts(here)
        keys = stat_keys + (lr_free.STAT_KEYS if new_group["lr_free"] else ())
        stats = lr_free.upgrade_stats(saved["stats"]) if new_group["lr_free"] else saved["stats"]
        new_group["stats"] = checked_stats(stats, group["stats"]["steps"], keys, i)
        for index, (param, key) in enumerate(zip(group["params"], saved["params"])):
            if key in saved_state:
                new_state[param] = checked_param_state(here, param, saved_state[key], key, index)
        new_groups.append(new_group)
    listed = {key for saved in saved_groups for key in saved["params"]}
    unlisted = sorted(set(saved_state) - listed, key=str)
    if unlisted:
        raise ValueError(f"state_dict['state'] has entries for parameter ids {unlisted} that no param group lists")
    return new_groups, new_state


def checked_stats(saved: Any, like: torch.Tensor, stat_keys: tuple, index: int) -> dict[str, torch.Tensor]:
    if not isinstance(saved, Mapping) or set(saved) != set(stat_keys) or not all(
        isinstance(v, torch.Tensor) and v.numel() == 1 for v in saved.values()
    ):
        raise ValueError(f"param group {index} of the state_dict has malformed 'stats'")
    return {k: saved[k].detach().to(like, copy=True).reshape(()) for k in stat_keys}


class GroupPlan:
    """One group's parameters with gradients and their state, kept while :meth:`holds`.

    ``params`` are the local shards for DTensor parameters (FSDP2), ``whole`` the parameters as the group
    holds them, ``offsets`` where each shard starts in its whole tensor, ``fresh`` which states were
    created for the coming step, ``cache`` the kernels' per-group cache (None for a sharded group), and
    ``state``/``state_size`` the optimizer's state mapping and its size when the plan was built.
    (A plain class: dynamo, tracing a compiled ``step()``, cannot pass a dataclass instance around.)
    """

    def __init__(self, *, with_grad: list[int], params: list[torch.Tensor], whole: list[torch.Tensor],
                 states: list[dict], layouts: list[BlockLayout], offsets: list[int], fresh: list[bool],
                 cache: dict | None, layout_key: tuple, state: Any) -> None:
        self.with_grad, self.params, self.whole, self.states, self.layouts = with_grad, params, whole, states, layouts
        self.offsets, self.fresh, self.cache, self.layout_key = offsets, fresh, cache, layout_key
        self.dtypes, self.devices = [p.dtype for p in whole], [p.device for p in whole]
        self.state, self.state_size = state, len(state)

    def holds(self, group, with_grad: list[int], state) -> bool:
        """Same parameters with gradients, dtypes, devices and layout settings, and the same state mapping
        with no entry added or removed (the kernels check that each state still holds their tensors)."""
        return (with_grad == self.with_grad and state is self.state and len(state) == self.state_size
                and [p.dtype for p in self.whole] == self.dtypes and [p.device for p in self.whole] == self.devices
                and _layout_key(group) == self.layout_key)


def _layout_key(group: Mapping[str, Any]) -> tuple:
    specs = group.get("block_layouts")
    return group["mini"], group["block_rows"], None if specs is None else list(specs)


def plan_group(group: dict[str, Any], states_by_param, seed: int, first_ordinal: int,
               with_grad: list[int]) -> GroupPlan:
    """The :class:`GroupPlan` of ``group``'s parameters ``with_grad``; their states are created in
    ``states_by_param`` (the optimizer's ``state``) on their first step and follow a conversion."""
    params, states, layouts, fresh = [], [], [], []
    for index in with_grad:
        p = group["params"][index]
        state = states_by_param[p]
        fresh.append(not state)
        if not state:
            state.update(init_state(group, p, seed, first_ordinal + index, index))
        elif converted(group, p, state):
            stats = group["stats"]
            for key, value in stats.items():
                stats[key] = value.to(p.device)
        layout = layout_of(group, p, index)
        if state["exp_avg_sq"].shape != layout.state_shape(p.shape):
            raise ValueError(
                f"the second-moment state of a parameter of shape {tuple(p.shape)} has shape "
                f"{tuple(state['exp_avg_sq'].shape)}, which does not match mini={group['mini']}, "
                f"block_rows={group['block_rows']} and its block_layouts; these cannot change after the first step")
        params.append(p)
        states.append(state)
        layouts.append(sharding.local_layout(layout, p))
    sharded = any(sharding.is_sharded(p) for p in params)
    return GroupPlan(
        with_grad=with_grad, whole=params,
        params=[sharding.local(p) for p in params] if sharded else params,
        states=[sharding.local_state(s) for s in states] if sharded else states, layouts=layouts,
        offsets=[sharding.index_offset(p) for p in params], fresh=fresh, cache=None if sharded else {},
        layout_key=_layout_key(group), state=states_by_param)
