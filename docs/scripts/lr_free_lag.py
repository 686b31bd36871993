"""The lr-free step's fraction and lag (docs/lr_free.md): ours at lr=None on the bench workloads, with
refadamw.lr_free.STEP_FRACTION and LAG_STEPS set per variant (LAG_STEPS=1 is no lag: the step follows d
at once, as before the lag), the final validation loss at the end of each run (no mid-run evaluations),
and AdamW+cosine at its tuned lr of the full bench for the ratios. Each run is a fresh process (the
constants are module globals), two at a time, one thread each.

Run: PYTHONPATH=src python docs/scripts/lr_free_lag.py 0 1 2 3   (the seeds; about 10 minutes on 2 cores;
PROCS=1 runs one at a time)
"""
import functools
import json
import os
import statistics
import sys
from multiprocessing import Pool
from pathlib import Path

THEN = {"betas": (0.9, 0.999), "weight_decay": 0.0}
"""The defaults when the tables of docs/lr_free.md were measured (β1 and weight decay changed since)."""
VARIANTS = {  # label → (STEP_FRACTION, LAG_STEPS, options of RefAdamWMiniSF on top of THEN)
    "0.5·d, no lag (before)": (0.5, 1, {}),
    "0.7·d̄, lag 50": (0.7, 50, {}),
    "0.85·d̄, lag 50 (now)": (0.85, 50, {}),
}
WORKLOADS = ("lora_finetune", "shakespeare", "digits_resnet", "flow_matching", "friedman")


def tuned_lr(optimizer: str) -> dict[str, float]:
    """``optimizer``'s best lr per workload in the full bench's docs/bench/results.json."""
    return {s["workload"]: s["lr"] for s in json.loads(Path("docs/bench/results.json").read_text())["summary"]
            if s["optimizer"] == optimizer}


COSINE_LR = tuned_lr("adamw_cosine")
COSINE = "AdamW+cosine, tuned"


def workload_sizes(spec: str) -> tuple[str, dict[str, int]]:
    """``"digits_resnet@width_factor=4"`` → ``("digits_resnet", {"width_factor": 4})``: a workload at one of the
    robustness suite's sizes; a plain name is the workload as built."""
    name, _, size = spec.partition("@")
    return name, dict((key, int(value)) for key, value in [size.split("=")]) if size else {}


def run(job):
    label, workload, seed = job
    from refadamw import lr_free
    from refadamw.bench import runner

    lr_free.STEP_FRACTION, lr_free.LAG_STEPS, options = VARIANTS[label]
    return runner.final_val_loss(workload, "refadamw", None, seed, False, **THEN, **options)


def _run_job(run_variant, job):
    """One job in its own process, one thread: tuned AdamW+cosine, or ``run_variant(job)``'s loss."""
    import torch

    torch.set_num_threads(1)
    label, workload, seed = job
    if label != COSINE:
        return job, run_variant(job)
    from refadamw.bench import runner

    name, sizes = workload_sizes(workload)
    return job, runner.final_val_loss(name, "adamw_cosine", COSINE_LR[name], seed, False, sizes)


def sweep(variants, run_one, seeds, workloads=WORKLOADS):
    """Every variant label of ``variants`` and tuned AdamW+cosine on every workload and seed, ``run_one((label,
    workload, seed))`` giving a variant's loss; prints each run and then the table. A workload the full bench
    did not tune AdamW+cosine on (``shakespeare_long``) runs the variants alone, with no ratio."""
    labels = [*variants, COSINE]
    tuned = {w for w in workloads if workload_sizes(w)[0] in COSINE_LR}
    jobs = [(label, w, s) for w in workloads for label in labels for s in seeds if label != COSINE or w in tuned]
    losses = {}
    with Pool(int(os.environ.get("PROCS", 2)), maxtasksperchild=1) as pool:
        for job, loss in pool.imap_unordered(functools.partial(_run_job, run_one), jobs):
            losses[job] = loss
            print(*job, f"{loss:.5g}", flush=True)
    mean = {(label, w): statistics.mean(losses[label, w, s] for s in seeds) for label, w, _ in jobs}

    def cell(label, w):
        return f"{mean[label, w]:.4g} ({mean[label, w] / mean[COSINE, w]:.3f})" if w in tuned else (
            f"{mean[label, w]:.4g}" if (label, w) in mean else "–")

    print(f"\nmean final validation loss over seeds {seeds}, ÷ AdamW+cosine tuned in brackets\n")
    print("| variant | " + " | ".join(workloads) + " |")
    print("|---" * (len(workloads) + 1) + "|")
    for label in labels:
        print(f"| {label} | " + " | ".join(cell(label, w) for w in workloads) + " |")
    return losses


if __name__ == "__main__":
    sweep(VARIANTS, run, [int(s) for s in sys.argv[1:]] or [0, 1])
