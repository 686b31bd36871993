"""``refadamw demo --sweep``: the defaults sweep on the digits workload.

Mean final validation loss over seeds for AdamWMiniSF across lr × auto_lr ×
warmup_steps, with AdamW+cosine and Schedule-Free AdamW at their grids for
reference. This is what chose the current defaults (docs/defaults.md).
"""

from __future__ import annotations

import itertools
import statistics

import torch

from .. import AdamWMiniSF
from .demo import WARMUP, _cosine, _train_mode
from .workloads import digits

LRS = (3e-3, 1e-2, 2e-2, 3e-2, 5e-2)
SEEDS = (0, 1, 2)


def _mean_loss(make, steps, schedule=None):
    losses = [digits.train(make, steps=steps, seed=s, schedule=schedule)["val_loss"] for s in SEEDS]
    return statistics.mean(losses), statistics.pstdev(losses)


def run(steps: int = 300) -> list[str]:
    lines = [f"digits MLP, {steps} steps, mean ± std of final validation loss over seeds {SEEDS}", "",
             "| optimizer | lr | auto_lr | warmup_steps | val loss |", "|---|---|---|---|---|"]

    def row(name, lr, auto, warmup, make, schedule=None):
        mean, std = _mean_loss(make, steps, schedule)
        lines.append(f"| {name} | {lr:g} | {auto} | {warmup} | {mean:.4f} ± {std:.4f} |")
        print(lines[-1], flush=True)

    print("\n".join(lines))
    for lr, auto, warmup in itertools.product(LRS, (True, False), (0, WARMUP)):
        row("AdamWMiniSF", lr, auto, warmup,
            lambda p: AdamWMiniSF(p, lr=lr, auto_lr=auto, warmup_steps=warmup))
    for lr in (3e-3, 1e-2, 2e-2):
        row("adamw_cosine", lr, "-", WARMUP, lambda p: torch.optim.AdamW(p, lr=lr), _cosine)
    try:
        import schedulefree
    except ImportError:
        lines.append("(schedulefree not installed: skipped)")
        return lines
    for lr in (1e-2, 2e-2):
        row("schedulefree", lr, "-", WARMUP,
            lambda p: _train_mode(schedulefree.AdamWScheduleFree(p, lr=lr, warmup_steps=WARMUP)))
    return lines
