"""Param groups without weight decay for biases and normalization weights (SPEC.md §4),
with the second-moment layout of weights whose output axis is not dim 0."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .partition import large, parse_spec

DEFAULT_NO_DECAY = ("bias", "norm")
"""Name fragments (case-insensitive) whose parameters get no weight decay."""


def param_groups(
    model_or_named_params: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    no_decay: Iterable[str] = DEFAULT_NO_DECAY,
    block_layouts: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Two param groups: ``weight_decay`` for the weights, 0 for biases and norms.

    A parameter gets no decay when it has fewer than 2 dimensions (biases,
    LayerNorm/RMSNorm scales) or its name contains one of ``no_decay``
    (case-insensitive; e.g. ``"embed"`` to exempt embeddings too). Frozen
    parameters (``requires_grad=False``) are left out. The groups hold
    ``(name, param)`` pairs, so the optimizer's ``state_dict`` carries the
    names. A group with no parameters is left out::

        opt = RefAdamWMiniSF(param_groups(model, weight_decay=0.1), lr=1e-3)

    Given a module, the groups carry ``block_layouts`` (one second-moment
    layout spec per parameter, :func:`refadamw.partition.parse_spec`) where
    the module tells the output axis and the shape rule would get it wrong:

    * HF ``Conv1D`` (GPT-2 and its family) stores its weight ``(in, out)``:
      ``"columns"``, one block per output unit;
    * transformers' fused MoE experts store ``(experts, out, in)`` (or
      ``(experts, in, out)`` when ``is_transposed``): one block per expert
      and output unit, ``((0, 1), 1)`` (or ``((0, 2), 1)``).

    ``block_layouts`` maps parameter names to specs that override these and
    the shape rule, e.g. per-head blocks for Q and K without a group per
    tensor: ``{name: ("rows", head_dim) for name in q_and_k_names}``.

    Args:
        model_or_named_params: a module, or ``(name, parameter)`` pairs such
            as ``model.named_parameters()``.
        weight_decay: decay of the decayed group (>= 0).
        no_decay: name fragments whose parameters are not decayed.
        block_layouts: parameter name → layout spec, overriding the model's
            and the shape rule's layouts.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(no_decay, str):
        raise TypeError(f"no_decay must be a collection of name fragments, not the string {no_decay!r}")
    fragments = [f for f in no_decay]
    if not all(isinstance(f, str) and f for f in fragments):
        raise TypeError(f"no_decay must hold non-empty strings, got {fragments!r}")
    fragments = [f.lower() for f in fragments]
    overrides = dict(block_layouts or {})
    for key, spec in overrides.items():
        parse_spec(spec, f"parameter {key!r}")  # raises on a malformed spec, naming the parameter
    if isinstance(model_or_named_params, torch.nn.Module):
        named = model_or_named_params.named_parameters()
        specs = model_layouts(model_or_named_params)
    elif isinstance(model_or_named_params, torch.Tensor) or not isinstance(model_or_named_params, Iterable):
        raise TypeError(
            "param_groups takes a module or (name, parameter) pairs such as model.named_parameters(), "
            f"got {type(model_or_named_params).__name__}"
        )
    else:
        named, specs = model_or_named_params, {}
    specs.update(overrides)
    decay, plain, seen, names = [], [], set(), set()
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, parameter) pairs, got {item!r:.80}")
        name, param = item
        if id(param) in seen:
            raise ValueError(f"parameter {name!r} appears twice")
        seen.add(id(param))
        names.add(name)
        if not param.requires_grad:
            continue
        exempt = param.dim() < 2 or any(f in name.lower() for f in fragments)
        (plain if exempt else decay).append((name, param))
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"block_layouts names parameters the model does not have: {unknown}")
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]
    for group in groups:
        layouts = [specs.get(name) for name, _ in group["params"]]
        if any(spec is not None for spec in layouts):
            group["block_layouts"] = layouts
    return [g for g in groups if g["params"]]


def model_layouts(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter name → layout spec for the weights whose module says where their output axis is.

    Tensors the shape rule leaves per element (:func:`refadamw.partition.large`) stay so.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # loaded with any transformers model
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    specs = {}
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if conv1d is not None and isinstance(module, conv1d) and large(module.weight.shape):
            specs[dot + "weight"] = "columns"  # (in, out): x @ W
        elif isinstance(getattr(module, "is_transposed", None), bool) and hasattr(module, "num_experts"):
            # transformers' @use_experts_implementation: (experts, out, in), or (experts, in, out) if transposed
            spec = ((0, 2), 1) if module.is_transposed else ((0, 1), 1)
            for name, param in module.named_parameters(recurse=False):
                if param.dim() == 3 and large(param.shape):
                    specs[dot + name] = spec
    return specs
