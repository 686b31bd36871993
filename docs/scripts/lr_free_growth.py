"""A lag bounded by the step's growth (docs/lr_free.md): the step follows d with the 50-step lag, but may
always grow by a fraction RHO of itself per step, and never above d:

    d̄ ← min(d, d̄ + max((d − d̄)/τ, ρ·d̄))

Free of scale: the rule compares d̄ with itself and with d, never with a constant. While d rises from
D0 by less than ρ per step the step follows it at once (the LoRA fine-tune's gap is that rise, slowed by
the lag); a jump of d is still a ramp, of at most ln(jump)/ln(1+ρ) steps instead of about τ. An
exploration: refadamw.lr_free.advance is wrapped in each run's process; the library is unchanged.
Ours at lr=None, evaluated at the end of each run.

Run: PYTHONPATH=src python docs/scripts/lr_free_growth.py 0 1 2 3   (the seeds; RHOS=0.05,0.1 the growths;
     a first argument such as lora_finetune,shakespeare names the workloads)
"""
import os
import sys

from lr_free_lag import WORKLOADS, sweep

RHOS = [float(r) for r in os.environ.get("RHOS", "0.05,0.1").split(",")]


def growth_label(rho: float | None) -> str:
    return "defaults (lag from D0)" if rho is None else f"lag, growth ≥ {rho:g}/step"


VARIANTS = {growth_label(rho): rho for rho in (None, *RHOS)}


def lag_with_growth(rho: float) -> None:
    import torch

    from refadamw import lr_free

    advance = lr_free.advance

    def advance_with_growth(stats, dots, l1, applied, a, beta3, pull=None):
        lagged = stats["lr_free_d_lagged"]
        before = lagged.clone()
        advance(stats, dots, l1, applied, a, beta3, pull)
        grown = torch.minimum(stats["lr_free_d"], torch.maximum(lagged, before * (1 + rho)))
        lagged.copy_(torch.where(applied, grown, lagged))

    lr_free.advance = advance_with_growth


def run(job):
    label, workload, seed = job
    from refadamw.bench import runner

    if VARIANTS[label] is not None:
        lag_with_growth(VARIANTS[label])
    return runner.final_val_loss(workload, "refadamw", None, seed, False)


if __name__ == "__main__":
    named = sys.argv[1:2] and not sys.argv[1].isdigit()
    sweep(VARIANTS, run, [int(s) for s in sys.argv[1 + named:]] or [0, 1],
          sys.argv[1].split(",") if named else WORKLOADS)
