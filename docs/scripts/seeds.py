"""More seeds where two cannot rank the optimizers (docs/lr_free.md): ours at its defaults,
prodigy-plus-schedule-free at its defaults, and Schedule-Free AdamW and AdamW+cosine at their tuned lrs of
the full bench (docs/bench/results.json), on the named workloads and seeds, evaluated at the end of each run
(no mid-run evaluations). Prints each run, the table of means and, per peer, on how many seeds ours ended
lower: a paired count, since a seed fixes the split, the data order and the initial weights for every
optimizer alike. A workload may carry a robustness size, ``digits_resnet@width_factor=4`` (the peers keep
their lrs tuned as built); ``BEFORE=1`` adds ours with the defaults before 2026-12-04 (β1 0.9, no decay).

Run: PYTHONPATH=src python docs/scripts/seeds.py digits_resnet,friedman 0 1 2 3 4 5 6 7
(about 20 minutes on 2 cores; PROCS=1 runs one at a time)
"""
import os
import sys

from lr_free_lag import COSINE, THEN, sweep, tuned_lr, workload_sizes

OURS = "ours, defaults"
VARIANTS = {  # label → (optimizer, its lr per workload, None: its default; options)
    OURS: ("refadamw", None, {}),
    "prodigy_sf, defaults": ("prodigy_sf", None, {}),
    "schedulefree, tuned": ("schedulefree", tuned_lr("schedulefree"), {}),
}
if os.environ.get("BEFORE") == "1":
    VARIANTS["ours, β1 0.9, no decay (before)"] = ("refadamw", None, THEN)


def run(job):
    label, workload, seed = job
    from refadamw.bench import runner

    optimizer, lrs, options = VARIANTS[label]
    name, sizes = workload_sizes(workload)
    return runner.final_val_loss(name, optimizer, lrs and lrs[name], seed, False, sizes, **options)


def paired(losses, workloads, seeds):
    """Per workload and peer: on how many of the seeds ours ended below the peer."""
    peers = [p for p in [*VARIANTS, COSINE] if p != OURS]
    print("\n| workload | " + " | ".join(f"ours below {p}" for p in peers) + " |")
    print("|---" * (len(peers) + 1) + "|")
    for w in workloads:
        wins = [sum(losses[OURS, w, s] < losses[p, w, s] for s in seeds) if (p, w, seeds[0]) in losses else None
                for p in peers]
        print(f"| {w} | " + " | ".join("–" if k is None else f"{k} of {len(seeds)}" for k in wins) + " |")


if __name__ == "__main__":
    workloads, seeds = sys.argv[1].split(","), [int(s) for s in sys.argv[2:]] or [0, 1]
    paired(sweep(VARIANTS, run, seeds, workloads), workloads, seeds)
