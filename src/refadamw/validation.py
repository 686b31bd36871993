"""Argument checks: one helper per kind of value, each raising an error that names the argument.

The optimizer, the controller, the seed front doors and the legacy
optimizers all use these, so one argument reads the same wherever it is
given. Checks run at construction, on ``add_param_group`` and on load, never
inside ``step()`` (a tensor argument is read on the host here).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from .precision import parse_state_dtype


def check_number(name: str, value: Any, low: float, *, low_open: bool = False, high: float | None = None,
                 high_open: bool = False, finite: bool = False) -> float:
    """A real number (or a 1-element float tensor) in ``[low, high]``, ends open where asked; returns it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")  # torch's words
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a number or a 1-element float tensor, got {value!r}")
        value = value.detach().cpu().item()
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
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "") -> int:
    """A Python int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}{note}, got {value!r}")
    return value


def check_steps(name: str, value: Any, note: str = "") -> int | None:
    """A step count: a positive int, or None for "not given"."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None{note}, got {value!r}")
    return value


def check_signal(name: str, value: Any) -> None:
    """A controller signal: None, a Python number or a real 0-dim tensor (never read on the host)."""
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


def check_sequence(name: str, values: Any, n: int, low: float, high: float | None = None, *,
                   increasing: bool = False, what: str = "") -> tuple[float, ...]:
    """``n`` numbers in ``[low, high]`` (non-decreasing where asked), as a tuple."""
    if not isinstance(values, (tuple, list)) or len(values) != n:
        raise TypeError(f"{name} must be {what or f'a sequence of {n} numbers'}, got {values!r}")
    out = tuple(check_number(f"{name}[{i}]", v, low, high=high) for i, v in enumerate(values))
    if increasing and any(a > b for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {out}")
    return out


NOT_GIVEN: Any = type("_NotGiven", (), {"__repr__": lambda self: "<not given>"})()


def check_alias(name: str, value: Any, default: Any, alias: str, given: Any) -> Any:
    """``value``, or ``given``, the value passed under the seed's name ``alias`` (NOT_GIVEN: none)."""
    if given is NOT_GIVEN:
        return value
    if value != default and value != given:
        raise ValueError(f"{name}={value!r} and its alias {alias}={given!r} (the seed's name) disagree")
    return given


def check_hyperparameters(g: Mapping[str, Any], spelled: Mapping[str, str] | None = None) -> None:
    """Raise a ValueError/TypeError naming the first bad hyperparameter of param group ``g``.

    ``spelled`` maps a key to the name the caller gave it under (a seed alias), for the message."""
    spelled = spelled or {}
    if g.get("lr_free", False) is not None:
        check_bool("lr_free", g.get("lr_free", False))
    if g["lr"] is not None:  # None: the lr-free step size (refadamw.lr_free.resolve_mode)
        check_number("lr", g["lr"], 0.0, finite=True)
    check_number("lr_free_scale", g.get("lr_free_scale", 1.0), 0.0, low_open=True, finite=True)
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, 0.0, high=1.0, high_open=True)
    check_number("eps", g["eps"], 0.0, low_open=True, finite=True)  # eps = 0 turns a zero gradient into 0/0
    check_number("weight_decay", g["weight_decay"], 0.0, finite=True)
    if isinstance(g.get("averaging_power"), torch.Tensor):  # it picks a branch in step(): a tensor would sync
        raise TypeError("averaging_power must be a Python number, not a tensor")
    # t^r overflows fp64 past r ≈ 34 within a billion steps; r = 16 already averages only the last t/17 or so
    if g.get("averaging_power") is not None:  # None: settled by the group's mode (refadamw.lr_free.resolve_mode)
        check_number("averaging_power", g["averaging_power"], 0.0, high=16.0)
    check_int("warmup_steps", g["warmup_steps"], 0)
    for flag in ("auto_lr", "mini", "schedule_free"):
        check_bool(flag, g[flag])
    for bound in ("min_lr", "max_lr"):
        if g[bound] is not None:
            check_number(bound, g[bound], 0.0, finite=bound == "min_lr")
    if g["min_lr"] is not None and g["max_lr"] is not None and g["min_lr"] > g["max_lr"]:
        raise ValueError(f"min_lr ({g['min_lr']}) must not exceed max_lr ({g['max_lr']})")
    check_number(spelled.get("norm_ema_alpha", "norm_ema_alpha"), g["norm_ema_alpha"], 0.0, low_open=True, high=1.0)
    if g["schedule_free"] and betas[0] == 0:
        raise ValueError(
            "betas[0] must be > 0 when schedule_free=True: the average x = y - (1-beta1)/beta1·(z - y) "
            "cannot be recovered with beta1 = 0"
        )
    check_int("block_rows", g["block_rows"], 1)
    parse_state_dtype(g["state_dtype"])
    for flag in ("foreach", "fused"):
        if g[flag] is not None:
            check_bool(flag, g[flag])
    if g["fused"] and g["foreach"] is False:
        raise ValueError("fused=True runs inside the multi-tensor path; it cannot be combined with foreach=False")


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")
    return value


_FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16,
                           *(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))})


def check_grads(param_groups: list[dict[str, Any]], owner: str) -> None:
    """Refuse a bad gradient before anything (state, controller) has changed. One cheap pass per step;
    the detailed checks run only for a group with a gradient that fails it."""
    ordinal = 0
    for group in param_groups:
        params = group["params"]
        if not all(p.grad is None or (p.grad.dtype in _FLOAT_DTYPES and p.grad.layout is torch.strided
                                      and p.grad.shape == p.shape) for p in params):
            for index, p in enumerate(params, ordinal):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"{owner} does not support sparse gradients")
                if g.is_complex():
                    raise TypeError("complex gradients are not supported")
                if not g.is_floating_point():
                    raise TypeError(f"the gradient of parameter {index} has dtype {g.dtype}; "
                                    "gradients must be floating point")
                if g.shape != p.shape:
                    raise ValueError(f"the gradient of parameter {index} has shape {tuple(g.shape)}, "
                                     f"but the parameter has shape {tuple(p.shape)}")
        ordinal += len(params)
