"""Several main-suite ``results.json`` files as one: ``refadamw bench --render base.json,update.json``.

A change to one optimizer needs only that optimizer re-run (with AdamW+cosine, the baseline of every
ratio), not the whole main job. Each later file's rows replace the earlier ones' for the optimizers and
workloads it ran; every other row is kept. Each row keeps its ratio to the AdamW+cosine of its own run:
ratios are taken side by side in one run, and AdamW+cosine is not bit-reproducible across runs (its
tuned lr on the digits ResNet moved between two). The ``step()`` timing is the first file's (its run had
the machine to itself; a partial re-run may not). The report names what was merged from where
(``merged``), so a table never passes for one run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from .main import BASELINE, LR_FREE_SCALED, OURS

ROW_KEYS = ("runs", "summary", "lr_sensitivity", "spike")
"""The lists of per-(workload, optimizer) rows."""


def _optimizers_run(data: dict) -> list[str]:
    """The optimizers whose rows a file holds: ours' lr-sensitivity runs go with ours."""
    return data["optimizers"] + ([LR_FREE_SCALED] if OURS in data["optimizers"] else [])


def merge_results(files: Sequence[tuple[str, dict]]) -> dict:
    """``files``: ``(name, results)`` pairs, the base first. Returns the merged results; the inputs are
    unchanged; each must be a main-suite results. ValueError when they ran other seeds or sizes, or an
    update lacks AdamW+cosine (its rows would have no ratio of their own run)."""
    (base_name, base), updates = files[0], files[1:]
    for name, data in updates:
        if (data["seeds"], data["quick"]) != (base["seeds"], base["quick"]):
            raise ValueError(f"{name} ran seeds {data['seeds']} (quick={data['quick']}), {base_name} seeds "
                             f"{base['seeds']} (quick={base['quick']}): their rows cannot share a table")
        if BASELINE not in data["optimizers"]:
            raise ValueError(f"{name} did not run {BASELINE}, the baseline of its rows' ratios")
    merged = copy.deepcopy(base)
    merged["merged"] = list(base.get("merged", []))
    for name, update in updates:
        replaced = {(w, o) for w in update["workloads"] for o in _optimizers_run(update)}
        for key in ROW_KEYS:
            merged[key] = [row for row in merged[key] if (row["workload"], row["optimizer"]) not in replaced]
            merged[key] += copy.deepcopy(update[key])
        merged["workloads"] += [w for w in update["workloads"] if w not in merged["workloads"]]
        merged["optimizers"] += [o for o in update["optimizers"] if o not in merged["optimizers"]]
        for workload, curves in update["curves"].items():
            kept = {label: curve for label, curve in merged["curves"].get(workload, {}).items()
                    if (workload, label.split(" lr=")[0]) not in replaced}
            merged["curves"][workload] = {**kept, **copy.deepcopy(curves)}
        merged["grids"].update(update["grids"])
        merged["skipped"].update(update["skipped"])
        merged["skipped_workloads"].update(update.get("skipped_workloads", {}))
        for optimizer, timing in update["step_time_per_optimizer"].items():
            merged["step_time_per_optimizer"].setdefault(optimizer, timing)
        merged["seconds"] += update["seconds"]
        merged["merged"].append({"file": name, "optimizers": update["optimizers"], "workloads": update["workloads"]})
    _reorder(merged)
    timing = merged["step_time_per_optimizer"]
    for run in merged["runs"]:
        if run["optimizer"] in timing:
            run["step_time_ratio_vs_adamw_fused"] = timing[run["optimizer"]]["ratio_vs_adamw_fused"]
    return merged


def _reorder(merged: dict) -> None:
    """Rows and curves in the order of the workloads and optimizers (stable within a pair)."""
    workloads = {w: i for i, w in enumerate(merged["workloads"])}
    optimizers = {o: i for i, o in enumerate(merged["optimizers"])}
    optimizers.setdefault(LR_FREE_SCALED, optimizers.get(OURS, len(optimizers)))

    def place(workload: str, optimizer: str) -> tuple[int, int]:
        return workloads.get(workload, len(workloads)), optimizers.get(optimizer, len(optimizers))

    for key in ROW_KEYS:
        merged[key].sort(key=lambda row: place(row["workload"], row["optimizer"]))
    merged["curves"] = {w: dict(sorted(c.items(), key=lambda item: place(w, item[0].split(" lr=")[0])))
                        for w, c in sorted(merged["curves"].items(), key=lambda item: place(item[0], "")[0])}
