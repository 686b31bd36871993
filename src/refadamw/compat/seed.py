"""Drop-in front doors with the original optimizers' names and signatures (SPEC.md §5).

``RefAdamWminiScheduleFree`` and ``AdamWminiScheduleFree`` take the seed's
constructor arguments and ``step(closure, loss, max_steps, val_loss)``, so
an existing script runs unchanged. What they build:

* default: the product, :class:`refadamw.RefAdamWMiniSF` /
  :class:`refadamw.AdamWMiniSF`. Only the arguments the caller actually
  passes are forwarded, so everything else keeps the product's measured
  defaults, not the seed's (the seed's ``weight_decay=0.01``,
  ``ref_alpha=0.5``, ``max_lr=1e-2`` cap were part of what made it trail
  AdamW). Mapping: ``ref_max_steps`` → ``total_steps``, ``dtype`` →
  ``state_dtype``; ``lr``, ``betas``, ``eps``, ``weight_decay``, ``min_lr``,
  ``max_lr``, ``schedulefree_alpha`` and ``ref_alpha`` keep their names.
  The seed's unused ``ref_window`` (an int), ``ref_base_eps`` and
  ``ref_min_eps`` are dropped with a one-time log note; a ``(start, end)``
  pair is the product's ``ref_window``. Product-only keywords
  (``total_steps``, ``state_dtype``, ``auto_lr``, ...) pass through.
* the seed's own arithmetic, in fp32, is its own explicit class,
  :class:`~refadamw.compat.legacy.LegacyRefAdamWminiScheduleFree` (and
  ``LegacyAdamWminiScheduleFree``; :mod:`refadamw.compat.legacy`). Unstable; for
  reproducing old runs only. ``legacy=True`` on a front door still builds one for
  old scripts and kohya configs; the object is then a legacy class, not an
  instance of the front door, and a one-time log line says so.

The class names end in "ScheduleFree", so kohya sd-scripts switches
``train()``/``eval()`` around sampling and saving and the saved LoRA holds the
averaged weights ``x`` (docs/migrating.md).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ..optimizer import AdamWMiniSF, RefAdamWMiniSF
from ..validation import NOT_GIVEN, check_bool, check_signal, check_steps
from ..precision import parse_state_dtype
from .legacy import LegacyAdamWminiScheduleFree, LegacyRefAdamWminiScheduleFree, note_once

_SEED_ARGS = ("lr", "betas", "eps", "weight_decay", "min_lr", "max_lr", "schedulefree_alpha", "dtype")
_REF_SEED_ARGS = _SEED_ARGS + ("ref_alpha", "ref_window", "ref_base_eps", "ref_min_eps", "ref_max_steps")
_UNUSED = ("ref_window", "ref_base_eps", "ref_min_eps")
_AUTO_LR_ARGS = ("min_lr", "max_lr", "schedulefree_alpha")


def _seed_kwargs(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The seed arguments the caller passed, by name (positional ones included)."""
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments: the original signature takes params and {len(names)} more")
    passed = dict(zip(names, args))
    for name in passed:
        if name in kwargs:
            raise TypeError(f"{name} was given both by position and by keyword")
    return {**passed, **kwargs}


def _state_dtype(dtype: Any) -> Any:
    try:
        return parse_state_dtype(dtype)
    except (TypeError, ValueError) as error:
        raise type(error)(f"dtype={dtype!r} (the state dtype): {error}") from None


