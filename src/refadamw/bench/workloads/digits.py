"""Handwritten digits (8x8, 1797 images) from scikit-learn's bundled copy: an MLP classifier."""

from __future__ import annotations

import torch


def load(seed: int = 0, val_fraction: float = 0.25):
    """Return ``(x_train, y_train, x_val, y_val)``; pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise RuntimeError(
            "the digits workload needs scikit-learn, which ships the data: pip install 'refadamw[bench]'"
        ) from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_val = int(len(x) * val_fraction)
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def model(seed: int = 0, hidden: int = 256) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, 10),
    )


def train(make_optimizer, steps: int = 400, batch: int = 64, seed: int = 0, schedule=None) -> dict:
    """Train a fresh model; return final validation loss and accuracy (averaged weights for Schedule-Free)."""
    x_train, y_train, x_val, y_val = load(seed)
    net = model(seed)
    opt = make_optimizer(net.parameters())
    sched = schedule(opt, steps) if schedule else None
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    if hasattr(opt, "eval"):
        opt.eval()
    with torch.no_grad():
        logits = net(x_val)
        val_loss = torch.nn.functional.cross_entropy(logits, y_val).item()
        accuracy = (logits.argmax(1) == y_val).float().mean().item()
    return {"val_loss": val_loss, "accuracy": accuracy, "optimizer": opt}
