"""Fashion-MNIST (28×28 grey clothing images, 10 classes): a small CNN classifier.

The images come from the Debian package ``dataset-fashion-mnist``, which
installs the original gzipped idx files under ``/usr/share/datasets/fashion-mnist/``
(``apt-get install dataset-fashion-mnist``); the ``REFADAMW_FASHION_MNIST``
environment variable may name another folder holding the same files.

Split: the first images of the official training file train, the first
images of the official test file validate, so the two never overlap. Only
the needed images are decompressed, which keeps loading fast.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import MissingData, Task, evaluating, seeded_model, step_generator

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "the fashion_mnist workload reads the idx files of the Debian package 'dataset-fashion-mnist': "
    f"apt-get install dataset-fashion-mnist (they land in {DEFAULT_DIR}; "
    "or set REFADAMW_FASHION_MNIST to a folder holding train-images-idx3-ubyte.gz and friends)"
)
MEAN, STD = 0.2860, 0.3530  # pixel statistics of the Fashion-MNIST training set


def data_dir() -> Path:
    return Path(os.environ.get("REFADAMW_FASHION_MNIST", DEFAULT_DIR))


def read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """The first ``count`` items (all if None) of an idx file, gzipped or not, as uint8."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:  # 0x08: unsigned bytes, the only type these files use
            raise ValueError(f"{path} is not an idx file of unsigned bytes")
        shape = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if count is not None:
            shape[0] = min(shape[0], count)
        data = f.read(int(np.prod(shape)))
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir() / name).is_file():
            return data_dir() / name
    raise MissingData(f"{data_dir() / stem}(.gz) not found; {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def load(n_train: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_val, y_val)``: images normalised, shape ``(n, 1, 28, 28)``."""

    def images(stem: str, n: int) -> torch.Tensor:
        x = torch.from_numpy(read_idx(_find(stem), n).astype(np.float32) / 255.0)
        return ((x - MEAN) / STD).unsqueeze(1)

    def labels(stem: str, n: int) -> torch.Tensor:
        return torch.from_numpy(read_idx(_find(stem), n).astype(np.int64))

    return (images("train-images-idx3-ubyte", n_train), labels("train-labels-idx1-ubyte", n_train),
            images("t10k-images-idx3-ubyte", n_val), labels("t10k-labels-idx1-ubyte", n_val))


def model(width: int) -> nn.Module:
    """Two conv/pool stages then a linear head: 28×28 → 14×14 → 7×7 → 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 49, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def classification_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


def make(seed: int = 0, quick: bool = False) -> Task:
    """Small CNN on a Fashion-MNIST subset; ``quick`` uses fewer images, channels and steps."""
    if quick:
        n_train, n_val, width, batch, steps = 10_000, 2_000, 8, 32, 200
    else:
        n_train, n_val, width, batch, steps = 20_000, 5_000, 16, 64, 1000
    x_train, y_train, x_val, y_val = load(n_train, n_val)
    net = seeded_model(seed, lambda: model(width))

    def train_batch(step: int) -> tuple:
        idx = torch.randint(n_train, (batch,), generator=step_generator(seed, step))
        return x_train[idx], y_train[idx]

    def logits(m: nn.Module) -> torch.Tensor:
        with evaluating(m):
            return torch.cat([m(chunk) for chunk in x_val.split(1000)])

    def val_loss(m: nn.Module) -> float:
        return F.cross_entropy(logits(m), y_val).item()

    def metrics(m: nn.Module) -> dict[str, float]:
        return {"accuracy": (logits(m).argmax(1) == y_val).float().mean().item()}

    prior = torch.bincount(y_train, minlength=10).double() / n_train
    baseline = -prior.log()[y_val].mean().item()  # predict the training class frequencies
    return Task(
        name="fashion_mnist", model=net, train_batch=train_batch, loss=classification_loss, val_loss=val_loss,
        # Validation costs about as much as 70 training steps, so the quick version evaluates only twice.
        steps=steps, eval_every=steps // 2 if quick else steps // 5, baseline=baseline, metrics=metrics,
        info={"width": width, "batch": batch, "n_train": n_train, "n_val": n_val},
    )
