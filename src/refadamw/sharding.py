"""Sharded parameters (``DTensor``, as FSDP2's ``fully_shard`` makes them).

The kernels work on plain tensors. For a ``DTensor`` parameter the optimizer
hands them the rank's local shard, its local gradient and local views of the
state, so every update is shard-local:

* the second-moment blocks are indexed by dim 0, the dimension FSDP2
  shards, so a block never straddles two ranks (:func:`local_layout` checks
  it and refuses layouts where it would);
* the state tensors are ``DTensor`` s with the parameter's mesh and
  placements (:func:`like_param`), so ``torch.distributed.checkpoint`` saves
  them shard by shard, like the parameters;
* the stochastic-rounding noise of an element is keyed by its index in the
  whole tensor (:func:`index_offset`), so the ranks draw different noise and
  bf16 state comes out the same whatever the world size;
* a gradient norm is the one quantity that needs the whole tensor: the hygiene
  gate, auto-lr and the Ref controller all read it. :func:`global_norms`
  all-reduces the local sums of squares over the mesh dimensions the gradient
  is sharded on, with functional collectives (no host sync).

FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO hand an optimizer
flat 1-D shards that cut across many parameters instead: a mini block would
be a single element, a gradient norm would be the rank's piece of a flat
buffer, and under ZeRO ``eval()`` would change the fp32 partition, never the
weights the model evaluates with. :func:`check_supported` refuses what those
setups mark on a parameter, and :func:`warn_if_flat_partition` warns about
what looks like a ZeRO-1/2 partition (which carries no mark).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import torch

from .partition import BlockLayout


SUPPORTED_SETUPS = ("single device, DDP (DistributedDataParallel) and FSDP2 (torch.distributed.fsdp.fully_shard, "
                    "which shards each parameter along dim 0 as a DTensor)")

FLAT_PARTITION_MIN_NUMEL = 1 << 16
"""A param group holding one 1-D tensor at least this large looks like a ZeRO-1/2 flat partition."""


def check_supported(param: torch.Tensor) -> None:
    """Refuse a parameter that FSDP1 flattened or DeepSpeed ZeRO-3 partitioned, by the marks they leave.

    FSDP1 marks its ``FlatParameter`` and, with ``use_orig_params=True``, the
    original parameters it turned into views of one (``_fsdp_flattened``;
    ``FlatParameter`` also has ``_is_flat_param``). ZeRO-3 gives each
    partitioned parameter ``ds_id``, ``ds_numel`` and ``ds_tensor``.
    """
    if getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
        setup = "FSDP1 (FullyShardedDataParallel) keeps it in a flat 1-D FlatParameter shard"
    elif hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
        setup = "DeepSpeed ZeRO-3 partitioned it (it has ds_id/ds_numel)"
    else:
        return
    raise ValueError(
        f"a parameter of shape {tuple(param.shape)} is not supported: {setup}. Flat 1-D shards make every mini "
        f"second-moment block a single element and every gradient norm a rank's piece of a flat buffer, and "
        f"eval()/train() would not reach the weights the model runs with. Supported: {SUPPORTED_SETUPS}"
    )


def warn_if_flat_partition(params: list[torch.Tensor], mini: bool) -> None:
    """Warn when a param group is one large 1-D tensor, as DeepSpeed ZeRO-1/2 gives the optimizer.

    ZeRO-1/2 replaces each group's ``params`` with the rank's fp32 partition
    of all of them, flattened, after the optimizer was built, and marks it
    with nothing; this is a heuristic, and an ordinary group of one large 1-D
    parameter sets it off too.
    """
    if len(params) != 1 or params[0].dim() != 1 or params[0].numel() < FLAT_PARTITION_MIN_NUMEL or is_sharded(params[0]):
        return
    warnings.warn(
        f"a param group holds a single 1-D tensor of {params[0].numel()} elements, which is how DeepSpeed ZeRO-1/2 "
        f"hands an optimizer its flat fp32 partition. If it is one, {'mini blocks become per-element v, ' if mini else ''}"
        f"gradient norms (auto-lr, the Ref controller) are per rank, and eval() changes the partition, not the "
        f"weights the model evaluates with. Supported: {SUPPORTED_SETUPS}",
        stacklevel=4,
    )


def _dtensor_class():
    # A DTensor exists only once its module is imported (FSDP2 does), so look it up
    # instead of importing it: the import costs ~0.7 s, as much again as `import torch`.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor``."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a ``DTensor`` (it shares storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def local_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local views of a parameter's state; in-place writes reach the state."""
    if not any(is_sharded(v) for v in state.values()):
        return state
    return {key: local(value) for key, value in state.items()}


