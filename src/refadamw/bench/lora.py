"""``refadamw bench --suite lora``: second-moment blocks against per-element ``v`` for LoRA factors.

LoRA factors are small 2-D tensors: at SD1.5 widths (320–1280) and ranks
4–32, ``A`` is ``(r, in)`` and ``B`` is ``(out, r)``, and many fall under the
partition's :data:`~refadamw.partition.SMALL_NUMEL`. The workload:

1. a teacher MLP ``64 → 320 → 320 → 320 → 16`` (tanh) gives regression
   targets; a student of the same shape is pretrained on it with AdamW;
2. the *shifted* task: a second teacher whose weights are the first's plus a
   rank-8 change per layer (and a little full-rank noise, so no rank fits it
   exactly), with inputs drawn from a shifted distribution;
3. rank-``r`` LoRA factors on every layer of the frozen student
   (``A`` ~ N(0, 1/in), ``B`` = 0) are trained with :class:`~refadamw.AdamWMiniSF`
   (defaults, bf16 state) under each layout of their ``v``, set per parameter
   with the ``block_layouts`` group key: ``element`` (per-element ``v``),
   ``rows`` (one ``v`` per row of ``A`` and of ``B``) and ``A columns``
   (one per input feature of ``A``, per row of ``B``).

The lr of each (rank, layout) is the best of :data:`LR_GRID` on seed 0;
all seeds then run at it. Reported: final validation MSE (mean ± sd over
seeds, and relative to per-element ``v``) and optimizer state bytes per
LoRA parameter.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..back_pass import fused_backward
from ..optimizer import AdamWMiniSF, RefAdamWMiniSF
from .measure import state_bytes_per_param
from .workloads.lora_finetune import LoRA

WIDTHS = (64, 320, 320, 320, 16)
SHIFT_RANK = 8
RANKS = (8, 16)
LAYOUTS = {"element": ("element", "element"), "rows": ("rows", "rows"), "A columns": ("columns", "rows")}
"""Layout name → (spec of A, spec of B)."""
LR_GRID = (1e-2, 3e-2, 1e-1)
BATCH = 128
STEPS = {True: (100, 100), False: (400, 400)}
"""``quick`` → (pretraining steps, fine-tuning steps)."""


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _linears(model: torch.nn.Sequential) -> list[torch.nn.Linear]:
    return [m for m in model if isinstance(m, torch.nn.Linear)]


class Problem:
    """One seed's teachers, pretrained student and data."""

    def __init__(self, seed: int, pretrain_steps: int):
        self.seed = seed
        self.teacher = _mlp(1000 + seed)
        gen = torch.Generator().manual_seed(2000 + seed)
        self.shifted = _mlp(1000 + seed)
        with torch.no_grad():
            for layer in _linears(self.shifted):
                out, inp = layer.weight.shape
                u, v = torch.randn(out, SHIFT_RANK, generator=gen), torch.randn(SHIFT_RANK, inp, generator=gen)
                layer.weight.add_(0.5 * (u @ v) / math.sqrt(SHIFT_RANK * inp))
                layer.weight.add_(0.02 * torch.randn(out, inp, generator=gen) / math.sqrt(inp))
        self.shift = torch.randn(WIDTHS[0], generator=gen) * 0.5
        self.val = self.batch(self.shifted, -1, 1024)
        self.student = _mlp(3000 + seed)
        opt = torch.optim.AdamW(self.student.parameters(), lr=3e-3)
        for step in range(pretrain_steps):
            x, y = self.batch(self.teacher, step, BATCH, shifted=False)
            loss = torch.nn.functional.mse_loss(self.student(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def batch(self, teacher, step: int, size: int, shifted: bool = True):
        gen = torch.Generator().manual_seed(10_000 * self.seed + step + 7)
        x = torch.randn(size, WIDTHS[0], generator=gen) + (self.shift if shifted else 0)
        with torch.no_grad():
            return x, teacher(x)

    def finetune(self, rank: int, layout: str | None, lr: float, steps: int, *, ref: bool = False,
                 fused_back_pass: bool = False, max_grad_norm: float | None = None) -> tuple[float, float]:
        """Final validation MSE and state bytes per LoRA parameter. ``layout`` None: the optimizer's own
        rule; ``ref``: :class:`~refadamw.RefAdamWMiniSF`; ``fused_back_pass``: stepped inside backward
        by :func:`~refadamw.fused_backward`; ``max_grad_norm``: clip (the global norm, or in the fused
        pass :func:`~refadamw.fused_backward`'s clip)."""
        gen = torch.Generator().manual_seed(4000 + self.seed)
        model = _mlp(0)
        model.load_state_dict(self.student.state_dict())
        adapters = torch.nn.Sequential(*[LoRA(m, rank, gen) if isinstance(m, torch.nn.Linear) else m for m in model])
        spec_a, spec_b = LAYOUTS[layout] if layout is not None else (None, None)
        params, specs = [], []
        for module in adapters:
            if isinstance(module, LoRA):
                params += [module.A, module.B]
                specs += [spec_a, spec_b]
        group = {"params": params} if layout is None else {"params": params, "block_layouts": specs}
        extra = {"total_steps": steps} if ref else {}
        opt = (RefAdamWMiniSF if ref else AdamWMiniSF)([group], lr=lr, fused_back_pass=fused_back_pass, **extra)
        if fused_back_pass:
            fused_backward(adapters, opt, max_grad_norm=max_grad_norm)
        for step in range(steps):
            x, y = self.batch(self.shifted, step, BATCH)
            loss = torch.nn.functional.mse_loss(adapters(x), y)
            opt.zero_grad()
            loss.backward()
            if max_grad_norm is not None and not fused_back_pass:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
        opt.eval()
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(adapters(self.val[0]), self.val[1]).item()
        return val, state_bytes_per_param(opt)


def lora(bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    """The suite (``workloads`` is not used: the LoRA problem is its own)."""
    pretrain, steps = STEPS[bench.quick]
    problems = [Problem(seed, pretrain) for seed in bench.seeds]
    with torch.no_grad():
        before = [torch.nn.functional.mse_loss(p.student(p.val[0]), p.val[1]).item() for p in problems]
    results = {}
    for rank in RANKS:
        for layout in LAYOUTS:
            grid = {lr: problems[0].finetune(rank, layout, lr, steps)[0] for lr in LR_GRID}
            finite = {lr: v for lr, v in grid.items() if math.isfinite(v)}
            lr = min(finite, key=finite.get) if finite else LR_GRID[0]
            runs = [p.finetune(rank, layout, lr, steps) for p in problems]
            vals = [v for v, _ in runs]
            results[f"r{rank}/{layout}"] = dict(rank=rank, layout=layout, lr=lr, val=vals,
                                                lr_grid={str(k): v for k, v in grid.items()},
                                                bytes_per_param=runs[0][1])
            bench.log(f"  lora r={rank:2d} {layout:10s} lr {lr:g}: val {statistics.mean(vals):.5f}")
    header = ["rank", "v layout", "lr", "final val MSE (mean ± sd)", "vs per-element", "state B/param"]
    rows = []
    for rank in RANKS:
        base = statistics.mean(results[f"r{rank}/element"]["val"])
        for layout in LAYOUTS:
            r = results[f"r{rank}/{layout}"]
            mean = statistics.mean(r["val"])
            sd = statistics.pstdev(r["val"])
            rows.append([str(rank), layout, f"{r['lr']:g}", f"{mean:.5f} ± {sd:.5f}", f"{mean / base:.3f}×",
                         f"{r['bytes_per_param']:.2f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    report = "\n".join([
        f"LoRA factors on a frozen pretrained MLP {' → '.join(map(str, WIDTHS))}, shifted task "
        f"(rank-{SHIFT_RANK} teacher change + noise, shifted inputs); AdamWMiniSF defaults, bf16 state; "
        f"{len(bench.seeds)} seeds, {steps} steps, lr best of {list(LR_GRID)} on seed 0. "
        "`A columns`: one v per input feature of A (r, in), per row of B (out, r). "
        f"Val MSE of the pretrained model before fine-tuning: {statistics.mean(before):.5f}.",
        "", *lines])
    return {"results": results, "steps": steps, "pretrain_steps": pretrain, "val_before": before}, report
