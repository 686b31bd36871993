"""A LoRA fine-tune: a tiny GPT pretrained on Shakespeare, then LoRA factors trained on a second text.

This is the setting of kohya sd-scripts and OneTrainer users: a pretrained
model, frozen, with small low-rank adapters as the only trained tensors
(Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

1. **Pretraining** (inside the bench, cached per process): the
   :class:`~.shakespeare.TinyGPT` of the Shakespeare workload, on every
   play, with AdamW and warmup-cosine. It is the same for every optimizer
   under test.
2. **Fine-tuning**: every weight is frozen (kept as a buffer, so
   ``model.parameters()`` yields the adapters alone) and each attention and
   MLP projection gets rank-:data:`RANK` factors, ``W + B·A`` with
   ``A ~ N(0, 1/in)`` and ``B = 0``. The second text is Python's own
   reference documentation (``pydoc_data.topics``, part of every CPython
   standard library): modern technical English with code, far from
   Shakespeare's. Every tenth distinct paragraph is held out for validation.

The documentation is that of the running Python, so the loss values move a
little between Python versions; comparisons inside one run are exact.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import shakespeare
from .base import MissingData, Task, evaluating, seeded_model, step_generator

RANK = 8
HELD_OUT_EVERY = 10
PRETRAIN_LR = 3e-3
SIZES = {  # quick → (dim, n_heads, layers, context, batch, pretraining steps, fine-tuning steps, validation windows)
    True: (64, 4, 2, 32, 16, 300, 160, 256),
    False: (64, 4, 2, 64, 16, 1500, 600, 512),
}
INSTALL_HINT = ("the lora_finetune workload fine-tunes on Python's reference documentation, the standard library's "
                "pydoc_data package, which this Python lacks; use a complete CPython build")


class LoRA(nn.Module):
    """``x ↦ base(x) + x·Aᵀ·Bᵀ`` around a frozen ``Linear``; ``B = 0``, so it starts as ``base``."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T


def freeze_as_buffers(model: nn.Module) -> nn.Module:
    """Turn every parameter of ``model`` into a buffer of the same name, so optimizers never see it."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, None if param is None else param.detach())
    return model


@functools.lru_cache(maxsize=1)
def texts() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``(all plays, training paragraphs, held-out paragraphs)`` as plain text.

    The topics repeat whole sections of one another, so the split is made over
    their distinct paragraphs: every tenth one is held out."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise MissingData(INSTALL_HINT) from err
    paragraphs = dict.fromkeys(p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip())
    held_out = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(paragraphs))]
    plays = "".join(text for _, text in shakespeare.plays())
    return (plays, tuple(p for p, out in zip(paragraphs, held_out, strict=True) if not out),
            tuple(p for p, out in zip(paragraphs, held_out, strict=True) if out))


@functools.lru_cache(maxsize=1)
def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(play ids, training-topic ids, held-out-topic ids, vocab)``; one vocabulary covers both texts."""
    plays, train, val = texts()
    train, val = "\n\n".join(train), "\n\n".join(val)
    vocab = "".join(sorted(set(plays) | set(train) | set(val)))
    encode = shakespeare.encoder(vocab)
    return encode(plays), encode(train), encode(val), vocab


@functools.lru_cache(maxsize=4)
def pretrained(seed: int, quick: bool) -> dict[str, torch.Tensor]:
    """The pretrained weights for ``(seed, quick)``: AdamW with warmup-cosine on the plays."""
    dim, n_heads, layers, context, batch, steps, _, _ = SIZES[quick]
    plays, _, _, vocab = load()
    model = seeded_model(seed, lambda: shakespeare.TinyGPT(len(vocab), context, dim, n_heads, layers))
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for step in range(steps):
        # Negative steps: batches that never coincide with the fine-tune's (seed, step) draws.
        starts = torch.randint(len(plays) - context, (batch,), generator=step_generator(seed, -1 - step))
        loss = shakespeare.lm_loss(model, shakespeare._windows(plays, starts, context))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adapted(seed: int, quick: bool) -> nn.Module:
    """The pretrained model, frozen, with rank-:data:`RANK` LoRA factors on every projection of every block."""
    dim, n_heads, layers, context, *_ = SIZES[quick]
    vocab = load()[3]
    # Seeded only so building leaves the global RNG alone: every weight is then overwritten.
    model = seeded_model(seed, lambda: shakespeare.TinyGPT(len(vocab), context, dim, n_heads, layers))
    model.load_state_dict(pretrained(seed, quick))
    freeze_as_buffers(model)
    gen = torch.Generator().manual_seed(5000 + seed)
    for block in model.blocks:
        for name in ("wq", "wk", "wv", "wo"):
            setattr(block, name, LoRA(getattr(block, name), RANK, gen))
        block.mlp[0], block.mlp[2] = LoRA(block.mlp[0], RANK, gen), LoRA(block.mlp[2], RANK, gen)
    return model


def make(seed: int = 0, quick: bool = False) -> Task:
    """LoRA fine-tune of the Shakespeare-pretrained GPT on Python's documentation."""
    dim, n_heads, _, context, batch, _, steps, n_val = SIZES[quick]
    _, train_ids, val_ids, vocab = load()
    model = adapted(seed, quick)
    val_starts = torch.linspace(0, len(val_ids) - context - 1, n_val).long()
    val_batch = shakespeare._windows(val_ids, val_starts, context)

    def train_batch(step: int) -> tuple:
        starts = torch.randint(len(train_ids) - context, (batch,), generator=step_generator(seed, step))
        return shakespeare._windows(train_ids, starts, context)

    def val_loss(net: nn.Module) -> float:
        with evaluating(net):
            return shakespeare.lm_loss(net, val_batch).item()

    # Baseline: the pretrained model itself, before any fine-tuning (B = 0 makes the adapted model equal it).
    return Task(
        name="lora_finetune", model=model, train_batch=train_batch, loss=shakespeare.lm_loss, val_loss=val_loss,
        steps=steps, eval_every=steps // 4, baseline=val_loss(model),
        info={"lora": True, "dim": dim, "n_heads": n_heads, "rank": RANK, "context": context, "batch": batch,
              "vocab": len(vocab), "adapter_params": sum(p.numel() for p in model.parameters())},
    )
