"""A residual conv net with BatchNorm on scikit-learn's bundled handwritten digits (8×8, 10 classes).

The images ship inside scikit-learn (``pip install scikit-learn``, in the
``bench`` extra); nothing is downloaded. The split is fixed: a quarter of the
1797 images (shuffled once with seed 0, all distinct) validate, the rest
train, augmented by a random shift of up to one pixel.

BatchNorm keeps running statistics gathered at the training weights, while
a Schedule-Free optimizer is evaluated at its average. ``val_loss``
therefore recomputes them at the weights being evaluated
(:func:`refadamw.recompute_bn_stats`, over fixed training batches), for
every optimizer alike, as the trainer callbacks do before an evaluation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from ...batchnorm import recompute_bn_stats
from . import digits
from .base import Task, evaluating, seeded_model, step_generator

BN_BATCHES = 8
"""Training batches (without augmentation) over which ``val_loss`` recomputes the BatchNorm statistics."""


@functools.lru_cache(maxsize=1)
def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``; images ``(n, 1, 8, 8)`` normalised by the training mean and std."""
    x_train, y_train, x_val, y_val = digits.load(seed=0)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std).view(-1, 1, 8, 8), y_train, ((x_val - mean) / std).view(-1, 1, 8, 8), y_val


def shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by an independent random offset in {-1, 0, 1}² (zero-filled), as crop augmentation."""
    n, size = x.shape[0], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(3, (2, n, 1), generator=gen)
    rows = (dy + torch.arange(size))[:, :, None]
    cols = (dx + torch.arange(size))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1×1 conv-BN projection when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def model(width: int) -> nn.Module:
    """Stem, two blocks at 8×8, a strided block to 4×4 at twice the width, global average pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width, width), ResidualBlock(width, width),
        ResidualBlock(width, 2 * width, stride=2), ResidualBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def classification_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


def make(seed: int = 0, quick: bool = False, *, width_factor: int = 1, batch_factor: int = 1) -> Task:
    """Residual BN conv net on the digits; ``quick`` halves the width and runs fewer, smaller steps.

    ``width_factor`` and ``batch_factor`` multiply the channel width and the batch size (the robustness suite)."""
    width, batch, steps = (8, 32, 200) if quick else (16, 64, 1000)
    width, batch = width * width_factor, batch * batch_factor
    x_train, y_train, x_val, y_val = load()
    net = seeded_model(seed, lambda: model(width))
    bn_gen = torch.Generator().manual_seed(12345)
    bn_batches = [x_train[torch.randint(len(x_train), (batch,), generator=bn_gen)] for _ in range(BN_BATCHES)]

    def train_batch(step: int) -> tuple:
        gen = step_generator(seed, step)
        idx = torch.randint(len(x_train), (batch,), generator=gen)
        return shifted(x_train[idx], gen), y_train[idx]

    def logits(m: nn.Module) -> torch.Tensor:
        recompute_bn_stats(m, bn_batches)
        with evaluating(m):
            return m(x_val)

    def val_loss(m: nn.Module) -> float:
        return F.cross_entropy(logits(m), y_val).item()

    def metrics(m: nn.Module) -> dict[str, float]:
        return {"accuracy": (logits(m).argmax(1) == y_val).float().mean().item()}

    prior = torch.bincount(y_train, minlength=10).double() / len(y_train)
    return Task(
        name="digits_resnet", model=net, train_batch=train_batch, loss=classification_loss, val_loss=val_loss,
        steps=steps, eval_every=steps // 5, baseline=-prior.log()[y_val].mean().item(), metrics=metrics,
        info={"width": width, "batch": batch, "n_train": len(x_train), "n_val": len(x_val)},
    )
