"""Small formatting helpers shared by the bench's reports."""

from __future__ import annotations


def lr_text(lr: float | None) -> str:
    """An lr as reports print it; None is our lr-free default."""
    return "lr-free" if lr is None else f"{lr:g}"
