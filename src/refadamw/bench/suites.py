"""Benchmark suites behind ``refadamw bench --suite``: each returns a JSON-able dict and a Markdown report.

* ``precision`` (SPEC.md §3.7): state bytes per parameter per ``state_dtype``,
  final validation loss with fp32 against bf16 ``z``, the ``step()`` cost of
  stochastic rounding, and peak process memory of ``step()`` against AdamW.
* ``controller`` (SPEC.md §3.5–6): recovery from a ×1000 gradient spike,
  false alarms on clean runs, and the λ × window sweep.
* ``ladder``: repair policies (skip level, pull ladder ρ, pull delay) against spikes.
* ``lora`` (:mod:`refadamw.bench.lora`): second-moment blocks against
  per-element ``v`` for LoRA factors.
* ``backward`` (:mod:`refadamw.bench.backward`): the fused backward pass: peak memory of a
  training step, LoRA quality and spike recovery against the ordinary ``step()``.
* ``robustness`` (:mod:`refadamw.bench.robustness`): ours at defaults against a re-tuned AdamW+cosine
  at 4× the width and 4× the batch.
* ``defaults`` (:mod:`refadamw.bench.defaults`): ours' other defaults (warmup, betas, weight decay,
  λ, window), one at a time, in the lr-free mode.
* ``step`` (:mod:`refadamw.bench.step`): ``step()`` speed, transient memory,
  bandwidth share and compile time at four real model shapes; the only
  suite that runs on ``--device cuda``.

Every optimizer runs at the best lr of a small grid (seed 0, reported), then
over all seeds at that lr. Quality runs use one thread; timings use two.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from . import runner
from .backward import backward
from .defaults import WORKLOADS as DEFAULTS_WORKLOADS
from .defaults import defaults
from .lora import lora
from .memory import peak_memory
from .measure import linear_stack, low_precision_drift, state_bytes_per_param, step_times
from .optimizers import MissingPeer, build
from .robustness import WORKLOADS as ROBUSTNESS_WORKLOADS
from .robustness import robustness
from .step import figure as step_figure
from .step import step

LR_GRIDS = {"refadamw": (3e-3, 1e-2, 2e-2), "schedulefree": (3e-3, 1e-2, 2e-2), "adamw_cosine": (1e-3, 3e-3, 1e-2)}
SPIKE_FACTOR, SPIKE_STEPS = 1000.0, 3
LAMBDAS = (0.0, 0.001, 0.01, 0.05, 0.2, 0.5)
WINDOWS = ((0.2, 0.8), (0.5, 1.0))


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if all(math.isfinite(v) for v in values) else float("nan")


class Bench:
    """Runs (workload, optimizer, lr, options, seed) and remembers the best lr per (workload, optimizer)."""

    def __init__(self, quick: bool, seeds: tuple[int, ...], log: Callable[[str], None] = print, device: str = "cpu"):
        self.quick, self.seeds, self.log, self.device = quick, seeds, log, device
        self.best_lr: dict[tuple[str, str], float] = {}
        self.grid: dict[str, dict] = {}

    def run(self, workload: str, name: str, lr: float, seed: int, *, spike=None, feed_loss=False, **options):
        task = runner.make_task(workload, seed, self.quick)
        make, schedule = build(name, lr, task.steps, info=task.info, **options)
        built = []

        def make_and_keep(model):
            built.append(make(model))
            return built[-1]

        result = runner.train(task, make_and_keep, schedule=schedule, eval_every=0, spike=spike, feed_loss=feed_loss)
        return result, built[0], task.steps

    def steps(self, workload: str) -> int:
        """The workload's training length at this size."""
        return runner.make_task(workload, self.seeds[0], self.quick).steps

    def lr_for(self, workload: str, name: str, **options) -> float:
        key = (workload, name)
        if key not in self.best_lr:
            losses = {lr: self.run(workload, name, lr, self.seeds[0], **options)[0].final_val_loss
                      for lr in LR_GRIDS[name]}
            finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
            self.best_lr[key] = min(finite, key=finite.get) if finite else LR_GRIDS[name][0]
            self.grid[f"{workload}/{name}"] = {str(lr): v for lr, v in losses.items()}
            self.log(f"  {workload:14s} {name:14s} lr grid {losses} -> {self.best_lr[key]:g}")
        return self.best_lr[key]


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "NaN" if not math.isfinite(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- precision

def precision(bench: Bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    out: dict = {"bytes_per_param": {}, "quality": [], "step_time": {}, "peak_memory": []}
    model = linear_stack(4, 512)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    from .. import AdamWMiniSF

    for setting in ("fp32", "bf16", "fp16"):
        opt = AdamWMiniSF(model.parameters(), state_dtype=setting)
        opt.step()
        out["bytes_per_param"][setting] = state_bytes_per_param(opt)
    out["fine_tuning_drift"] = {setting: low_precision_drift(setting) for setting in ("bf16", "fp16")}
    bench.log("precision: quality of fp32 against bf16 state")
    for workload in workloads:
        lr = bench.lr_for(workload, "refadamw", state_dtype="fp32")
        row = {"workload": workload, "lr": lr}
        for setting in ("fp32", "bf16"):
            losses = [bench.run(workload, "refadamw", lr, s, state_dtype=setting)[0].final_val_loss
                      for s in bench.seeds]
            row[setting] = losses
        row["ratio_bf16_vs_fp32"] = runner.finite_mean(row["bf16"]) / runner.finite_mean(row["fp32"])
        out["quality"].append(row)
        bench.log(f"  {workload}: fp32 {runner.finite_mean(row['fp32']):.5g}  bf16 {runner.finite_mean(row['bf16']):.5g}")

    torch.set_num_threads(2)
    layers, width = (4, 512) if bench.quick else (24, 1024)
    makers = {
        "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "ours_fp32": lambda p: AdamWMiniSF(p, state_dtype="fp32"),
        "ours_bf16": lambda p: AdamWMiniSF(p, state_dtype="bf16"),
    }
    times = step_times(makers, layers=layers, width=width, rounds=9, steps_per_round=3)
    base = times["adamw_fused"]["median_s"]
    out["step_time"] = {name: {"ratio_vs_adamw_fused": t["median_s"] / base,
                               "ns_per_param": t["median_s"] * 1e9 / t["params"], "params": t["params"]}
                        for name, t in times.items()}
    torch.set_num_threads(1)
    mem_layers = 12 if bench.quick else 48
    bench.log(f"precision: peak memory of step() on {mem_layers}x Linear(1024, 1024)")
    out["peak_memory"] = peak_memory(["adamw_fused", "adamw", "ours_fp32", "ours_bf16"], layers=mem_layers)

    n = len(bench.seeds)
    report = ["### State precision", "", "State bytes per parameter, 4×Linear(512, 512):", "",
              _table(["state_dtype", "bytes/param"], [[k, v] for k, v in out["bytes_per_param"].items()]), "",
              "Drift from an fp32-state run at a fine-tuning lr (1e-5, 100 steps, 2×Linear(128, 128)): "
              "‖w − w_fp32‖ / ‖w_fp32 − w_start‖:", "",
              _table(["state_dtype", "y (training weights)", "x (averaged weights)"],
                     [[k, v["y"], v["x"]] for k, v in out["fine_tuning_drift"].items()]), "",
              f"Final validation loss, mean of {n} seed(s), at the best lr of RefAdamWMiniSF with fp32 state:", "",
              _table(["workload", "lr", "fp32 state", "bf16 state", "bf16 / fp32"],
                     [[r["workload"], r["lr"], runner.finite_mean(r["fp32"]), runner.finite_mean(r["bf16"]), r["ratio_bf16_vs_fp32"]]
                      for r in out["quality"]]), "",
              f"`step()` time, {layers}×Linear({width}, {width}), 2 threads, median:", "",
              _table(["optimizer", "× AdamW fused", "ns/param"],
                     [[k, v["ratio_vs_adamw_fused"], v["ns_per_param"]] for k, v in out["step_time"].items()]), "",
              "Peak process memory added by building the optimizer and running 3 steps:", "",
              _table(["optimizer", "params", "MiB", "bytes/param", "state bytes/param"],
                     [[r["optimizer"], r["params"], r["peak_step_bytes"] / 2**20, r["peak_step_bytes_per_param"],
                       r["state_bytes_per_param"]] for r in out["peak_memory"]])]
    return out, "\n".join(report)


# ----------------------------------------------------------------------------- controller

def controller(bench: Bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    out: dict = {"spike": [], "false_alarms": [], "lambda_sweep": []}
    bench.log("controller: spike recovery")
    contenders = [("refadamw", {}, False, "refadamw (plain step)"), ("refadamw", {}, True, "refadamw (loss fed)"),
                  ("schedulefree", {}, False, "schedulefree"), ("adamw_cosine", {}, False, "adamw_cosine")]
    for workload in workloads:
        for name, options, feed, label in contenders:
            try:
                lr = bench.lr_for(workload, name)
            except MissingPeer as err:
                bench.log(f"  skipped {label}: {err}")
                continue
            clean, spiked, flagged, repair_off = [], [], [], []
            for seed in bench.seeds:
                result, opt, steps = bench.run(workload, name, lr, seed, feed_loss=feed, **options)
                clean.append(result.final_val_loss)
                if name == "refadamw":
                    flagged.append(opt.stats()["flagged_steps"].item() / steps)
                    if not feed:
                        repair_off.append(bench.run(workload, name, lr, seed, repair=False)[0].final_val_loss)
                spike = (steps // 2, SPIKE_STEPS, SPIKE_FACTOR)
                spiked.append(bench.run(workload, name, lr, seed, spike=spike, feed_loss=feed, **options)[0]
                              .final_val_loss)
            row = {"workload": workload, "optimizer": label, "lr": lr, "clean": clean, "spiked": spiked,
                   "ratio": runner.finite_mean(spiked) / runner.finite_mean(clean), "nan_runs": sum(not math.isfinite(v) for v in spiked)}
            out["spike"].append(row)
            bench.log(f"  {workload} {label}: clean {runner.finite_mean(clean):.5g} spiked {runner.finite_mean(spiked):.5g}")
            if flagged:
                out["false_alarms"].append({"workload": workload, "optimizer": label, "flagged_fraction": flagged,
                                            "repair_on": clean, "repair_off": repair_off})
    bench.log("controller: lambda x window sweep")
    for workload in workloads:
        lr = bench.lr_for(workload, "refadamw")
        for window in WINDOWS:
            for lam in LAMBDAS:
                losses = [bench.run(workload, "refadamw", lr, s, ref_alpha=lam, ref_window=window)[0].final_val_loss
                          for s in bench.seeds]
                out["lambda_sweep"].append({"workload": workload, "lr": lr, "window": list(window), "lambda": lam,
                                            "losses": losses})
        bench.log(f"  {workload} done")

    n = len(bench.seeds)
    spike_rows = [[r["workload"], r["optimizer"], r["lr"], runner.finite_mean(r["clean"]), runner.finite_mean(r["spiked"]), r["ratio"],
                   r["nan_runs"]] for r in out["spike"]]
    alarm_rows = [[r["workload"], r["optimizer"], f"{100 * statistics.mean(r['flagged_fraction']):.2f}%",
                   runner.finite_mean(r["repair_on"]), runner.finite_mean(r["repair_off"]) if r["repair_off"] else "-"]
                  for r in out["false_alarms"]]
    sweep_header = ["workload", "window"] + [f"λ={lam:g}" for lam in LAMBDAS]
    sweep_rows = []
    for workload in workloads:
        for window in WINDOWS:
            cells = [runner.finite_mean(r["losses"]) for r in out["lambda_sweep"]
                     if r["workload"] == workload and tuple(r["window"]) == window]
            sweep_rows.append([workload, f"{window[0]:g}–{window[1]:g}"] + cells)
    report = ["### Ref controller", "",
              f"Spike recovery: gradients ×{SPIKE_FACTOR:g} for {SPIKE_STEPS} steps at 50% of training; "
              f"final validation loss, mean of {n} seed(s):", "",
              _table(["workload", "optimizer", "lr", "clean", "spiked", "spiked / clean", "NaN runs"], spike_rows),
              "", "False alarms on clean runs (steps flagged), and the final loss with repair on and off:", "",
              _table(["workload", "optimizer", "steps flagged", "repair on", "repair off"], alarm_rows), "",
              f"λ × window sweep (RefAdamWMiniSF at its best lr), final validation loss, mean of {n} seed(s):", "",
              _table(sweep_header, sweep_rows)]
    return out, "\n".join(report)


LADDERS: dict[str, dict] = {
    "seed-era: pull at once, skip at level 3": {"ladder": (0.0, 0.3, 0.5, 1.0), "pull_after": 1, "skip_level": 3},
    "default: skip from level 2, pull after 4": {},
    "skip from level 2, never pull": {"ladder": (0.0, 0.0, 0.0, 0.0)},
    "skip from level 1, pull after 4": {"skip_level": 1},
}
"""Repair policies: the controller's tunables (``ladder`` ρ per level, ``pull_after``, ``skip_level``)."""
LADDER_SPIKES = (None, 10.0, SPIKE_FACTOR)


def ladder(bench: Bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    """Repair policies against spikes of ×10 (mostly levels 1–2) and ×1000 (level 3), and on clean runs."""
    out: dict = {"ladder": []}
    for workload in workloads:
        lr = bench.lr_for(workload, "refadamw")
        for policy, tunables in LADDERS.items():
            row = {"workload": workload, "lr": lr, "policy": policy, "tunables": tunables}
            for factor in LADDER_SPIKES:
                losses, flagged = [], []
                for seed in bench.seeds:
                    spike = (bench.steps(workload) // 2, SPIKE_STEPS, factor) if factor else None
                    result, opt, steps = bench.run(workload, "refadamw", lr, seed, spike=spike, controller=tunables)
                    losses.append(result.final_val_loss)
                    flagged.append(opt.stats()["flagged_steps"].item() / steps)
                key = "clean" if factor is None else f"x{factor:g}"
                row[key] = losses
                if factor is None:
                    row["flagged_fraction"] = flagged
            out["ladder"].append(row)
            bench.log(f"  {workload} {policy}: " + ", ".join(
                f"{k} {runner.finite_mean(row[k]):.5g}" for k in ["clean"] + [f"x{f:g}" for f in LADDER_SPIKES if f]))
    n = len(bench.seeds)
    spikes = [f for f in LADDER_SPIKES if f]
    header = (["workload", "policy", "clean", "clean steps flagged"] + [f"×{f:g} spike" for f in spikes]
              + [f"×{f:g} ÷ clean" for f in spikes])
    rows = [[r["workload"], r["policy"], runner.finite_mean(r["clean"]), f"{100 * statistics.mean(r['flagged_fraction']):.2f}%"]
            + [runner.finite_mean(r[f"x{f:g}"]) for f in spikes] + [runner.finite_mean(r[f"x{f:g}"]) / runner.finite_mean(r["clean"]) for f in spikes]
            for r in out["ladder"]]
    report = ["### Repair policy", "",
              f"Final validation loss, mean of {n} seed(s), RefAdamWMiniSF at its best lr; spikes multiply the "
              f"gradients for {SPIKE_STEPS} steps at 50% of training:", "", _table(header, rows)]
    return out, "\n".join(report)


# ----------------------------------------------------------------------------- seed

def _seed_configs(steps: int) -> list[tuple[str, Callable, Callable | None, bool]]:
    """``(label, make_optimizer, schedule, feed_loss)``: the original's arithmetic and the front door
    as a seed-era script would call them (lr 1e-3, ``ref_max_steps`` = run length)."""
    from refadamwmini_schedulefree import RefAdamWminiScheduleFree

    legacy = lambda model: RefAdamWminiScheduleFree(model.parameters(), lr=1e-3, legacy=True, ref_max_steps=steps)
    door = lambda model: RefAdamWminiScheduleFree(model.parameters(), lr=1e-3, ref_max_steps=steps)
    defaults = lambda model: RefAdamWminiScheduleFree(model.parameters(), ref_max_steps=steps)
    cosine, schedule = build("adamw_cosine", 3e-3, steps)
    return [("legacy, lr 1e-3", legacy, None, False),
            ("legacy, lr 1e-3, + loss (the injection runs)", legacy, None, True),
            ("front door, lr=1e-3 passed, + loss", door, None, True),
            ("front door, product defaults, + loss", defaults, None, True),
            ("AdamW, warmup + cosine, lr 3e-3", cosine, schedule, False)]


def seed(bench: Bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    """The original's arithmetic (``legacy=True``) against the drop-in front door and AdamW (docs/migrating.md)."""
    out: dict = {"seed": []}
    for workload in workloads:
        for index, (label, *_rest) in enumerate(_seed_configs(bench.steps(workload))):
            row = {"workload": workload, "optimizer": label, "final_val_loss": [], "steps_run": []}
            for s in bench.seeds:
                task = runner.make_task(workload, s, bench.quick)
                _, make, schedule, feed = _seed_configs(task.steps)[index]
                result = runner.train(task, make, schedule=schedule, eval_every=0, feed_loss=feed)
                row["final_val_loss"].append(result.final_val_loss)
                row["steps_run"].append(result.steps_run)
            out["seed"].append(row)
            bench.log(f"  {workload} {label}: {row['final_val_loss']} after {row['steps_run']} steps")
    header = ["workload", "optimizer"] + [f"seed {s}" for s in bench.seeds]
    rows = [[r["workload"], r["optimizer"]] + [
        f"{v:.4g}" if math.isfinite(v) else f"NaN by step {n + 1}" for v, n in zip(r["final_val_loss"], r["steps_run"])]
        for r in out["seed"]]
    report = ["### Seed compatibility", "",
              "Final validation loss; a run stops at its first non-finite loss. \"+ loss\" passes the training "
              "loss to `step(loss=...)` on every step; `ref_max_steps` is the run length.", "", _table(header, rows)]
    return out, "\n".join(report)


SUITES = {"backward": backward, "precision": precision, "controller": controller, "ladder": ladder, "seed": seed,
          "lora": lora, "step": step, "robustness": robustness, "defaults": defaults}
DEFAULT_WORKLOADS = {"robustness": ROBUSTNESS_WORKLOADS, "defaults": DEFAULTS_WORKLOADS}
"""Suites whose default workloads are not :data:`refadamw.bench.runner.SUITE_WORKLOADS`."""
FIGURES = {"step": step_figure}
"""Suite → ``figure(data, out_folder)``, writing its PNG (ImportError without matplotlib)."""


def run(suite: str, quick: bool, seeds: tuple[int, ...], workloads: tuple[str, ...],
        device: str = "cpu") -> tuple[dict, str]:
    torch.set_num_threads(1)
    bench = Bench(quick, seeds, device=device)
    start = time.perf_counter()
    data, report = SUITES[suite](bench, workloads)
    data.update(suite=suite, quick=quick, seeds=list(seeds), workloads=list(workloads), lr_grid=bench.grid,
                seconds=time.perf_counter() - start)
    return data, report
