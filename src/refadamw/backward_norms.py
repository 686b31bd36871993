"""Each parameter's gradient norm as backward accumulates it, before a trainer clips it.

Trainers clip (and fp16 scalers unscale) between backward and ``step()``;
the controller must see the gradient before that
(:meth:`refadamw.controller.RefController.unclipped_norm` turns these norms and
the ones ``step()`` sees into the unclipped global norm). The hooks are not
state: a copy or an unpickled optimizer registers its own. They hold the
recorder weakly, so they outlive it harmlessly. DTensor (FSDP2) parameters
are not watched: their shards are reduce-scattered after the hook would run.
"""

from __future__ import annotations

import weakref

import torch

from . import sharding
from .kernels.common import stacked
from .precision import compute_dtype


def as_vector(recorded: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """Recorded norms as one fp32 vector on ``device``, 0 where none was recorded; None if none was."""
    if all(r is None for r in recorded):
        return None
    zero = torch.zeros((), device=device)
    return stacked([zero if r is None else r for r in recorded], device, torch.float32)


class BackwardNorms:
    """Post-accumulate-grad hooks that record ``‖grad‖`` per parameter (a device tensor: no sync)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._norms: dict[torch.Tensor, torch.Tensor] = {}
        owner = weakref.ref(self)

        def record(param: torch.Tensor) -> None:
            recorder = owner()
            if recorder is not None and param.grad is not None:
                recorder._norms[param] = torch.linalg.vector_norm(param.grad.detach(),
                                                                  dtype=compute_dtype(param.dtype))

        self._handles = [p.register_post_accumulate_grad_hook(record) for p in params
                         if p.requires_grad and not sharding.is_sharded(p)]

    def take(self, params: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
        """The recorded norms of ``params`` as one fp32 vector (0 where none was recorded), averaged in
        squares over data-parallel ranks so every rank decides alike; None if none was recorded. Forgets
        them all."""
        recorded = [self._norms.get(p) for p in params]
        self._norms.clear()
        raw = as_vector(recorded, device)
        if raw is None:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # DDP's hooks see each rank's own gradient
            import torch.distributed._functional_collectives as funcol

            raw = (funcol.all_reduce(raw.square(), "sum", torch.distributed.group.WORLD)
                   / torch.distributed.get_world_size()).sqrt()
        return raw

    def pop(self, param: torch.Tensor) -> torch.Tensor | None:
        """The norm recorded for ``param`` since the last ``take``/``clear`` (None: none), forgotten."""
        return self._norms.pop(param, None)

    def clear(self) -> None:
        """Forget what was recorded (a backward that never reached ``step()``, such as a scaler's inf skip)."""
        self._norms.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def recorded(self) -> list[torch.Tensor]:
        """The parameters whose norm was recorded since the last ``take``/``clear``."""
        return list(self._norms)
