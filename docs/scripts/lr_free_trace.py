"""Where the lr-free step size is during a run (docs/lr_free.md): ours on one workload and seed, at lr=None,
printing the step in force (``param_groups[0]["lr"]``, read between steps) at a few steps and the final
validation loss (evaluated at the end); or, with a number for the lr, that fixed lr's final loss alone.

Run: PYTHONPATH=src python docs/scripts/lr_free_trace.py lora_finetune 0          (the default's trace)
     PYTHONPATH=src python docs/scripts/lr_free_trace.py lora_finetune 0 1e-2     (a fixed lr)
"""
import sys

import torch

from refadamw.bench import runner
from refadamw.bench.optimizers import build

SHOWN = (10, 20, 40, 60, 80, 100, 125, 150, 200, 300, 400, 500, 600, 800, 1000, 1200)


def train_ours(task, lr: float | None, on_step=None, built=None):
    """Ours on ``task`` at ``lr`` (None: lr-free), evaluated at the end, as ``runner.final_val_loss`` runs it;
    the optimizer is appended to ``built``, so that it can be read during and after the run."""
    make, schedule = build("refadamw", lr, task.steps, info=task.info)
    built = [] if built is None else built
    return runner.train(task, lambda model: built.append(make(model)) or built[-1], schedule=schedule,
                        eval_every=0, on_step=on_step)


def trace(workload: str, seed: int, lr: float | None) -> None:
    torch.set_num_threads(1)
    built, shown = [], []

    def on_step(step, loss):
        if lr is None and step in SHOWN:
            shown.append((step, float(built[0].param_groups[0]["lr"])))

    result = train_ours(runner.make_task(workload, seed, False), lr, on_step, built)
    for step, value in shown:
        print(f"step {step}: step size {value:.3g}")
    print(f"{workload} seed {seed} lr {lr}: final validation loss {result.final_val_loss:.5g}")


if __name__ == "__main__":
    trace(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else None)
