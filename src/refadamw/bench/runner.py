"""Train one :class:`~refadamw.bench.workloads.base.Task` with one optimizer and record what happened.

The runner is optimizer-agnostic:

* optimizers with ``train()``/``eval()`` (Schedule-Free style) are put in
  train mode for the steps and in eval mode for every validation, so they
  are judged at the weights they would ship (their averaged ``x``);
* ``feed_loss=True`` passes the detached training loss as
  ``optimizer.step(loss=...)`` for optimizers that accept it (our
  ``RefAdamWMiniSF`` does; ``torch.optim`` ones do not);
* a diverging run (non-finite training or validation loss) stops early and
  is reported with ``diverged=True`` and a NaN final loss; it never raises.

Threads are left to the caller: set ``torch.set_num_threads`` once before a
sweep, so all optimizers run under the same setting. For these tiny models
one thread is the robust choice: two threads on a 2-core machine gain at
most ~1.5× (Fashion-MNIST) and stall badly (10–20× slower runs were seen)
whenever another process holds a core. The thread count also changes the
low bits of conv/matmul reductions, so results are bitwise reproducible only
under the same setting.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..back_pass import fused_backward
from .optimizers import build
from .workloads.base import Task

WORKLOADS = ("lora_finetune", "shakespeare", "shakespeare_long", "digits_resnet", "flow_matching", "friedman",
             "fashion_mnist")
"""Module names under ``refadamw.bench.workloads``; each has ``make(seed, quick) -> Task``."""
MAIN_WORKLOADS = WORKLOADS[:-1]
"""The full main job's default: every workload whose data a ``pip install`` brings (Fashion-MNIST needs apt)."""
QUICK_WORKLOADS = ("lora_finetune",)
"""``--quick``'s default: the LoRA fine-tune, the setting kohya and OneTrainer users are in."""
SUITE_WORKLOADS = ("shakespeare", "digits_resnet", "friedman")
"""The feature suites' default: a transformer, a conv net and an MLP."""
EMA_BETA = 0.9
"""Smoothing of the reported training loss; bias-corrected, so early points are not pulled to 0."""


@dataclass
class RunResult:
    final_val_loss: float
    """Validation loss after the last step; NaN when the run diverged."""
    curve: list[tuple[int, float]]
    """``(step, val_loss)`` at every evaluation, the final one included."""
    train_curve: list[tuple[int, float]]
    """``(step, smoothed training loss)`` at the same steps."""
    steps_run: int
    seconds: float
    """Wall time of the whole run, evaluations included."""
    diverged: bool = False
    step_seconds: float = float("nan")
    """Median wall time of ``optimizer.step()`` alone (CPU clock: no device sync is made)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The task's extra validation metrics (e.g. accuracy) at the end, when it has any."""


