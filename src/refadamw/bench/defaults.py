"""``refadamw bench --suite defaults``: ours' other defaults, re-measured in the lr-free mode.

One factor at a time from the defaults (warmup, β1, β2, weight decay, the Ref injection λ and its
window), ours at ``lr=None`` on every workload and seed; the mean final validation loss and its ratio
to the defaults' (below 1: the variant did better). A default changes only where a variant wins on
every workload; docs/defaults.md has the table of the last run.
"""

from __future__ import annotations

import math
import statistics

from . import runner

WORKLOADS = ("lora_finetune", "shakespeare", "digits_resnet", "flow_matching", "friedman")
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "warmup_steps=0": {"warmup_steps": 0},
    "warmup_steps=100": {"warmup_steps": 100},
    "betas=(0.9, 0.999)": {"betas": (0.9, 0.999)},
    "betas=(0.95, 0.999)": {"betas": (0.95, 0.999)},
    "betas=(0.92, 0.99)": {"betas": (0.92, 0.99)},
    "weight_decay=0": {"weight_decay": 0.0},
    "averaging_power=0": {"averaging_power": 0.0},
    "ref_alpha=0": {"ref_alpha": 0.0},
    "ref_alpha=0.1": {"ref_alpha": 0.1},
    "ref_window=(0.1, 0.9)": {"ref_window": (0.1, 0.9)},
}
"""Label → keyword arguments of ``RefAdamWMiniSF`` on top of its defaults ("defaults" first: the reference)."""


def defaults(bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    rows = []
    for workload in workloads:
        reference = None
        for label, options in VARIANTS.items():
            losses = [runner.final_val_loss(workload, "refadamw", None, s, bench.quick, **options) for s in bench.seeds]
            mean = runner.finite_mean(losses)
            reference = mean if reference is None else reference
            rows.append({"workload": workload, "variant": label, "losses": losses, "mean": mean,
                         "ratio": mean / reference})
            bench.log(f"  {workload} {label}: {mean:.4g} ({mean / reference:.3f})")
    lines = ["### Ours' other defaults in the lr-free mode, one at a time", "",
             f"`RefAdamWMiniSF` at `lr=None`; mean final validation loss over seeds {list(bench.seeds)}, and in "
             "brackets ÷ the defaults' (below 1: better). Geometric mean of the ratios over the workloads last.", "",
             "| variant | " + " | ".join(workloads) + " | geo-mean |", "|---" * (len(workloads) + 2) + "|"]
    for label in VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        ratios = [r["ratio"] for r in mine]
        geo = math.exp(statistics.mean(map(math.log, ratios))) if all(r > 0 for r in ratios) else float("nan")
        lines.append(f"| {label} | " + " | ".join(f"{r['mean']:.4g} ({r['ratio']:.3f})" for r in mine)
                     + f" | {geo:.3f} |")
    return {"defaults": rows}, "\n".join(lines)
