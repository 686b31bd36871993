"""Block partition for the second moment (Adam-mini).

SPEC.md §3 item 3, after Zhang et al., "Adam-mini: Use Fewer Learning Rates To
Gain More" (2024). Instead of one ``v`` per element, a block of elements
shares one ``v``, the mean of its squared gradients:

    v_b ← β2·v_b + (1−β2)·mean_{i∈b}(g_i²)

A layout names the *block axes*: the dims whose index picks the block; the
mean runs over all the other dims. The last block axis may group ``k``
consecutive slices into one block (e.g. the rows of one attention head).

The default layout is by shape:

* 2-d tensors of any size, and tensors of 3 or more dimensions with at
  least :data:`SMALL_NUMEL` elements, get one block per slice along dim 0
  (one per output row, output channel or embedding row);
* 0-d and 1-d tensors (biases, norms) and small tensors of 3 or more
  dimensions keep a per-element ``v``; their state is small anyway.

Small 2-d tensors are mostly LoRA factors, ``(r, in)`` and ``(out, r)``:
``refadamw bench --suite lora`` measured row blocks for them within 0.6% of
per-element ``v`` in validation loss, at half the state (docs/algorithm.md).

A param group may set ``block_rows`` to group several consecutive dim-0
slices of its tensors of at least :data:`SMALL_NUMEL` elements into one
block (smaller ones keep one block per row), and ``mini=False`` gives the
plain per-element ``v`` of Adam. A per-parameter layout spec (the ``block_layouts`` group key, which
:func:`refadamw.param_groups` fills from the model) overrides the shape rule;
see :func:`parse_spec`. It is how a weight whose output axis is not dim 0
gets per-output blocks: HF ``Conv1D`` stores ``(in, out)`` (``"columns"``),
fused MoE experts ``(experts, out, in)`` (``((0, 1), 1)``, one block per
expert and output row).

Dim-0 blocks never straddle the shards of FSDP2 (which shards dim 0); layouts
whose block axes leave out dim 0 would need a reduction across ranks and are
refused there (:func:`refadamw.sharding.local_layout`). Blocked views only
unflatten one dim, which is a view for any memory layout (channels_last
included), so no copy is ever made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SMALL_NUMEL = 4096
"""Under the shape rule, tensors of 3+ dims with fewer elements keep a per-element ``v``, and
``block_rows`` applies only to tensors of at least this many elements."""

NAMED_AXES = {"rows": (0,), "columns": (1,)}
"""Spec names for single block axes: ``"rows"`` = dim 0, ``"columns"`` = dim 1."""


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter tensor is split into second-moment blocks.

    ``n_blocks is None`` means per element: ``v`` has the parameter's shape.
    Otherwise ``axes`` (increasing) are the block axes and ``block_rows``
    consecutive slices of the last one form a block; ``v`` has the shape of
    the block axes, the last divided by ``block_rows`` (``(n_blocks,)`` for the
    default dim-0 layout), and ``n_blocks`` is its element count.
    """

    n_blocks: int | None = None
    block_rows: int = 1
    axes: tuple[int, ...] = (0,)

    @property
    def per_element(self) -> bool:
        return self.n_blocks is None

    @property
    def contiguous(self) -> bool:
        """Whether each block is one contiguous run of a row-major tensor (block axes lead)."""
        return self.per_element or self.axes == tuple(range(len(self.axes)))

    def state_shape(self, param_shape: torch.Size) -> torch.Size:
        """Shape of ``v`` for a parameter of ``param_shape``."""
        if self.per_element:
            return torch.Size(param_shape)
        *lead, last = self.axes
        return torch.Size([param_shape[a] for a in lead] + [param_shape[last] // self.block_rows])

    def blocked(self, t: torch.Tensor) -> torch.Tensor:
        """View ``t`` (parameter-shaped) with the last block axis split into ``(blocks, block_rows)``."""
        if self.per_element:
            return t
        last = self.axes[-1]
        return t.unflatten(last, (t.shape[last] // self.block_rows, self.block_rows))

    def broadcastable(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """View ``v`` so it broadcasts against ``blocked(t)`` of an ``ndim``-d tensor."""
        if self.per_element:
            return v
        shape = [1] * (ndim + 1)
        for axis, size in zip(self.axes, v.shape):
            shape[axis] = size
        return v.view(shape)

    def mean_square(self, blocked_grad: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``mean_{i∈b}(g_i²)`` per block, shaped like ``v``, computed in ``dtype`` (default: the gradient's;
        a bf16/fp16 gradient is read as it is, without an upcast copy)."""
        if self.per_element:
            g = blocked_grad if dtype is None else blocked_grad.to(dtype)
            return g * g
        dims = tuple(d for d in range(blocked_grad.dim()) if d not in self.axes)
        block_numel = math.prod([blocked_grad.shape[d] for d in dims])
        # A norm reads the gradient once and allocates only one value per block.
        return torch.linalg.vector_norm(blocked_grad, dim=dims, dtype=dtype).square_().div_(block_numel)

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        """Contiguous ``t`` viewed for an elementwise pass against :meth:`grid_v`: ``(n_blocks, block_numel)``
        when blocks are contiguous runs, else the blocked view with size-1 dims dropped and neighbouring
        dims of one kind (block axes or not) merged, so that few shapes of view serve every layout."""
        if self.contiguous:
            return t.view(t.numel() if self.per_element else self.n_blocks, -1)
        return t.view([size for size, _ in self._runs(t.shape)])

    def grid_v(self, v: torch.Tensor, param_shape: torch.Size) -> torch.Tensor:
        """``v`` viewed to broadcast against :meth:`grid` of a parameter of ``param_shape``."""
        if self.contiguous:
            return v.view(v.numel(), 1)
        return v.view([size if kept else 1 for size, kept in self._runs(param_shape)])

    def _runs(self, shape) -> list[tuple[int, bool]]:
        last = self.axes[-1]
        sizes = [*shape[:last], shape[last] // self.block_rows, self.block_rows, *shape[last + 1:]]
        runs: list[list] = []
        for dim, size in enumerate(sizes):
            kept = dim in self.axes
            if size == 1:
                continue
            if runs and runs[-1][1] == kept:
                runs[-1][0] *= size
            else:
                runs.append([size, kept])
        return [(size, kept) for size, kept in runs]

    def for_shape(self, shape: torch.Size | tuple[int, ...]) -> BlockLayout:
        """The same block axes and size for a tensor of ``shape`` (e.g. a shard)."""
        return self if self.per_element else _blocks(self.axes, self.block_rows, shape)


def _blocks(axes: tuple[int, ...], size: int, shape) -> BlockLayout:
    *lead, last = axes
    return BlockLayout(n_blocks=math.prod([shape[a] for a in lead]) * (shape[last] // size), block_rows=size, axes=axes)


def large(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether the shape rule gives a tensor of ``shape`` blocks (else per-element ``v``)."""
    numel = math.prod(shape)
    return (len(shape) == 2 and numel > 0) or (len(shape) > 2 and numel >= SMALL_NUMEL)


def parse_spec(spec: Any, name: str = "the parameter") -> tuple[tuple[int, ...], int] | None:
    """Block axes and size of a per-parameter layout spec, or None for per-element ``v``.

    A spec is plain data, so it is saved in ``state_dict()["param_groups"]``:

    * ``"element"``: per-element ``v``;
    * ``"rows"`` / ``"columns"``: one block per slice along dim 0 / dim 1;
    * ``("rows", k)`` / ``("columns", k)``: ``k`` consecutive slices per block
      (``k`` = head dim gives one block per attention head);
    * ``(axes, k)`` with ``axes`` increasing dims: one block per index of the
      block axes, ``k`` slices of the last one per block; ``((0, 1), 1)`` is one
      block per (expert, output row) of an ``(experts, out, in)`` tensor.
    """
    if spec == "element":
        return None
    if isinstance(spec, str):
        spec = (spec, 1)
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
        raise ValueError(f"the block layout of {name} must be 'element', 'rows', 'columns', "
                         f"('rows'|'columns', k) or (axes, k), got {spec!r}")
    axes, size = spec
    if isinstance(axes, str):
        if axes not in NAMED_AXES:
            raise ValueError(f"the block layout of {name} names unknown axes {axes!r}; use 'rows' or 'columns'")
        axes = NAMED_AXES[axes]
    if not (isinstance(axes, (tuple, list)) and axes and all(isinstance(a, int) and not isinstance(a, bool)
                                                              and a >= 0 for a in axes)
            and all(a < b for a, b in zip(axes, axes[1:]))):
        raise ValueError(f"the block axes of {name} must be increasing dims >= 0, got {axes!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the block size of {name} must be a positive int, got {size!r}")
    return tuple(axes), size


def block_layout(shape: torch.Size | tuple[int, ...], mini: bool = True, block_rows: int = 1, spec: Any = None,
                 name: str = "the parameter") -> BlockLayout:
    """Choose the second-moment layout for a tensor of ``shape``.

    ``mini=False`` is per element whatever the spec; otherwise a ``spec``
    (:func:`parse_spec`) overrides the shape rule and the group's ``block_rows``.
    """
    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if spec is not None:
        parsed = parse_spec(spec, name)
        if not mini or parsed is None:
            return BlockLayout()
        axes, size = parsed
        if axes[-1] >= len(shape):
            raise ValueError(f"the block axes {axes} of {name} do not exist in its shape {tuple(shape)}")
        if shape[axes[-1]] % size:
            raise ValueError(f"block size {size} does not divide dim {axes[-1]} of {name}, of shape {tuple(shape)}")
        return _blocks(axes, size, shape) if math.prod(shape) else BlockLayout()
    if not mini or not large(shape):
        return BlockLayout()
    if math.prod(shape) < SMALL_NUMEL:
        block_rows = 1  # a small 2-d tensor (a LoRA factor, say): heads are a large tensor's rows
    rows = shape[0]
    if rows % block_rows:
        raise ValueError(
            f"block_rows={block_rows} does not divide dim 0 of a parameter of shape {tuple(shape)}"
        )
    return BlockLayout(n_blocks=rows // block_rows, block_rows=block_rows)
