"""PNG figures for ``refadamw bench`` (matplotlib, an optional dependency of the bench extra): loss curves and bars."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    """matplotlib's pyplot, drawing to files only (never a window); ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> list[Path]:
    """One PNG per workload: validation loss against step, one line per optimizer.

    ``curves[workload][label]`` is a list of ``(step, val_loss)``. Returns
    the files written; raises ImportError when matplotlib is missing.
    """
    plt = _pyplot()
    written = []
    for workload, lines in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, points in lines.items():
            finite = [(s, v) for s, v in points if math.isfinite(v)]
            if finite:
                ax.plot(*zip(*finite), marker="o", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.set_title(workload)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{workload}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def grouped_bars(values: dict[str, dict[str, float]], path: Path, ylabel: str, title: str,
                 reference: float | None = None) -> Path:
    """One group of bars per outer key of ``values``, one bar per inner key, in a shared colour order.

    Missing and non-finite values leave a gap. ``reference`` draws a dashed
    horizontal line (1.0 for a ratio). Raises ImportError without matplotlib.
    """
    plt = _pyplot()
    series = list(dict.fromkeys(name for bars in values.values() for name in bars))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(values), 4), dpi=100)
    for i, name in enumerate(series):
        points = [(g, bars[name]) for g, bars in enumerate(values.values())
                  if name in bars and math.isfinite(bars[name])]
        if points:
            xs, ys = zip(*points)
            ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], ys, width, label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(values)), list(values))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
