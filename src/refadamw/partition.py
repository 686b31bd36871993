"""Block partition for the second moment (Adam-mini).

SPEC.md §3 item 3, after Zhang et al., "Adam-mini: Use Fewer Learning Rates To
Gain More" (2024). Instead of one ``v`` per element, a block of elements
shares one ``v``, the mean of its squared gradients:

    v_b ← β2·v_b + (1−β2)·mean_{i∈b}(g_i²)

The default layout is by shape:

* tensors with 2 or more dimensions and at least :data:`SMALL_NUMEL`
  elements get one block per slice along dim 0 (one per output row, output
  channel or embedding row);
* 0-d and 1-d tensors (biases, norms) and small tensors keep a per-element
  ``v``; their state is small anyway.

A param group may set ``block_rows`` to group several consecutive dim-0
slices into one block (for example the rows of one attention head), and
``mini=False`` gives the plain per-element ``v`` of Adam.

Blocks run along dim 0 because that is the dimension FSDP2 shards, so a block
never straddles two ranks. Blocked views split dim 0 only, which is a view for
any memory layout (channels_last included), so no copy is ever made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SMALL_NUMEL = 4096
"""Tensors with fewer elements than this keep a per-element ``v``."""


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter tensor is split into second-moment blocks.

    ``n_blocks is None`` means per element: ``v`` has the parameter's shape.
    Otherwise ``v`` has shape ``(n_blocks,)`` and block ``b`` covers dim-0
    slices ``[b·block_rows, (b+1)·block_rows)``.
    """

    n_blocks: int | None = None
    block_rows: int = 1

    @property
    def per_element(self) -> bool:
        return self.n_blocks is None

    def state_shape(self, param_shape: torch.Size) -> torch.Size:
        """Shape of ``v`` for a parameter of ``param_shape``."""
        if self.per_element:
            return torch.Size(param_shape)
        return torch.Size((self.n_blocks,))

    def blocked(self, t: torch.Tensor) -> torch.Tensor:
        """View ``t`` (parameter-shaped) as ``(n_blocks, block_rows, *rest)``."""
        if self.per_element:
            return t
        return t.unflatten(0, (self.n_blocks, self.block_rows))

    def broadcastable(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """View ``v`` so it broadcasts against ``blocked(t)`` of an ``ndim``-d tensor."""
        if self.per_element:
            return v
        return v.view(self.n_blocks, *([1] * ndim))

    def mean_square(self, blocked_grad: torch.Tensor) -> torch.Tensor:
        """``mean_{i∈b}(g_i²)`` per block, shaped like ``v``."""
        if self.per_element:
            return blocked_grad * blocked_grad
        dims = tuple(range(1, blocked_grad.dim()))
        block_numel = blocked_grad[0].numel()
        # A norm reads the gradient once and allocates only one value per block.
        return torch.linalg.vector_norm(blocked_grad, dim=dims).square_().div_(block_numel)


def block_layout(shape: torch.Size | tuple[int, ...], mini: bool = True, block_rows: int = 1) -> BlockLayout:
    """Choose the second-moment layout for a tensor of ``shape``."""
    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    numel = math.prod(shape)
    if not mini or len(shape) < 2 or numel < SMALL_NUMEL:
        return BlockLayout()
    rows = shape[0]
    if rows % block_rows:
        raise ValueError(
            f"block_rows={block_rows} does not divide dim 0 of a parameter of shape {tuple(shape)}"
        )
    return BlockLayout(n_blocks=rows // block_rows, block_rows=block_rows)
