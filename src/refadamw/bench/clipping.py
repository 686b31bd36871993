"""Gradient clipping as trainers apply it, for the spike comparison: by a fixed norm, or by z-score.

:class:`ZScoreClip` follows the rule of ZClip (Kumar et al., "ZClip: Adaptive
Spike Mitigation for LLM Pre-Training", 2025, arXiv:2504.02507), written
here from the paper's description as a peer, not copied: the first
``warmup`` norms only set the running mean μ and variance σ²; after that a
norm ``n`` with ``z = (n − μ)/(σ + ε) > z_thresh`` is clipped to

    μ + z_thresh·σ / (z / z_thresh)          (its "adaptive scaling": the bigger the outlier, the lower the cap)

and the statistics then take the norm actually applied, ``n_eff``:

    μ ← α·μ + (1−α)·n_eff,   σ² ← α·σ² + (1−α)·(n_eff − μ)²     (α = 0.97)

It syncs with the host every step (a bench peer, not a product path).
"""

from __future__ import annotations

import math

import torch

CLIPS = (None, "norm1", "zclip")
"""The clipping modes the spike table runs: none, ``clip_grad_norm_(1.0)`` (the HF Trainer's, Accelerate's and
kohya's default) and :class:`ZScoreClip`."""


class ZScoreClip:
    """Clip the global gradient norm when it is a z-score outlier of its own running statistics."""

    def __init__(self, z_thresh: float = 2.5, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-6) -> None:
        self.z_thresh, self.alpha, self.warmup, self.eps = z_thresh, alpha, warmup, eps
        self.seen: list[float] = []
        self.mean = self.var = None
        self.clipped = 0

    def __call__(self, model: torch.nn.Module) -> float:
        """Clip ``model``'s gradients in place; returns the norm before clipping."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if not math.isfinite(norm):
            return norm
        if self.mean is None:
            self.seen.append(norm)
            if len(self.seen) >= self.warmup:
                self.mean = sum(self.seen) / len(self.seen)
                self.var = sum((x - self.mean) ** 2 for x in self.seen) / len(self.seen)
            return norm
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        applied = norm
        if z > self.z_thresh:
            applied = self.mean + self.z_thresh * std / (z / self.z_thresh)
            torch._foreach_mul_(grads, applied / (norm + 1e-6))
            self.clipped += 1
        self.mean = self.alpha * self.mean + (1 - self.alpha) * applied
        self.var = self.alpha * self.var + (1 - self.alpha) * (applied - self.mean) ** 2
        return norm


def make_clip(mode: str | None):
    """The runner's ``clip`` argument for ``mode`` (one of :data:`CLIPS`); a fresh clipper per run."""
    if mode is None:
        return None
    if mode == "norm1":
        return 1.0
    if mode == "zclip":
        return ZScoreClip()
    raise ValueError(f"unknown clip mode {mode!r}; choose from {CLIPS}")
