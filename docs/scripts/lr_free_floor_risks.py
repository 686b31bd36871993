"""The lr-free default outside the bench, and the floor under the lag per param group (docs/lr_free.md):

- ``shakespeare_hf_groups``: the Shakespeare transformer with the two groups the HF Trainer and
  ``refadamw.param_groups`` build (biases and norm weights apart, weight decay 0 on them), so two estimates;
- ``full_finetune``: the LoRA workload's pretrained model fine-tuned whole (no adapters), 600 steps;
- any bench workload by name, with one group.

Variants (each run evaluated at the end; prints its loss and each lr-free group's final estimate d):
``defaults``; ``relative floor F`` (no lag while d ≤ F·RMS of the group's sampled initial weights, or of
their spread about each tensor's mean with ``SPREAD=1``, each group its own; FLOORS lists the F);
``same decay`` (the two groups with the default weight decay alike, so only the estimate is split);
``no repair`` (the defaults with ``repair=False``); AVERAGING_POWER sets ours' ``averaging_power`` in all of them;
``fixed LR`` (ours at that lr in every group); and bench optimizers as they are: ``adamw_cosine@LR``,
``refadamw@LR``, ``prodigy_sf``. The floor wraps refadamw.lr_free.advance in the run's process; a library
implementation of the spread floor is on the branch ``lr-free-floor``.

Run: PYTHONPATH=src python docs/scripts/lr_free_floor_risks.py 0 1   (the seeds: ours at the defaults and
     with the floor, AdamW+cosine over LRS; WORKLOADS=full_finetune names the workloads; COSINE=0 and
     DEFAULTS=0 leave those runs out). One job, e.g. ("shakespeare_hf_groups", 5, "same decay"), is
     ``run(job)``, which the Pool calls.
"""
import dataclasses
import os
import statistics
import sys
from multiprocessing import Pool

from lr_free_floor import follow_below

FLOORS = [float(f) for f in os.environ.get("FLOORS", "2e-3").split(",")]
SPREAD = os.environ.get("SPREAD") == "1"
"""``SPREAD=1``: the floor is a fraction of the spread of the initial weights about each tensor's mean (pooled
over the group's tensors), so that tensors set to a constant (norm gains of 1, zero biases) add nothing."""
LRS = {"shakespeare_hf_groups": [3e-3, 1e-2], "full_finetune": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
"""AdamW+cosine's grid per workload (``COSINE=0`` runs none; ``DEFAULTS=0`` leaves out ours at the defaults)."""
if os.environ.get("COSINE") == "0":
    LRS = {}
AVERAGING_POWER = float(os.environ["AVERAGING_POWER"]) if "AVERAGING_POWER" in os.environ else None
"""Ours' ``averaging_power`` in every variant: None (unset) is the library's default, 1 in the lr-free mode since
2026-12-07; ``AVERAGING_POWER=0`` reruns the tables of docs/lr_free.md measured before that."""
PEERS = ("adamw_cosine", "refadamw", "prodigy_sf", "schedulefree")
"""Runs that take an optimizer of the bench as it is: ``name@lr`` at a fixed lr, ``name`` at its default."""
WORKLOADS = os.environ.get("WORKLOADS", "shakespeare_hf_groups,full_finetune").split(",")


def make(workload: str, seed: int):
    import torch

    from refadamw.bench import runner
    from refadamw.bench.workloads import lora_finetune, shakespeare

    if workload != "full_finetune":
        return runner.make_task(workload.replace("_hf_groups", ""), seed, False)
    task = lora_finetune.make(seed, False)
    dim, n_heads, layers, context, *_ = lora_finetune.SIZES[False]
    model = shakespeare.TinyGPT(len(lora_finetune.load()[3]), context, dim, n_heads, layers)
    model.load_state_dict(lora_finetune.pretrained(seed, False))
    with torch.no_grad():
        baseline = task.val_loss(model)
    return dataclasses.replace(task, name="full_finetune", model=model, baseline=baseline, info={})


def groups(model, workload: str, same_decay: bool = False):
    """One group, or with ``shakespeare_hf_groups`` the HF Trainer's two (``same_decay``: both with the default
    weight decay, so that only the estimate is split)."""
    if workload != "shakespeare_hf_groups":
        return [{"params": list(model.parameters())}]
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = {"params": [p for p in model.parameters() if p.ndim < 2], **({} if same_decay else {"weight_decay": 0.0})}
    return [{"params": matrices}, vectors]


def run(job):
    import torch

    torch.set_num_threads(1)
    from refadamw import RefAdamWMiniSF, lr_free
    from refadamw.bench import runner
    from refadamw.bench.optimizers import build

    workload, seed, variant = job
    task = make(workload, seed)
    built = []
    if variant.split("@")[0] in PEERS:  # "adamw_cosine@1e-2", "refadamw@1e-2" (a fixed lr), "prodigy_sf"
        name, _, lr = variant.partition("@")
        make_opt, schedule = build(name, float(lr) if lr else None, task.steps)
        return job, runner.train(task, make_opt, schedule=schedule, eval_every=0).final_val_loss, []
    # "defaults", "same decay" (the groups' weight decay alike), "no repair" (repair=False), "fixed 0.01" (that lr
    # in every group), or a floor
    floor = float(variant.split()[-1]) if "floor" in variant else None
    lr = float(variant.split()[-1]) if variant.startswith("fixed") else None
    if floor is not None:
        follow_below(lambda stats: stats["floor"])

    def make_ours(model):
        opt = RefAdamWMiniSF(groups(model, workload, variant == "same decay"), lr=lr, total_steps=task.steps,
                             repair=variant != "no repair", averaging_power=AVERAGING_POWER)
        for group in opt.param_groups if floor is not None else ():
            samples = [lr_free.sampled(p.detach()) for p in group["params"]]
            if SPREAD:
                samples = [s - s.mean() for s in samples]
            group["stats"]["floor"] = floor * torch.cat(samples).square().mean().sqrt()
        built.append(opt)
        return opt

    loss = runner.train(task, make_ours, eval_every=0).final_val_loss
    # plain floats: a tensor sent back through the pool cannot be rebuilt in the parent, which then waits forever
    info = [(float(g["stats"]["lr_free_d"]), float(g["stats"]["floor"]) if "floor" in g["stats"] else None)
            for g in built[0].param_groups if g["lr_free"]]
    return job, loss, info


if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1:]] or [0, 1]
    variants = [*(["defaults"] if os.environ.get("DEFAULTS", "1") == "1" else []),
                *(f"{'spread' if SPREAD else 'relative'} floor {f:g}" for f in FLOORS)]
    jobs = [(w, s, v) for w in WORKLOADS for v in [*variants, *(f"adamw_cosine@{lr:g}" for lr in LRS.get(w, []))]
            for s in seeds]
    losses = {}
    with Pool(int(os.environ.get("PROCS", 2)), maxtasksperchild=1) as pool:
        for (w, s, v), loss, info in pool.imap_unordered(run, jobs):
            losses[w, s, v] = loss
            groups_info = "; ".join(f"d {d:.3g}" + (f", floor {f:.3g}" if f else "") for d, f in info)
            print(f"{w} seed {s} {v}: {loss:.5g}" + (f" ({groups_info})" if info else ""), flush=True)
    print()
    for w in WORKLOADS:
        for v in [*variants, *(f"adamw_cosine@{lr:g}" for lr in LRS.get(w, []))]:
            print(f"{w} | {v} | {statistics.mean(losses[w, s, v] for s in seeds):.5g}")
