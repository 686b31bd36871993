"""Measurements shared by the demo and benchmarks: state size and step time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state tensors per parameter element (all groups)."""
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    n_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return n_bytes / n_params


def linear_stack(layers: int, width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def step_times(
    makers: dict[str, Callable], layers: int = 4, width: int = 512, rounds: int = 15, steps_per_round: int = 5
) -> dict[str, dict[str, float]]:
    """Median ``step()`` seconds per optimizer, interleaved round by round so drift hits all alike.

    Gradients are fixed random tensors; only ``optimizer.step()`` is timed.
    Returns ``{name: {"median_s", "state_bytes_per_param", "params"}}``.
    """
    setups = {}
    for name, make in makers.items():
        model = linear_stack(layers, width)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt = make(model.parameters())
        for _ in range(3):
            opt.step()
        setups[name] = opt
    medians = interleaved_medians({name: opt.step for name, opt in setups.items()}, rounds, steps_per_round)
    n_params = layers * (width * width + width)
    return {
        name: {"median_s": medians[name], "params": n_params,
               "state_bytes_per_param": state_bytes_per_param(setups[name])}
        for name in makers
    }


def interleaved_medians(steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int,
                        sync: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each ``steps[name]()``, timed round by round in turn.

    Interleaving makes slow drift of the machine (another process, clock
    changes) hit every contender alike instead of whichever ran last.
    ``sync`` waits for queued device work (``torch.cuda.synchronize``), so a
    round times the work and not only its launch.
    """
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            sync()
            samples[name].append((time.perf_counter() - start) / steps_per_round)
    return {name: statistics.median(times) for name, times in samples.items()}


def copy_bandwidth_gbs(numel: int = 1 << 26, rounds: int = 9, device: str = "cpu") -> float:
    """Memory bandwidth of a plain fp32 copy (bytes read + written per second, in GB/s), median."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    median = interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds, 1, sync)["copy"]
    return 2 * numel * src.element_size() / median / 1e9


def low_precision_drift(state_dtype: str, *, lr: float = 1e-5, steps: int = 100, layers: int = 2,
                        width: int = 128) -> dict[str, float]:
    """How far low-precision state moves the weights away from an fp32-state run, relative to how far
    the weights moved at all: ``‖w_low − w_fp32‖ / ‖w_fp32 − w_0‖`` for ``y`` (train mode) and ``x``
    (after ``eval()``), on random gradients at a fine-tuning lr, where a step is far below the weights'
    bf16 spacing."""
    from .. import AdamWMiniSF

    runs = {}
    for setting in ("fp32", state_dtype):
        model = linear_stack(layers, width)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = AdamWMiniSF(model.parameters(), lr=lr, warmup_steps=0, state_dtype=setting)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 0.01
            opt.step()
        y = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.eval()
        runs[setting] = start, y, torch.cat([p.detach().flatten() for p in model.parameters()])
    start, y32, x32 = runs["fp32"]
    _, y_low, x_low = runs[state_dtype]
    return {"y": ((y_low - y32).norm() / (y32 - start).norm()).item(),
            "x": ((x_low - x32).norm() / (x32 - start).norm()).item()}