def _dim0_shards(param: torch.Tensor) -> int:
    """How many pieces the placements cut dim 0 into; raises if another dim is sharded."""
    pieces = 1
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard(0):
            pieces *= param.device_mesh.size(mesh_dim)
        elif placement.is_shard() or placement.is_partial():
            raise ValueError(
                f"mini second-moment blocks run along dim 0, but a parameter of shape {tuple(param.shape)} "
                f"has placements {param.placements}; shard it along dim 0 (FSDP2's default) or use "
                "mini=False for its param group"
            )
    return pieces


def local_layout(layout: BlockLayout, param: torch.Tensor) -> BlockLayout:
    """The block layout of ``param``'s local shard, given the layout of the whole tensor.

    The layout is chosen from the global shape (a shard may be small enough to
    fall under the per-element threshold; the blocks must not change with the
    world size). Shard boundaries must fall on block boundaries, so the block
    axes must include dim 0: a block that spans the sharded dim (dim-1 blocks
    of an ``(in, out)`` Conv1D weight, say) would need its mean square summed
    across ranks, which is not supported.
    """
    if not is_sharded(param) or layout.per_element:
        return layout
    pieces = _dim0_shards(param)
    if layout.axes[0] != 0 and pieces > 1:
        raise ValueError(
            f"second-moment blocks along dims {layout.axes} of a parameter of shape {tuple(param.shape)} span "
            f"its dim 0, which FSDP2 shards across ranks; this is not supported. Give it dim-0 blocks or "
            "per-element v: e.g. refadamw.param_groups(model, ..., block_layouts={name: 'rows'}) "
            "(or 'element'), or mini=False for its param group"
        )
    chunk = -(-param.shape[0] // pieces)  # rows per rank, as torch.chunk splits dim 0
    if layout.axes == (0,) and chunk % layout.block_rows:
        raise ValueError(
            f"block_rows={layout.block_rows} second-moment blocks would straddle ranks: a parameter of shape "
            f"{tuple(param.shape)} is sharded into {chunk} rows per rank; pick block_rows dividing {chunk}"
        )
    return layout.for_shape(param.to_local().shape)


def index_offset(t: torch.Tensor) -> int:
    """The index, in the whole flattened tensor, of the first element of ``t``'s local shard (0 if plain).

    Under FSDP2 a shard holds dim-0 rows ``[r0, r1)`` (``torch.chunk``
    semantics), a contiguous run of the flattened tensor that starts at
    ``r0·numel/rows``; local element ``i`` is global element ``offset + i``.
    The stochastic rounding is keyed by it (:func:`refadamw.precision.rounding_keys`).
    A shard cut along another dim is not such a run: it gets the index of
    its first element, so the ranks still draw different noise, but that noise
    then depends on the world size.
    """
    if not is_sharded(t):
        return 0
    return _shard_start(tuple(t.shape), t.device_mesh, tuple(t.placements))


@functools.lru_cache(maxsize=4096)  # per step and parameter otherwise; the rank's coordinates never change
def _shard_start(shape: tuple[int, ...], mesh, placements: tuple) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # loaded with DTensor

    _, start = compute_local_shape_and_global_offset(shape, mesh, placements)
    return sum(i * math.prod(shape[d + 1:]) for d, i in enumerate(start))


def like_param(local_tensor: torch.Tensor, param: torch.Tensor, global_shape: torch.Size) -> torch.Tensor:
    """Wrap a state tensor of ``param``'s local shard as a ``DTensor`` of ``global_shape``.

    It takes ``param``'s mesh and placements: a parameter-shaped buffer shards
    like the parameter, and a block vector (one entry per dim-0 block) shards
    along its only dim, block for block. A plain ``param`` returns ``local_tensor``.
    """
    if not is_sharded(param):
        return local_tensor
    stride = tuple(torch.empty(global_shape, device="meta").stride())
    return _dtensor_class().from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(global_shape), stride=stride)


