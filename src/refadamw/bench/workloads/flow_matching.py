"""A flow-matching generative model of scikit-learn's bundled handwritten digits (64 pixels).

Flow matching (Lipman et al., 2023, "Flow Matching for Generative
Modeling"; rectified flow, Liu et al., 2023) trains a velocity field ``v(x_t, t)``
along the straight path from noise ``x₀ ~ N(0, I)`` to an image ``x₁``::

    x_t = (1 − t)·x₀ + t·x₁,    loss = E_{t, x₀, x₁} ‖v(x_t, t) − (x₁ − x₀)‖² / 64

with ``t ~ U(0, 1)``: the same denoising regression a diffusion model's
noise-prediction loss is, up to a weighting in ``t``. The network is an MLP
with sinusoidal time features, as small diffusion models use. Validation is
the same loss on the held-out images with a fixed draw of ``(x₀, t)``; it
has a floor above zero (the conditional variance of ``x₁ − x₀``), so
differences between optimizers are small in ratio and real.

The images ship inside scikit-learn; the split is that of
:mod:`.digits_resnet` (pixels scaled to [−1, 1]).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import digits
from .base import Task, evaluating, seeded_model, step_generator

FREQUENCIES = 8
"""Sinusoidal time features: sin and cos of ``2^k·π·t`` for ``k < FREQUENCIES``."""
VAL_DRAWS = 4
"""Noise draws per held-out image in the validation set."""


def time_features(t: torch.Tensor) -> torch.Tensor:
    angles = t[:, None] * (math.pi * 2.0 ** torch.arange(FREQUENCIES, dtype=t.dtype))
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VelocityMLP(nn.Module):
    """``v(x_t, t)``: the 64 pixels and the time features through ``depth`` SiLU layers of ``width``."""

    def __init__(self, width: int, depth: int = 3, pixels: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(pixels + 2 * FREQUENCIES, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, pixels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, time_features(t)], dim=1))


def path(x1: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, target velocity)`` for images ``x1`` with fresh noise and times from ``gen``."""
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.rand(x1.shape[0], generator=gen)
    return (1 - t[:, None]) * x0 + t[:, None] * x1, t, x1 - x0


def flow_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x_t, t, velocity = batch
    return F.mse_loss(net(x_t, t), velocity)


def make(seed: int = 0, quick: bool = False) -> Task:
    """Velocity MLP on the digits; ``quick`` narrows it and runs fewer, smaller steps."""
    width, batch, steps = (128, 64, 200) if quick else (512, 128, 1500)
    x_train, _, x_val, _ = digits.load(seed=0)
    x_train, x_val = 2 * x_train - 1, 2 * x_val - 1
    net = seeded_model(seed, lambda: VelocityMLP(width))
    val_batch = path(x_val.repeat(VAL_DRAWS, 1), torch.Generator().manual_seed(777))

    def train_batch(step: int) -> tuple:
        gen = step_generator(seed, step)
        return path(x_train[torch.randint(len(x_train), (batch,), generator=gen)], gen)

    def val_loss(m: nn.Module) -> float:
        with evaluating(m):
            return flow_loss(m, val_batch).item()

    # Trivial baseline: the best constant velocity, the mean target over the training images.
    mean_velocity = x_train.mean(0)
    baseline = F.mse_loss(mean_velocity.expand_as(val_batch[2]), val_batch[2]).item()
    return Task(
        name="flow_matching", model=net, train_batch=train_batch, loss=flow_loss, val_loss=val_loss,
        steps=steps, eval_every=steps // 5, baseline=baseline,
        info={"width": width, "batch": batch, "n_train": len(x_train), "n_val": len(x_val) * VAL_DRAWS},
    )
