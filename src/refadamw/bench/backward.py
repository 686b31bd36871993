"""``refadamw bench --suite backward``: the fused backward pass against the ordinary ``step()``.

1. **Peak memory** of a training step (forward, backward, step) of a ~50M-parameter stack of
   ``Linear(1024, 1024)`` on CPU, beyond the weights, each configuration in a fresh process
   (:func:`~refadamw.bench.memory.training_peak_memory`): ours with and without the fused backward
   pass, fused AdamW, and prodigy-plus-schedule-free with and without its own.
2. **Quality** on the LoRA fine-tune (:mod:`refadamw.bench.lora`, rank 16, the optimizer's own ``v``
   layout): final validation MSE with the fused backward pass ÷ the ordinary path at the same lr,
   for ``AdamWMiniSF`` and ``RefAdamWMiniSF``, unclipped and clipped at :data:`CLIP`.
3. **Spike recovery** in this mode: the controller suite's spikes (gradients ×10 and ×1000 for 3 steps
   at 50% of training) on its workloads, final validation loss spiked ÷ clean, for both paths.
"""

from __future__ import annotations

import math
import statistics

from .lora import LR_GRID, STEPS, Problem
from .memory import training_peak_memory

RANK = 16
CLIP = 0.005
"""Below the LoRA fine-tune's median gradient norm (about 0.009), so the clip binds on most steps; the HF
Trainer's default of 1.0 would never bind there."""
SPIKES = (10.0, 1000.0)
SPIKE_STEPS = 3


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _quality(bench) -> tuple[list[dict], str]:
    pretrain, steps = STEPS[bench.quick]
    problems = [Problem(seed, pretrain) for seed in bench.seeds]
    rows = []
    for ref in (False, True):
        for clip in (None, CLIP):
            grid = {lr: problems[0].finetune(RANK, None, lr, steps, ref=ref, max_grad_norm=clip)[0] for lr in LR_GRID}
            finite = {lr: v for lr, v in grid.items() if math.isfinite(v)}
            lr = min(finite, key=finite.get) if finite else LR_GRID[0]
            ordinary = [p.finetune(RANK, None, lr, steps, ref=ref, max_grad_norm=clip)[0] for p in problems]
            fused = [p.finetune(RANK, None, lr, steps, ref=ref, max_grad_norm=clip, fused_back_pass=True)[0]
                     for p in problems]
            row = {"optimizer": "RefAdamWMiniSF" if ref else "AdamWMiniSF", "clip": clip, "lr": lr,
                   "ordinary": ordinary, "fused": fused,
                   "ratio": statistics.mean(fused) / statistics.mean(ordinary)}
            rows.append(row)
            bench.log(f"  lora {row['optimizer']} clip {clip}: ordinary {statistics.mean(ordinary):.5f} "
                      f"fused {statistics.mean(fused):.5f} ({row['ratio']:.4f}×)")
    table = _table(["optimizer", "clipping", "lr", "ordinary step()", "fused back pass", "fused ÷ ordinary"],
                   [[r["optimizer"], "none" if r["clip"] is None else f"{r['clip']:g}", f"{r['lr']:g}",
                     f"{statistics.mean(r['ordinary']):.5f}", f"{statistics.mean(r['fused']):.5f}",
                     f"{r['ratio']:.4f}×"] for r in rows])
    return rows, table


def _spikes(bench, workloads: tuple[str, ...]) -> tuple[list[dict], str]:
    rows = []
    for workload in workloads:
        lr = bench.lr_for(workload, "refadamw")
        steps = bench.steps(workload)
        for fused in (False, True):
            clean = [bench.run(workload, "refadamw", lr, s, fused_back_pass=fused)[0].final_val_loss
                     for s in bench.seeds]
            row = {"workload": workload, "fused_back_pass": fused, "lr": lr, "clean": clean, "spiked": {}}
            for factor in SPIKES:
                row["spiked"][str(factor)] = [
                    bench.run(workload, "refadamw", lr, s, spike=(steps // 2, SPIKE_STEPS, factor),
                              fused_back_pass=fused)[0].final_val_loss for s in bench.seeds]
            rows.append(row)
            bench.log(f"  spikes {workload} fused={fused}: clean {statistics.mean(clean):.5g} " + " ".join(
                f"×{f:g} {statistics.mean(row['spiked'][str(f)]):.5g}" for f in SPIKES))
    table = _table(["workload", "path", "clean"] + [f"×{f:g} spiked ÷ clean" for f in SPIKES],
                   [[r["workload"], "fused back pass" if r["fused_back_pass"] else "ordinary step()",
                     f"{statistics.mean(r['clean']):.5g}"]
                    + [f"{statistics.mean(r['spiked'][str(f)]) / statistics.mean(r['clean']):.4f}" for f in SPIKES]
                    for r in rows])
    return rows, table


def backward(bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    bench.log("backward: peak memory of a training step (one process per configuration)")
    memory = training_peak_memory()
    for r in memory:
        bench.log(f"  {r['config']:30s} {r['optimizer_bytes_per_param']:.2f} B/param beyond backward")
    bench.log("backward: LoRA quality")
    quality, quality_table = _quality(bench)
    bench.log("backward: spike recovery")
    spikes, spike_table = _spikes(bench, workloads)
    n_params = memory[0]["params"] if memory else 0
    memory_table = _table(
        ["configuration", "peak beyond weights (B/param)", "optimizer side (B/param)", "state (B/param)"],
        [[r["config"], f"{r['peak_bytes_per_param']:.2f}", f"{r['optimizer_bytes_per_param']:.2f}",
          f"{r['state_bytes_per_param']:.2f}"] for r in memory])
    pretrain, steps = STEPS[bench.quick]
    n = len(bench.seeds)
    report = "\n".join([
        "### Fused backward pass", "",
        f"Peak resident memory of a training step of {n_params / 1e6:.1f}M parameters (48 × Linear(1024, 1024), "
        "fp32 weights, batch 4, CPU), beyond the weights; *optimizer side* is the peak beyond that of a backward "
        "that frees each gradient in a hook with no optimizer (gradients + state + the step's temporaries):", "",
        memory_table, "",
        f"LoRA fine-tune (rank {RANK}, {steps} steps after {pretrain} of pretraining), final validation MSE, "
        f"mean of {n} seed(s); lr best of {list(LR_GRID)} for the ordinary path on seed 0, the same for both; "
        f"clipping at {CLIP:g} binds on most steps (the median gradient norm is about 0.009):", "",
        quality_table, "",
        f"Spike recovery (gradients × factor for {SPIKE_STEPS} steps at 50% of training), RefAdamWMiniSF at its "
        f"best lr, mean of {n} seed(s):", "", spike_table])
    return {"memory": memory, "quality": quality, "spikes": spikes}, report
