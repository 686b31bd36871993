"""The main job behind ``refadamw bench`` (SPEC.md §6).

Every optimizer of :data:`refadamw.bench.optimizers.NAMES` trains every
workload. Peers are tuned: each runs a small lr grid on seed 0 and then all
seeds at its best lr. Ours runs at its defaults and no schedule, as a user
who tunes nothing would run it; its grid is still run, to choose the defaults
and for the lr-sensitivity table. ``--quick`` uses the small workload sizes,
one seed and one lr per peer (the centre of its grid).

Reports: final validation loss against AdamW+cosine's best, state bytes per
parameter, ``step()`` time against ``torch.optim.AdamW(fused=True)`` on a
10M-parameter model (medians, measured in the same run), an lr-sensitivity
table and a spike-recovery table. Quality runs use one thread; the timing
uses two.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import AdamWMiniSF
from . import runner
from .clipping import make_clip
from .measure import copy_bandwidth_gbs, state_bytes_per_param, step_times
from .optimizers import NAMES, MissingPeer, build, training
from .progress import Progress
from .text import lr_text
from .workloads.base import MissingData

OURS = "refadamw"
BASELINE = "adamw_cosine"
GRIDS: dict[str, tuple[float, ...]] = {
    OURS: (1e-3, 3e-3, 1e-2, 3e-2),
    "adamw_mini_sf": (1e-3, 3e-3, 1e-2, 3e-2),
    "adamw_cosine": (1e-3, 3e-3, 1e-2, 3e-2),
    "adamw_constant": (3e-4, 1e-3, 3e-3, 1e-2),
    "schedulefree": (1e-3, 3e-3, 1e-2, 3e-2),
    "adam_mini": (3e-4, 1e-3, 3e-3, 1e-2),
    "prodigy_sf": (1.0,),
    "seed_legacy": (3e-4, 1e-3, 3e-3),
}
"""Learning-rate grids, four points spaced ×3 for every tuned peer; ``--quick`` runs only one value
(``len // 2``). Ours is reported at its defaults (lr-free: ``lr`` None); its grid of fixed lrs is run
besides, to show what a tuned fixed lr would give. ``prodigy_sf`` runs at its defaults (``lr=1.0``,
its multiplier on the estimate), as its users run it; the seed's front door around its original lr."""
SENSITIVITY = (OURS, "adamw_cosine", "schedulefree")
LR_FREE_SCALED = "refadamw_lr_free"
"""Ours lr-free with its "lr" read as ``lr_free_scale``: the sensitivity rows of an lr-free default."""
SPIKED: tuple[tuple[str, str | None], ...] = (
    (OURS, None), (OURS, "norm1"), ("adamw_cosine", None), ("adamw_cosine", "norm1"), ("adamw_cosine", "zclip"),
    ("schedulefree", None), ("schedulefree", "norm1"))
"""The spike table's rows, ``(optimizer, clip)`` (:data:`refadamw.bench.clipping.CLIPS`): every trainer clips
to norm 1 by default, so each peer runs clipped as well; ZClip-style z-score clipping runs with AdamW+cosine."""
SPIKE_FACTOR, SPIKE_STEPS = 1000.0, 3
STEP_LAYERS, STEP_WIDTH = 10, 1024
"""The step-time model: 10 × Linear(1024, 1024), 10.5M parameters."""


def default_lr() -> float | None:
    """Our optimizer's default lr (RefAdamWMiniSF takes it from AdamWMiniSF); None: lr-free."""
    return inspect.signature(AdamWMiniSF.__init__).parameters["lr"].default


@dataclass
class Run:
    workload: str
    optimizer: str
    lr: float
    seed: int
    final_val_loss: float
    state_bytes_per_param: float
    curve: list
    metrics: dict
    spike: bool = False
    clip: str | None = None


def _spread(values):
    values = list(values)
    return statistics.pstdev(values) if len(values) > 1 and all(math.isfinite(v) for v in values) else 0.0


class MainBench:
    """Runs and caches ``(workload, optimizer, lr, seed, spiked)``, with a progress bar."""

    def __init__(self, quick: bool, seeds: tuple[int, ...], workloads: tuple[str, ...], optimizers: tuple[str, ...],
                 log: Callable[[str], None] = print, progress: Progress | None = None) -> None:
        self.quick, self.seeds, self.workloads, self.log = quick, seeds, workloads, log
        self.optimizers = optimizers
        self.progress = progress or Progress()
        self.runs: dict[tuple, Run] = {}
        self.skipped: dict[str, str] = {}
        self.best_lr: dict[str, dict[str, float]] = {w: {} for w in workloads}

    def grid(self, name: str) -> tuple[float, ...]:
        if name == OURS:
            fixed = sorted(set(GRIDS[OURS]) - {default_lr()})
            return (default_lr(),) if self.quick else (default_lr(), *fixed)
        grid = GRIDS[name]
        return (grid[len(grid) // 2],) if self.quick else grid

    def run(self, workload: str, name: str, lr: float, seed: int, spike: bool = False, clip: str | None = None) -> Run:
        key = (workload, name, lr, seed, spike, clip)
        if key in self.runs:
            return self.runs[key]
        task = runner.make_task(workload, seed, self.quick)
        make, schedule = build(name, lr, task.steps, info=task.info)
        built = []
        label = (f"{workload} {name} lr={lr_text(lr)} seed={seed}{' spiked' if spike else ''}"
                 f"{f' clip={clip}' if clip else ''}")
        self.progress.start(label, task.steps)
        result = runner.train(task, lambda model: built.append(make(model)) or built[-1], schedule=schedule,
                              spike=(task.steps // 2, SPIKE_STEPS, SPIKE_FACTOR) if spike else None,
                              on_step=self.progress.update, clip=make_clip(clip))
        self.progress.finish(f"val loss {result.final_val_loss:.5g} ({result.seconds:.1f} s)")
        run = Run(workload, name, lr, seed, result.final_val_loss, state_bytes_per_param(built[0]),
                  [list(p) for p in result.curve], result.metrics, spike, clip)
        self.runs[key] = run
        return run

    def available(self, name: str) -> bool:
        if name in self.skipped:
            return False
        try:
            build(name, None, 1)[0](torch.nn.Linear(2, 2))
        except MissingPeer as err:
            self.skipped[name] = str(err)
            self.log(f"skipped {name}: {err}")
            return False
        return True

    def tune(self, workload: str, name: str) -> float:
        """Best lr of the grid on seed 0 (ours: its default, whatever the grid says)."""
        if name not in self.best_lr[workload]:
            losses = {lr: self.run(workload, name, lr, self.seeds[0]).final_val_loss for lr in self.grid(name)}
            finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
            best = min(finite, key=finite.get) if finite else self.grid(name)[0]
            self.best_lr[workload][name] = default_lr() if name == OURS else best
        return self.best_lr[workload][name]

    def losses(self, workload: str, name: str, lr: float, spike: bool = False, clip: str | None = None) -> list[float]:
        return [self.run(workload, name, lr, s, spike, clip).final_val_loss for s in self.seeds]


def step_benchmark(optimizers: tuple[str, ...], skipped: dict[str, str]) -> dict:
    """Median ``step()`` time of each optimizer on 10.5M parameters, 2 threads, interleaved rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        makers = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
                  "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)}
        for name in dict.fromkeys((OURS, *optimizers)):  # ours always: the summary is about it
            if name in skipped or name in ("adamw_cosine", "adamw_constant"):  # they are AdamW foreach
                continue
            make = build(name, None, 1000, info={"dim": STEP_WIDTH, "n_heads": 8})[0]
            makers[name] = lambda params, make=make: training(make(_ParamsModule(list(params))))
        times = step_times(makers, layers=STEP_LAYERS, width=STEP_WIDTH, rounds=9, steps_per_round=3)
        bandwidth = copy_bandwidth_gbs()
    finally:
        torch.set_num_threads(threads)
    fused, foreach = times["adamw_fused"]["median_s"], times["adamw_foreach"]["median_s"]
    per = {name: {"ratio_vs_adamw_fused": t["median_s"] / fused, "ratio_vs_adamw_foreach": t["median_s"] / foreach,
                  "ns_per_param": t["median_s"] * 1e9 / t["params"],
                  "state_bytes_per_param": t["state_bytes_per_param"]} for name, t in times.items()}
    per["adamw_cosine"] = per["adamw_constant"] = per["adamw_foreach"]
    ours = per[OURS]
    moved = ours_bytes_moved_per_param()
    return {"per_optimizer": per, "summary": {
        "params": times[OURS]["params"], "ratio_vs_adamw_fused": ours["ratio_vs_adamw_fused"],
        "ratio_vs_adamw_foreach": ours["ratio_vs_adamw_foreach"], "bytes_moved_per_param": moved,
        "ns_per_param": ours["ns_per_param"], "copy_bandwidth_gbs": bandwidth,
        "bandwidth_limit_ns_per_param": moved / bandwidth,
        "adamw_fused_ns_per_param": per["adamw_fused"]["ns_per_param"],
        "adamw_fused_bandwidth_limit_ns_per_param": 28 / bandwidth}}


def _step_ratio(per_optimizer: dict, name: str) -> float:
    """A run's step() time ÷ fused AdamW (the lr-free factor rows are ours at another factor)."""
    return per_optimizer[OURS if name == LR_FREE_SCALED else name]["ratio_vs_adamw_fused"]


def retime(data: dict) -> None:
    """Time step() again (:func:`step_benchmark`) and put the new row into a main-suite results ``data``,
    in place; the losses stay as they were."""
    step_time = step_benchmark(tuple(data["optimizers"]), data["skipped"])
    per = step_time["per_optimizer"]
    for r in data["runs"]:
        r["step_time_ratio_vs_adamw_fused"] = _step_ratio(per, r["optimizer"])
    data["step_time"], data["step_time_per_optimizer"] = step_time["summary"], per
    data["step_time_retimed"] = True


def ours_bytes_moved_per_param() -> float:
    """Bytes one default step moves per fp32 parameter: g read twice (the block sums of squares, which
    give the norm too, and the update), y read and written (fp32), z − y read and written (bf16)."""
    return 2 * 4 + 2 * 4 + 2 * 2


class _ParamsModule(torch.nn.Module):
    """Wraps a list of parameters so model-taking factories (``make(model)``) accept it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def run(quick: bool, seeds: tuple[int, ...], workloads: tuple[str, ...], optimizers: tuple[str, ...] = NAMES,
        log: Callable[[str], None] = print, progress: Progress | None = None) -> dict:
    """Run the main job; returns the results dict that ``results.json`` holds."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    missing = {}
    for workload in workloads:
        try:
            runner.make_task(workload, seeds[0], quick)
        except MissingData as err:
            missing[workload] = str(err)
            log(f"skipped workload {workload}: {err}")
    workloads = tuple(w for w in workloads if w not in missing)
    if not workloads:
        raise MissingData("no workload has its data installed: " + "; ".join(missing.values()))
    bench = MainBench(quick, seeds, workloads, optimizers, log, progress)
    names = tuple(n for n in optimizers if bench.available(n))
    n_grid = sum(len(bench.grid(n)) for n in names)
    bench.progress.total_runs = len(workloads) * (n_grid + (len(seeds) - 1) * len(names)
                                                  + 2 * len(SENSITIVITY)
                                                  + sum(2 if clip else 1 for _, clip in SPIKED) * len(seeds))
    summary, sensitivity, spikes, curves = [], [], [], {}
    for workload in workloads:
        curves[workload] = {}
        for name in names:
            lr = bench.tune(workload, name)
            losses = bench.losses(workload, name, lr)
            summary.append({"workload": workload, "optimizer": name, "lr": lr, "grid": list(bench.grid(name)),
                            "final_val_loss": losses, "mean": runner.finite_mean(losses), "spread": _spread(losses)})
            curves[workload][f"{name} lr={lr_text(lr)}"] = bench.run(workload, name, lr, seeds[0]).curve
        for name in SENSITIVITY:
            if name in names:
                best = bench.best_lr[workload][name]
                if best is None:  # lr-free: the factor goes on the estimate (lr_free_scale)
                    losses = {str(f): bench.run(workload, *((name, None) if f == 1 else (LR_FREE_SCALED, f)),
                                                seeds[0]).final_val_loss for f in (1 / 3, 1, 3)}
                else:
                    losses = {str(best * f): bench.run(workload, name, best * f, seeds[0]).final_val_loss
                              for f in (1 / 3, 1, 3)}
                sensitivity.append({"workload": workload, "optimizer": name, "lr": best, "losses": losses})
        for name, clip in SPIKED:
            if name in names:  # at the lr tuned without clipping, as a user adding a trainer's default would
                lr = bench.best_lr[workload][name]
                clean = bench.losses(workload, name, lr, clip=clip)
                spiked = bench.losses(workload, name, lr, True, clip)
                spikes.append({"workload": workload, "optimizer": name, "clip": clip, "lr": lr, "clean": clean,
                               "spiked": spiked, "ratio": runner.finite_mean(spiked) / runner.finite_mean(clean)})
    log(f"step(): timing {STEP_LAYERS} x Linear({STEP_WIDTH}, {STEP_WIDTH})")
    step_time = step_benchmark(names, bench.skipped)
    baseline = {r["workload"]: r["mean"] for r in summary if r["optimizer"] == BASELINE}
    for r in summary:
        r["ratio_vs_adamw_cosine"] = r["mean"] / baseline[r["workload"]] if r["workload"] in baseline else None
    per = step_time["per_optimizer"]
    runs = [{"workload": r.workload, "optimizer": r.optimizer, "lr": r.lr, "seed": r.seed,
             "final_val_loss": r.final_val_loss, "state_bytes_per_param": r.state_bytes_per_param,
             "step_time_ratio_vs_adamw_fused": _step_ratio(per, r.optimizer),
             "spike": r.spike, "clip": r.clip, "metrics": r.metrics, "curve": r.curve} for r in bench.runs.values()]
    return {"suite": "main", "quick": quick, "seeds": list(seeds), "workloads": list(workloads),
            "optimizers": list(names), "skipped": bench.skipped, "skipped_workloads": missing, "grids": {n: list(bench.grid(n)) for n in names},
            "defaults": {"lr": default_lr()}, "runs": runs, "summary": summary, "lr_sensitivity": sensitivity,
            "spike": spikes, "step_time": step_time["summary"], "step_time_per_optimizer": per,
            "curves": curves, "spike_setup": {"factor": SPIKE_FACTOR, "steps": SPIKE_STEPS, "at": 0.5},
            "seconds": time.perf_counter() - start}