def make_task(name: str, seed: int = 0, quick: bool = False, **sizes: int) -> Task:
    """Build workload ``name`` (one of :data:`WORKLOADS`); RuntimeError with an install hint if its data is absent.

    ``sizes`` (``width_factor``, ``batch_factor``) go to the workloads that take them."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return importlib.import_module(f"{__package__}.workloads.{name}").make(seed, quick, **sizes)


def _in_fused_back_pass(optimizer) -> bool:
    return getattr(optimizer, "fused_back_pass", False) is True or any(
        g.get("fused_back_pass") is True for g in optimizer.param_groups)


def _has_modes(optimizer) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def train(
    task: Task,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    *,
    steps: int | None = None,
    schedule: Callable[[torch.optim.Optimizer, int], object] | None = None,
    eval_every: int | None = None,
    spike: tuple[int, int, float] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    feed_loss: bool = False,
    clip: float | Callable[[torch.nn.Module], object] | None = None,
) -> RunResult:
    """Train ``task.model`` in place for ``steps`` (default ``task.steps``) and evaluate along the way.

    ``make_optimizer(model)`` builds the optimizer (it gets the model, so it
    may use ``named_parameters`` or param groups). ``schedule(optimizer,
    steps)`` may return an lr scheduler, stepped once per step, or None.
    ``eval_every`` defaults to ``task.eval_every``; 0 evaluates at the end only.
    ``spike=(start, n, factor)`` multiplies every gradient by ``factor`` on
    steps ``start .. start+n-1`` (0-based), to test recovery from a gradient
    spike: the loss is scaled before backward, as a bad batch would do it,
    so hooks that watch backward see it too. ``clip`` is applied after
    backward and before ``step()``, as trainers do: a float clips the global
    norm to it (``clip_grad_norm_``), a callable is called with the model
    (e.g. :class:`~refadamw.bench.clipping.ZScoreClip`). ``on_step(step,
    loss)`` is called after every step with the 1-based step count and the
    raw training loss (for progress bars).

    An optimizer in fused-backward-pass mode (ours or prodigy-plus-schedule-free built with
    ``fused_back_pass=True``) is stepped inside backward by :func:`refadamw.fused_backward`, which
    then does a float ``clip`` itself.
    """
    steps = task.steps if steps is None else steps
    eval_every = task.eval_every if eval_every is None else eval_every
    model = task.model
    optimizer = make_optimizer(model)
    scheduler = schedule(optimizer, steps) if schedule is not None else None
    modes = _has_modes(optimizer)
    hooks = None
    if _in_fused_back_pass(optimizer):
        if callable(clip):
            raise ValueError("a clipping callable needs every gradient at once; it cannot run in a fused backward pass")
        hooks, clip = fused_backward(model, optimizer, max_grad_norm=clip), None

    def evaluate() -> float:
        # Schedule-Free optimizers swap in their averaged weights for eval(); swap back afterwards.
        if modes:
            optimizer.eval()
        try:
            return task.val_loss(model)
        finally:
            if modes:
                optimizer.train()

    curve: list[tuple[int, float]] = []
    train_curve: list[tuple[int, float]] = []
    step_times: list[float] = []
    ema, ema_weight = 0.0, 0.0
    diverged = False
    done = 0
    start_time = time.perf_counter()
    model.train()
    if modes:
        optimizer.train()
    for step in range(steps):
        loss = task.loss(model, task.train_batch(step))
        value = loss.item()  # one sync per step: needed to stop a diverged run before it wastes time
        if not math.isfinite(value):
            diverged = True
            curve.append((step, float("nan")))
            train_curve.append((step, value))
            break
        optimizer.zero_grad(set_to_none=True)
        spiked = spike is not None and spike[0] <= step < spike[0] + spike[1]
        (loss * spike[2] if spiked else loss).backward()
        if callable(clip):
            clip(model)
        elif clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        tick = time.perf_counter()
        if feed_loss:
            optimizer.step(loss=loss.detach())
        else:
            optimizer.step()
        step_times.append(time.perf_counter() - tick)
        if scheduler is not None:
            scheduler.step()
        done = step + 1
        ema, ema_weight = EMA_BETA * ema + (1 - EMA_BETA) * value, EMA_BETA * ema_weight + (1 - EMA_BETA)
        if on_step is not None:
            on_step(done, value)
        if done == steps or (eval_every and done % eval_every == 0):
            val = evaluate()
            curve.append((done, val))
            train_curve.append((done, ema / ema_weight))
            if not math.isfinite(val):
                diverged = True
                break

    if hooks is not None:
        hooks.remove()
    metrics: dict[str, float] = {}
    if not diverged and task.metrics is not None:
        if modes:
            optimizer.eval()
        try:
            metrics = task.metrics(model)
        finally:
            if modes:
                optimizer.train()
    return RunResult(
        final_val_loss=float("nan") if diverged else curve[-1][1] if curve else float("nan"),
        curve=curve,
        train_curve=train_curve,
        steps_run=done,
        seconds=time.perf_counter() - start_time,
        diverged=diverged,
        step_seconds=statistics.median(step_times) if step_times else float("nan"),
        metrics=metrics,
    )


def finite_mean(values) -> float:
    """The mean of ``values``, NaN when any is not finite (a diverged run) or there are none."""
    values = list(values)
    return statistics.mean(values) if values and all(math.isfinite(v) for v in values) else float("nan")


def final_val_loss(workload: str, name: str, lr: float | None, seed: int, quick: bool, sizes: dict | None = None,
                   **options) -> float:
    """One run's final validation loss: optimizer ``name`` (:func:`refadamw.bench.optimizers.build`, with
    ``options``) at ``lr`` (None: its default) on ``workload`` built at ``sizes``, evaluated at the end only."""
    task = make_task(workload, seed, quick, **(sizes or {}))
    make, schedule = build(name, lr, task.steps, info=task.info, **options)
    return train(task, make, schedule=schedule, eval_every=0).final_val_loss
