"""Markdown reports of the main job's results: the console table, BENCHMARKS.md and the README block."""

from __future__ import annotations

import math

from .main import BASELINE, OURS
from .text import lr_text


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "NaN" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _lr(lr: float | None) -> str | float:
    return lr_text(lr) if lr is None else lr


def _loss(row: dict) -> str:
    mean, spread = row["mean"], row["spread"]
    return _cell(mean) if not spread else f"{_cell(mean)} ± {spread:.2g}"


def _setup(data: dict) -> str:
    n = len(data["seeds"])
    size = "quick (small models, short runs)" if data["quick"] else "full size"
    tuned = ("one lr per optimizer (the middle of its grid; ours at its defaults)" if data["quick"]
             else "each peer at the best lr of its grid on seed 0, ours at its defaults")
    merged = "".join(f" The rows of {', '.join(m['optimizers'])} on {', '.join(m['workloads'])} are from a later "
                     f"run, {m['file']}, with their ratios to that run's AdamW+cosine; the step() timing is the first "
                     "run's." for m in data.get("merged", []))
    return f"Workloads at {size}; {n} seed(s), mean ± std; {tuned}. Seconds: {data['seconds']:.0f}.{merged}"


def quality_table(data: dict) -> str:
    per = data["step_time_per_optimizer"]
    rows = [[r["workload"], r["optimizer"] + (" (defaults)" if r["optimizer"] == OURS else ""), _lr(r["lr"]),
             _loss(r), r["ratio_vs_adamw_cosine"], _state_bytes(data, r), per[r["optimizer"]]["ratio_vs_adamw_fused"]]
            for r in data["summary"]]
    return table(["workload", "optimizer", "lr", "final val loss", f"× {BASELINE}", "state B/param",
                  "step() × AdamW fused"], rows)


def _state_bytes(data: dict, row: dict) -> float:
    """State bytes per parameter on the 10.5M-parameter timing model (the workloads' tiny tensors keep
    per-element v, which is not what a large model pays)."""
    return data["step_time_per_optimizer"][row["optimizer"]]["state_bytes_per_param"]


def readme_table(data: dict) -> str:
    """Ours at its defaults against each peer at its best lr: final loss ratio to AdamW+cosine."""
    names = [n for n in data["optimizers"]]
    rows = []
    for workload in data["workloads"]:
        by_name = {r["optimizer"]: r for r in data["summary"] if r["workload"] == workload}
        rows.append([workload] + [by_name[n]["ratio_vs_adamw_cosine"] if n in by_name else None for n in names])
    per = data["step_time_per_optimizer"]
    rows.append(["state bytes/param"] + [per[n]["state_bytes_per_param"] for n in names])
    rows.append(["step() × AdamW fused"] + [per[n]["ratio_vs_adamw_fused"] for n in names])
    return table(["final val loss ÷ adamw_cosine (best lr)"] + [n + (" (defaults)" if n == OURS else "")
                                                             for n in names], rows)


def step_time_table(data: dict) -> str:
    s = data["step_time"]
    rows = [[name, v["ns_per_param"], v["ratio_vs_adamw_fused"], v["ratio_vs_adamw_foreach"], v["state_bytes_per_param"]]
            for name, v in data["step_time_per_optimizer"].items() if name not in ("adamw_cosine", "adamw_constant")]
    return "\n".join([
        table(["optimizer", "ns/param", "× AdamW fused", "× AdamW foreach", "state B/param"], rows), "",
        f"Copy bandwidth {s['copy_bandwidth_gbs']:.1f} GB/s. Ours moves about {s['bytes_moved_per_param']:g} bytes "
        f"per parameter, so its bandwidth limit is {s['bandwidth_limit_ns_per_param']:.3f} ns/param against "
        f"{s['ns_per_param']:.3f} measured; fused AdamW moves 28 (limit "
        f"{s['adamw_fused_bandwidth_limit_ns_per_param']:.3f}, measured {s['adamw_fused_ns_per_param']:.3f})."])


def sensitivity_table(data: dict) -> str:
    rows = []
    for r in data["lr_sensitivity"]:
        losses = [r["losses"][k] for k in sorted(r["losses"], key=float)]
        finite = [v for v in losses if math.isfinite(v)]
        worst = max(finite) / min(finite) if len(finite) == len(losses) else float("nan")
        rows.append([r["workload"], r["optimizer"], _lr(r["lr"]), *losses, worst])
    return table(["workload", "optimizer", "lr (centre)", "lr ÷ 3", "lr", "lr × 3", "worst ÷ best"], rows) + (
        "\n\nFor an lr-free row, the factors ÷ 3 and × 3 go on the estimate (`lr_free_scale`).")


CLIP_LABELS = {None: "none", "norm1": "norm 1.0", "zclip": "z-score (ZClip)"}


def spike_table(data: dict) -> str:
    """Clean and spiked final loss per optimizer and clipping (results from before clipping was added: none)."""
    rows = [[r["workload"], r["optimizer"], CLIP_LABELS.get(r.get("clip"), r.get("clip")), _lr(r["lr"]),
             sum(r["clean"]) / len(r["clean"]), sum(r["spiked"]) / len(r["spiked"]), r["ratio"]]
            for r in data["spike"]]
    return table(["workload", "optimizer", "clipping", "lr", "clean", "spiked", "spiked ÷ clean"], rows)


def targets(data: dict) -> str:
    ours = {r["workload"]: r["ratio_vs_adamw_cosine"] for r in data["summary"] if r["optimizer"] == OURS}
    per = data["step_time_per_optimizer"].get(OURS, {})
    quality = ", ".join(f"{w} {_cell(v)}" for w, v in ours.items())
    return "\n".join([
        f"- Quality (ours at defaults ÷ AdamW+cosine at its best lr, ≤ 1.00 wanted): {quality}.",
        f"- Memory (≤ 2.1 state bytes/param wanted): {_cell(per.get('state_bytes_per_param'))}.",
        f"- Speed (≤ 1.0× fused AdamW wanted, {data['step_time']['params'] / 1e6:.1f}M params, 2 threads): "
        f"{_cell(per.get('ratio_vs_adamw_fused'))}×."])


def markdown(data: dict) -> str:
    skipped = "".join(f"\n\nSkipped {n}: {why}." for n, why in data["skipped"].items())
    skipped += "".join(f"\n\nSkipped workload {w}: {why}" for w, why in data.get("skipped_workloads", {}).items())
    grids = "; ".join(f"{n} {', '.join(lr_text(lr) for lr in g)}" for n, g in data["grids"].items())
    spike = data["spike_setup"]
    return "\n".join([
        "### Results", "", _setup(data) + skipped, "", "Targets:", "", targets(data), "",
        "#### Final validation loss", "", quality_table(data), "", f"lr grids: {grids}.", "",
        f"#### step() time, {data['step_time']['params'] / 1e6:.1f}M parameters (10 × Linear(1024, 1024)), "
        "2 threads, median" + ("; timed again after the run (`--render --retime`)" if data.get("step_time_retimed")
                               else ""), "", step_time_table(data), "",
        "#### lr sensitivity (seed 0)", "", sensitivity_table(data), "",
        f"#### Spike recovery: gradients ×{spike['factor']:g} for {spike['steps']} steps at 50% of training", "",
        "Clipping is applied after backward and before `step()`, as trainers do; each optimizer runs at its lr "
        "from the table above, clipped or not.", "", spike_table(data)])
