"""The interface every benchmark workload module provides: ``make(seed, quick) -> Task``.

A :class:`Task` is one fresh, untrained model plus its data, wrapped in
plain callables so the runner (``refadamw.bench.runner``) and the optimizer
sweeps need to know nothing about the workload. Build a new task for every
run: training changes ``task.model`` in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


class MissingData(RuntimeError):
    """A workload's data is not installed; the message says how to install it."""


@dataclass
class Task:
    """One training problem.

    ``train_batch(step)`` must return the same batch for the same seed and
    step whatever was asked before, so runs can be compared step by step.
    ``val_loss(model)`` evaluates the whole (fixed) validation set without
    gradients and puts the model in eval mode itself, restoring its mode.
    """

    name: str
    model: torch.nn.Module
    train_batch: Callable[[int], tuple]
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]
    val_loss: Callable[[torch.nn.Module], float]
    steps: int
    eval_every: int = 0
    """Default evaluation interval for the runner; 0 evaluates only at the end."""
    baseline: float = float("nan")
    """Validation loss of a trivial predictor (class prior, unigram, mean), to judge learning."""
    metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None
    """Extra validation metrics (accuracy, ...) the runner reports at the end."""
    info: dict = field(default_factory=dict)
    """Facts an optimizer factory may need, e.g. ``dim`` and ``n_heads`` for Adam-mini."""


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def seeded_model(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with its initialisation drawn from ``seed``, leaving the global RNG untouched."""
    # fork_rng so that making a task never changes what the caller's own torch.rand* calls return.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for one step's batch: a function of ``(seed, step)`` alone, so batches need no history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