def largest_local_numel(param: torch.Tensor) -> int:
    """The element count of the largest shard of ``param`` on any rank (torch.chunk's first chunk: FSDP2's)."""
    if not is_sharded(param):
        return param.numel()
    shape = list(param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            shape[placement.dim] = -(-shape[placement.dim] // param.device_mesh.size(mesh_dim))
    return math.prod(shape)


def per_rank(vector: torch.Tensor, param: torch.Tensor, length: int) -> torch.Tensor:
    """A rank's own 1-D ``vector`` (at most ``length`` long) as its row of a ``DTensor`` with one row per shard
    of ``param``, zero-padded to ``length``: ``torch.distributed.checkpoint`` then saves and loads every
    rank's row, where a plain tensor would be saved once, from one rank, and loaded into all."""
    from torch.distributed.tensor import Replicate, Shard  # loaded with DTensor already

    shard_dims = [i for i, placement in enumerate(param.placements) if placement.is_shard()]
    mesh = param.device_mesh
    row = torch.zeros(length, dtype=vector.dtype, device=vector.device)
    row[: vector.numel()] = vector
    placements = [Shard(shard_dims.index(i)) if i in shard_dims else Replicate() for i in range(mesh.ndim)]
    shape = torch.Size([mesh.size(i) for i in shard_dims] + [length])
    return _dtensor_class().from_local(row.view(*([1] * len(shard_dims)), length), mesh, placements,
                                       run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())


def from_per_rank(t: torch.Tensor, numel: int) -> torch.Tensor:
    """This rank's 1-D vector of ``numel`` values back from a :func:`per_rank` ``DTensor`` (others: ``t``)."""
    return t.to_local().reshape(-1)[:numel] if is_sharded(t) else t


def global_sums(tensors: list[torch.Tensor], local_values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole-tensor sums from per-shard ones: ``local_values[i]`` is a sum over the local shard of
    ``tensors[i]`` (possibly a ``DTensor``). Sharded ones are all-reduced (summed) over the mesh
    dimensions they are sharded on, one collective per mesh, dtype and mesh dimension; plain and
    replicated ones keep their value."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_sharded(t):
            dims = tuple(d for d, pl in enumerate(t.placements) if pl.is_shard())
            if dims:
                groups.setdefault((t.device_mesh, dims, local_values[i].dtype), []).append(i)
    if not groups:
        return local_values
    import torch.distributed._functional_collectives as funcol  # loaded with DTensor already

    out = list(local_values)
    for (mesh, dims, _), idx in groups.items():
        values = torch.stack([local_values[i] for i in idx])
        for dim in dims:
            values = funcol.all_reduce(values, "sum", (mesh, dim))
        for i, value in zip(idx, values.unbind()):
            out[i] = value
    return out


def global_norms(grads: list[torch.Tensor], local_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole-tensor 2-norms from the norms of the local shards: ``sqrt`` of the :func:`global_sums` of
    their squares for sharded gradients (overflow of the squares gives inf, which the hygiene gate
    treats like any non-finite norm); plain and replicated gradients keep their norm."""
    if not any(is_sharded(g) for g in grads):
        return local_norms
    squares = [n.square() for n in local_norms]
    summed = global_sums(grads, squares)
    return [n if s is q else s.sqrt() for n, q, s in zip(local_norms, squares, summed)]

