"""Param groups without weight decay for biases and normalization weights (SPEC.md §4)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch

DEFAULT_NO_DECAY = ("bias", "norm")
"""Name fragments (case-insensitive) whose parameters get no weight decay."""


def param_groups(
    model_or_named_params: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    no_decay: Iterable[str] = DEFAULT_NO_DECAY,
) -> list[dict[str, Any]]:
    """Two param groups: ``weight_decay`` for the weights, 0 for biases and norms.

    A parameter gets no decay when it has fewer than 2 dimensions (biases,
    LayerNorm/RMSNorm scales) or its name contains one of ``no_decay``
    (case-insensitive; e.g. ``"embed"`` to exempt embeddings too). Frozen
    parameters (``requires_grad=False``) are left out. The groups hold
    ``(name, param)`` pairs, so the optimizer's ``state_dict`` carries the
    names. A group with no parameters is left out::

        opt = RefAdamWMiniSF(param_groups(model, weight_decay=0.1), lr=1e-3)

    Args:
        model_or_named_params: a module, or ``(name, parameter)`` pairs such
            as ``model.named_parameters()``.
        weight_decay: decay of the decayed group (>= 0).
        no_decay: name fragments whose parameters are not decayed.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(no_decay, str):
        raise TypeError(f"no_decay must be a collection of name fragments, not the string {no_decay!r}")
    fragments = [f for f in no_decay]
    if not all(isinstance(f, str) and f for f in fragments):
        raise TypeError(f"no_decay must hold non-empty strings, got {fragments!r}")
    fragments = [f.lower() for f in fragments]
    if isinstance(model_or_named_params, torch.nn.Module):
        named = model_or_named_params.named_parameters()
    elif isinstance(model_or_named_params, torch.Tensor) or not isinstance(model_or_named_params, Iterable):
        raise TypeError(
            "param_groups takes a module or (name, parameter) pairs such as model.named_parameters(), "
            f"got {type(model_or_named_params).__name__}"
        )
    else:
        named = model_or_named_params
    decay, plain, seen = [], [], set()
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, parameter) pairs, got {item!r:.80}")
        name, param = item
        if id(param) in seen:
            raise ValueError(f"parameter {name!r} appears twice")
        seen.add(id(param))
        if not param.requires_grad:
            continue
        exempt = param.dim() < 2 or any(f in name.lower() for f in fragments)
        (plain if exempt else decay).append((name, param))
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
