"""The models of ``refadamw bench --suite step``: real ``nn.Module``s, so the parameters' order and shapes are real.

Only the parameters matter to an optimizer's step, so the modules have no
``forward``. Each is described by plain data (:data:`MODELS`), so a fresh
subprocess can rebuild the same model (the compile-time probe does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODELS: dict[str, dict] = {
    "large": {"kind": "linears", "layers": 10, "width": 1024, "bias": False},
    "transformer": {"kind": "gpt", "layers": 12, "dim": 384, "heads": 6, "vocab": 8192, "context": 512},
    "lora": {"kind": "lora", "pairs": 320, "rank": 16, "width": 640},
    "tiny": {"kind": "linears", "layers": 20, "width": 64, "bias": True},
}
"""Model name → the keyword arguments of its builder in :data:`BUILDERS` (``kind`` picks the builder).
Plain data, so a subprocess can rebuild the same model."""


def linears(layers: int, width: int, bias: bool) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width, bias=bias) for _ in range(layers)])


class _Block(nn.Module):
    """A pre-LayerNorm GPT block: 12 tensors, named as nanoGPT names them."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc": nn.Linear(dim, 4 * dim), "proj": nn.Linear(4 * dim, dim)})


class GPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm; the head is tied to the embedding."""

    def __init__(self, layers: int, dim: int, heads: int, vocab: int, context: int):
        super().__init__()
        self.heads = heads
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)


class LoRAPairs(nn.Module):
    """``pairs`` LoRA factors in pair order, named as peft names them: ``A`` (rank, width), ``B`` (width, rank)."""

    def __init__(self, pairs: int, rank: int, width: int):
        super().__init__()
        self.pairs = nn.ModuleList(nn.ParameterDict({"lora_A": nn.Parameter(torch.randn(rank, width) / width ** 0.5),
                                                     "lora_B": nn.Parameter(torch.zeros(width, rank))})
                                   for _ in range(pairs))


BUILDERS: dict[str, Callable[..., nn.Module]] = {"linears": linears, "gpt": GPT, "lora": LoRAPairs}


def build_model(spec: dict, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The model of ``spec`` on ``device``; weights and gradients (``randn_like · 1e-2``) are fixed by ``seed``,
    so every optimizer steps the same tensors."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    model = BUILDERS[spec["kind"]](**kwargs).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model