def _build_legacy(legacy_cls: type, names: tuple[str, ...], params: Any, args: tuple,
                  kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    seed = _seed_kwargs(names, args, kwargs)
    extra = sorted(set(seed) - set(names))
    if extra:
        raise TypeError(f"legacy=True takes only the original arguments {list(names)}; got {extra}")
    _note_unused(seed)
    return legacy_cls(params, **seed)


def _note_unused(seed: dict[str, Any]) -> None:
    given = [name for name in _UNUSED if name in seed and not (name == "ref_window" and _is_pair(seed[name]))]
    if given:
        note_once("seed-unused", f"{', '.join(given)}: accepted for compatibility; the original optimizer "
                                 "never used them, and neither do we")


def _is_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def _product_kwargs(names: tuple[str, ...], seed: dict[str, Any]) -> dict[str, Any]:
    """Map the seed arguments the caller gave onto the product's keywords."""
    unused = [name for name in _UNUSED if name in names]  # the AdamW front door never had them
    out = {k: v for k, v in seed.items() if k not in ("dtype", *unused)}
    dtype = out.get("state_dtype", NOT_GIVEN)
    if "dtype" in seed and seed["dtype"] is not None:
        if dtype is not NOT_GIVEN and _state_dtype(seed["dtype"]) != parse_state_dtype(dtype):
            raise ValueError(f"dtype={seed['dtype']!r} and state_dtype={dtype!r} disagree; pass only one")
        out["state_dtype"] = _state_dtype(seed["dtype"])
    window = seed.get("ref_window", NOT_GIVEN) if unused else NOT_GIVEN
    if window is not NOT_GIVEN:
        if _is_pair(window):
            out["ref_window"] = tuple(window)  # the product's (start, end) window
        elif isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"ref_window must be the original's (unused) int or a (start, end) pair, got {window!r}")
    for name in ("ref_base_eps", "ref_min_eps"):
        if name in unused and name in seed and (isinstance(seed[name], bool) or not isinstance(seed[name], numbers.Real)):
            raise TypeError(f"{name} (unused by the original optimizer) must be a number, got {seed[name]!r}")
    _note_unused({k: v for k, v in seed.items() if k in unused})
    if any(name in seed for name in _AUTO_LR_ARGS) and out.get("auto_lr") is not True:
        note_once("seed-auto-lr", "min_lr/max_lr/schedulefree_alpha only act with auto_lr=True, which is off "
                                  "by default in refadamw (it lost in the benchmark); pass auto_lr=True to use them")
    return out


def _front_door_new(cls: type, args: tuple, legacy: bool, kwargs: dict[str, Any]) -> Any:
    """``legacy=True`` builds the legacy optimizer instead (Python then skips ``cls.__init__``)."""
    check_bool("legacy", legacy)
    if not legacy:
        return object.__new__(cls)
    if not args and "params" not in kwargs:
        raise TypeError(f"{cls.__name__}() needs params")
    kwargs = dict(kwargs)
    params = args[0] if args else kwargs.pop("params")
    note_once("legacy-class", f"{cls.__name__}(legacy=True) builds a {cls._legacy_cls.__name__}, the explicit class "
                              "of the original arithmetic (not an instance of the front door); use that class directly")
    return _build_legacy(cls._legacy_cls, cls._names, params, args[1:], kwargs)


class _SeedSignature:
    """The original constructor signature, mapped onto the product's keywords (or ``legacy=True``)."""

    _names: tuple[str, ...]
    _legacy_cls: type

    def __new__(cls, *args: Any, legacy: bool = False, **kwargs: Any):
        return _front_door_new(cls, args, legacy, kwargs)

    def __init__(self, params: Any, *args: Any, legacy: bool = False, **kwargs: Any) -> None:
        super().__init__(params, **_product_kwargs(self._names, _seed_kwargs(self._names, args, kwargs)))


class AdamWminiScheduleFree(_SeedSignature, AdamWMiniSF):
    """Front door with the original ``AdamWminiScheduleFree`` signature (see the module doc).

    ``AdamWminiScheduleFree(params, lr, betas, eps, weight_decay, min_lr, max_lr,
    schedulefree_alpha, dtype, *, legacy=False, **refadamw_kwargs)``.
    """

    _names = _SEED_ARGS
    _legacy_cls = LegacyAdamWminiScheduleFree

    @torch.no_grad()
    def step(self, closure=None, loss=None, max_steps=None, val_loss=None):
        """The original signature; ``loss``, ``max_steps``, ``val_loss`` are checked and unused
        (this optimizer has no controller, like the original)."""
        check_signal("loss", loss)
        check_signal("val_loss", val_loss)
        check_steps("max_steps", max_steps)
        return self._step(closure)


class RefAdamWminiScheduleFree(_SeedSignature, RefAdamWMiniSF):
    """Front door with the original ``RefAdamWminiScheduleFree`` signature (see the module doc).

    ``RefAdamWminiScheduleFree(params, lr, betas, eps, weight_decay, min_lr, max_lr,
    schedulefree_alpha, dtype, ref_alpha, ref_window, ref_base_eps, ref_min_eps,
    ref_max_steps, *, legacy=False, **refadamw_kwargs)``.
    """

    _names = _REF_SEED_ARGS
    _legacy_cls = LegacyRefAdamWminiScheduleFree

    @torch.no_grad()
    def step(self, closure=None, loss=None, max_steps=None, val_loss=None):
        """The original signature, positional or by keyword; see :meth:`refadamw.RefAdamWMiniSF.step`."""
        return self._step(closure, loss=loss, val_loss=val_loss, max_steps=max_steps)
