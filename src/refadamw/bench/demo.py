"""``refadamw demo``: a small end-to-end run until ``refadamw bench`` exists.

1. Train an MLP on scikit-learn's bundled digits with each optimizer over a
   small lr grid and report the best final validation loss.
2. Time ``step()`` on a 4×Linear(512, 512) model against
   ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)`` in the same run.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path

import torch

from .. import AdamWMiniSF
from .measure import state_bytes_per_param, step_times
from .text import lr_text
from .workloads import digits

LR_GRID = (3e-3, 1e-2, 2e-2, 3e-2)
SEEDS = (0, 1, 2)
WARMUP = 20


def _cosine(opt, steps):
    def factor(step):
        return min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _contenders():
    yield "refadamw (defaults)", None, (lambda lr: lambda p: AdamWMiniSF(p)), None
    yield "AdamWMiniSF", LR_GRID, (lambda lr: lambda p: AdamWMiniSF(p, lr=lr)), None
    yield "adamw_constant", LR_GRID, (lambda lr: lambda p: torch.optim.AdamW(p, lr=lr)), None
    yield "adamw_cosine", LR_GRID, (lambda lr: lambda p: torch.optim.AdamW(p, lr=lr)), _cosine
    try:
        import schedulefree
    except ImportError:
        print("  (schedulefree not installed: skipped)")
        return
    yield "schedulefree", LR_GRID, (
        lambda lr: lambda p: _train_mode(schedulefree.AdamWScheduleFree(p, lr=lr, warmup_steps=WARMUP))), None


def _train_mode(opt):
    opt.train()
    return opt




def replace_block(path: str, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = Path(path).read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} block to update")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(path).write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")


def blocks(content: str) -> list[str]:
    """Every ``<!-- name:start -->`` … ``<!-- name:end -->`` block in ``content``, markers included, in order."""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", content, re.S)]


def update_readme(path: str, table: str) -> None:
    """Replace the block between the demo markers in ``path`` with ``table``."""
    replace_block(path, "demo", table)


def run(steps: int = 300, seeds: tuple[int, ...] = SEEDS, out: str | None = None, readme: str | None = None) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"digits MLP, {steps} steps: final validation loss, mean over seeds {list(seeds)}, best lr of {LR_GRID}")
    quality = []
    for name, grid, make, schedule in _contenders():
        results = []
        for lr in grid or (None,):
            runs = [digits.train(make(lr), steps=steps, seed=seed, schedule=schedule) for seed in seeds]
            losses = [r["val_loss"] for r in runs]
            results.append((statistics.mean(losses), lr, losses, runs))
        mean_loss, lr, losses, runs = min(results, key=lambda item: item[0])
        quality.append({
            "optimizer": name, "lr": lr if lr is not None else runs[0]["optimizer"].defaults["lr"],  # None: lr-free
            "val_loss": mean_loss, "val_loss_per_seed": losses,
            "accuracy": statistics.mean(r["accuracy"] for r in runs),
            "state_bytes_per_param": state_bytes_per_param(runs[0]["optimizer"]),
        })
        print(f"  {name:22s} lr={lr_text(quality[-1]['lr']):<8s} val_loss={mean_loss:.4f} "
              f"{[round(x, 4) for x in losses]} acc={quality[-1]['accuracy']:.3f} "
              f"state={quality[-1]['state_bytes_per_param']:.2f} B/param")

    print("step() time on 4×Linear(512, 512), median of interleaved rounds")
    timing = step_times({
        "adamw_fused": lambda p: torch.optim.AdamW(p, fused=True),
        "adamw_foreach": lambda p: torch.optim.AdamW(p, foreach=True),
        "AdamWMiniSF": lambda p: AdamWMiniSF(p),
        "AdamWMiniSF_single_tensor": lambda p: AdamWMiniSF(p, foreach=False),
    })
    fused, foreach = timing["adamw_fused"]["median_s"], timing["adamw_foreach"]["median_s"]
    for name, t in timing.items():
        t["ratio_vs_adamw_fused"] = t["median_s"] / fused
        t["ratio_vs_adamw_foreach"] = t["median_s"] / foreach
        print(f"  {name:26s} {t['ratio_vs_adamw_fused']:6.2f}x fused  {t['ratio_vs_adamw_foreach']:6.2f}x foreach  "
              f"state={t['state_bytes_per_param']:.2f} B/param")
    result = {"steps": steps, "seeds": list(seeds), "lr_grid": LR_GRID, "quality": quality, "step_time": timing}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "demo.json").write_text(json.dumps(result, indent=2))
        (Path(out) / "demo.md").write_text(markdown(result))
        print(f"wrote {Path(out) / 'demo.json'} and demo.md")
    if readme:
        update_readme(readme, markdown(result))
        print(f"updated the results tables in {readme}")
    return result


def markdown(result: dict) -> str:
    """The README's results tables."""
    lines = [f"Digits MLP, {result['steps']} steps, mean over seeds {result['seeds']}, "
             f"each optimizer at its best lr of {list(result['lr_grid'])}:", "",
             "| optimizer | lr | val loss (mean) | per seed | accuracy | state bytes/param |",
             "|---|---|---|---|---|---|"]
    for q in result["quality"]:
        per_seed = ", ".join(f"{x:.4f}" for x in q["val_loss_per_seed"])
        lines.append(f"| {q['optimizer']} | {lr_text(q['lr'])} "
                     f"| {q['val_loss']:.4f} | {per_seed} | {q['accuracy']:.3f} "
                     f"| {q['state_bytes_per_param']:.2f} |")
    lines += ["", "`step()` on 4×Linear(512, 512), median of interleaved rounds, same run:", "",
              "| optimizer | × AdamW fused | × AdamW foreach | state bytes/param |", "|---|---|---|---|"]
    for name, t in result["step_time"].items():
        lines.append(f"| {name} | {t['ratio_vs_adamw_fused']:.2f} | {t['ratio_vs_adamw_foreach']:.2f} "
                     f"| {t['state_bytes_per_param']:.2f} |")
    return "\n".join(lines) + "\n"
