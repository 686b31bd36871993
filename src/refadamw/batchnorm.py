"""BatchNorm running statistics for the averaged weights ``x``.

A BatchNorm layer gathers its running mean and variance during training,
where the parameters hold the training point ``y``; evaluation runs at the
average ``x``, whose activations have other statistics. Recomputing them at
``x`` over a few training batches removes the mismatch (as
``torch.optim.swa_utils.update_bn`` does for SWA)::

    with opt.averaged():
        refadamw.recompute_bn_stats(model, itertools.islice(train_loader, 8))
        evaluate(model)

The trainer callbacks do this before every evaluation and checkpoint save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones

__all__ = ["batchnorm_layers", "recompute_bn_stats"]


def batchnorm_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _statistics(layer: _BatchNorm) -> list[torch.Tensor]:
    return [b for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked) if b is not None]


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _default_forward(model: torch.nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)  # HF-style dict of model inputs
    elif isinstance(batch, (list, tuple)):
        model(batch[0])  # (inputs, targets, ...)
    else:
        model(batch)


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, batches: Iterable[Any], *,
                       forward: Callable[[torch.nn.Module, Any], Any] | None = None) -> int:
    """Recompute every BatchNorm layer's running statistics from ``batches``.

    Call it with the weights to evaluate in the model (``x``: inside
    ``opt.averaged()`` or after ``opt.eval()``). Each layer's statistics are
    reset and re-estimated as the plain average over the batches
    (``momentum=None``), then its momentum and the train/eval flag of every
    module are put back. During the passes the BatchNorm layers are in train
    mode and every other module in eval mode (dropout off, as at evaluation).

    Args:
        model: the model; its layers that keep no running statistics are left alone.
        batches: an iterable of batches (a few are enough), moved to the device
            of the model's first parameter or buffer. A dict is passed as
            ``model(**batch)``, a list or tuple as ``model(batch[0])``, anything
            else as ``model(batch)``.
        forward: ``forward(model, batch)`` to call the model another way.

    Returns:
        The number of batches used; 0 (and nothing changed) when the model
        has no BatchNorm layer or ``batches`` is empty. If a forward pass
        raises, the statistics are put back as they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {forward!r}")
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return 0
    device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    gathered = {m: [b.clone() for b in _statistics(m)] for m in layers}
    forward = forward or _default_forward
    count = 0
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the batches
            layer.train()
        batch = first
        while batch is not None:
            forward(model, _to(batch, device))
            count += 1
            batch = next(iterator, None)
    except BaseException:
        for layer, saved in gathered.items():  # a failed pass leaves the statistics as they were
            for buffer, value in zip(_statistics(layer), saved):
                buffer.copy_(value)
        raise
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return count
