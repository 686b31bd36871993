"""Tabular regression on Friedman's #1 problem, generated: an MLP trained with mean squared error.

    y = 10·sin(π·x0·x1) + 20·(x2 − 0.5)² + 10·x3 + 5·x4 + noise,   x ~ U[0, 1]^d

(Friedman, "Multivariate adaptive regression splines", 1991; scikit-learn's
``make_friedman1``.) Only 5 of the ``d`` features matter; the rest are
distractors. The target is standardised, so predicting the mean scores
about 1.0, while the small noise (σ = 0.1 against a target std of about 5)
puts the floor near 0.0004 (``task.info["noise_floor"]``). The linear part
is learnt at once; the ``sin(π·x0·x1)`` interaction and the quadratic take
longer, and how close a run gets to the floor is where optimizers part.
Losses span orders of magnitude here: compare them on a log scale.

The data comes from a fixed generator (``DATA_SEED``), not from the run's
seed, so every seed sees the same train and validation sets, drawn
independently of each other; the seed sets initialisation and batch order.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Task, evaluating, seeded_model, step_generator

DATA_SEED = 1991
NOISE = 0.1
"""Small on purpose: with scikit-learn's usual σ = 1 every tuned optimizer lands on the same floor."""


def friedman1(n: int, features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, features, generator=generator)
    y = (10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
         + NOISE * torch.randn(n, generator=generator))
    return x, y


@functools.lru_cache(maxsize=4)
def load(n_train: int, n_val: int, features: int) -> tuple:
    """Return ``(x_train, y_train, x_val, y_val, noise_floor)``: inputs in [−1, 1], targets standardised.

    ``noise_floor`` is the noise variance in standardised units, the best validation loss possible.
    """
    gen = torch.Generator().manual_seed(DATA_SEED)
    x_train, y_train = friedman1(n_train, features, gen)
    x_val, y_val = friedman1(n_val, features, gen)
    mean, std = y_train.mean(), y_train.std()
    return 2 * x_train - 1, (y_train - mean) / std, 2 * x_val - 1, (y_val - mean) / std, NOISE**2 / std.item() ** 2


def model(features: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, width), nn.GELU(),
        nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, 1), nn.Flatten(0),
    )


def mse(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(net(x), y)


def make(seed: int = 0, quick: bool = False, *, width_factor: int = 1, batch_factor: int = 1) -> Task:
    """Friedman #1 MLP regression; ``quick`` uses less data, a narrower MLP and fewer steps.

    ``width_factor`` and ``batch_factor`` multiply the hidden width and the batch size (the robustness suite)."""
    if quick:
        n_train, n_val, features, width, batch, steps = 2_000, 1_000, 10, 64, 64, 500
    else:
        n_train, n_val, features, width, batch, steps = 10_000, 2_000, 10, 256, 128, 3000
    width, batch = width * width_factor, batch * batch_factor
    x_train, y_train, x_val, y_val, floor = load(n_train, n_val, features)
    net = seeded_model(seed, lambda: model(features, width))

    def train_batch(step: int) -> tuple:
        idx = torch.randint(n_train, (batch,), generator=step_generator(seed, step))
        return x_train[idx], y_train[idx]

    def val_loss(m: nn.Module) -> float:
        with evaluating(m):
            return mse(m, (x_val, y_val)).item()

    return Task(
        name="friedman", model=net, train_batch=train_batch, loss=mse, val_loss=val_loss,
        steps=steps, eval_every=steps // 5, baseline=(y_val - y_train.mean()).pow(2).mean().item(),
        info={"width": width, "batch": batch, "features": features, "n_train": n_train, "n_val": n_val,
              "noise_floor": floor},
    )
