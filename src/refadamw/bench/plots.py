"""PNG loss curves for ``refadamw bench`` (matplotlib, an optional dependency of the bench extra)."""

from __future__ import annotations

import math
from pathlib import Path


def loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> list[Path]:
    """One PNG per workload: validation loss against step, one line per optimizer.

    ``curves[workload][label]`` is a list of ``(step, val_loss)``. Returns
    the files written; raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

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
