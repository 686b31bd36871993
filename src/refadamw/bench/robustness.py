"""``refadamw bench --suite robustness``: does a default found at one size carry to 4× the width or the batch?

For each workload (default: ``friedman`` and ``digits_resnet``, which take ``width_factor`` and
``batch_factor``) and each size (as built, width ×4, batch ×4, same step count), AdamW+cosine is
re-tuned over :data:`GRID` on seed 0 and run on every seed at its best lr, while ours runs at its
defaults (lr-free) and at the fixed ``lr=3e-3`` that was its default before, and
prodigy-plus-schedule-free at its own. Reported: the mean final validation loss of each and its
ratio to the re-tuned AdamW+cosine at the same size.
"""

from __future__ import annotations

import math

from . import runner
from .optimizers import MissingPeer

WORKLOADS = ("friedman", "digits_resnet")
SIZES = {"as built": {}, "width ×4": {"width_factor": 4}, "batch ×4": {"batch_factor": 4}}
GRID = (1e-3, 3e-3, 1e-2, 3e-2)
UNTUNED = {"refadamw": ("refadamw", None), "refadamw_lr_3e-3": ("refadamw", 3e-3), "prodigy_sf": ("prodigy_sf", None)}
"""Label → ``(optimizer, lr)``, never tuned: ours at its defaults and at its former default lr, and
prodigy-plus-schedule-free at its defaults."""


def _loss(bench, workload: str, sizes: dict, name: str, lr: float | None, seed: int) -> float:
    return runner.final_val_loss(workload, name, lr, seed, bench.quick, sizes)


def robustness(bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    rows = []
    for workload in workloads:
        for size, sizes in SIZES.items():
            grid = {lr: _loss(bench, workload, sizes, "adamw_cosine", lr, bench.seeds[0]) for lr in GRID}
            finite = {lr: v for lr, v in grid.items() if math.isfinite(v)}
            best = min(finite, key=finite.get) if finite else GRID[0]
            cosine = runner.finite_mean([grid[best]] + [_loss(bench, workload, sizes, "adamw_cosine", best, s)
                                           for s in bench.seeds[1:]])
            row = {"workload": workload, "size": size, "adamw_cosine_lr": best, "adamw_cosine": cosine,
                   "adamw_cosine_grid": {str(lr): v for lr, v in grid.items()}}
            for label, (name, lr) in UNTUNED.items():
                try:
                    row[label] = runner.finite_mean([_loss(bench, workload, sizes, name, lr, s) for s in bench.seeds])
                except MissingPeer:
                    row[label] = float("nan")
                row[f"{label}_ratio"] = row[label] / cosine
            rows.append(row)
            bench.log(f"  {workload} {size}: " + ", ".join(f"{n} {row[f'{n}_ratio']:.3f}" for n in UNTUNED))
    lines = ["### Robustness: 4× the width or the batch, against a re-tuned AdamW+cosine", "",
             f"Final validation loss, mean over seeds {list(bench.seeds)}; AdamW+cosine re-tuned over {list(GRID)} "
             "at every size (seed 0), the others at their defaults. Ratio: ÷ the re-tuned AdamW+cosine.", "",
             "| workload | size | AdamW+cosine (lr) | ours, defaults (lr-free) | ours, lr=3e-3 | prodigy_sf |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[n]:.4g} ({r[f'{n}_ratio']:.3f})" for n in UNTUNED]
        lines.append(f"| {r['workload']} | {r['size']} | {r['adamw_cosine']:.4g} ({r['adamw_cosine_lr']:g}) | "
                     + " | ".join(cells) + " |")
    return {"robustness": rows}, "\n".join(lines)
