"""Where the estimate settles below the floor (docs/lr_free.md): the same workload with every weight
reparametrised as w = k·θ, the optimizer stepping θ (θ0 = w0/k). Adam's steps are scale-free, so the lr
it needs and the distance the estimate measures shrink by k while the training stays the same, up to
weight decay (lr·λ per step shrinks by k too) and Adam's ε. With k = 1000 Shakespeare's estimate settles
at 1.4–2.1e-5, below the 1e-4 floor of lr_free_floor.py, so that variant runs it with no lag at all: the
setting the lag was built for. Ours at lr=None, the defaults against the floor; evaluated at the end.

Run: PYTHONPATH=src python docs/scripts/lr_free_scaled.py shakespeare 1000 0 1   (workload, k, seeds; FLOORS and
     RELATIVE as in lr_free_floor.py)
"""
import os
import sys
from multiprocessing import Pool

import torch
from torch import nn
from torch.nn.utils import parametrize

from lr_free_floor import FLOORS, RELATIVE, floor_label, lag_above
from lr_free_trace import train_ours


class Scaled(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, theta):
        return theta * self.k

    def right_inverse(self, w):
        return w / self.k


def run(job):
    workload, k, seed, floor = job
    torch.set_num_threads(1)
    from refadamw.bench import runner

    if floor is not None:
        lag_above(floor, RELATIVE)
    task = runner.make_task(workload, seed, False)
    for module in list(task.model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, Scaled(k))
    built = []
    result = train_ours(task, None, built=built)
    return job, result.final_val_loss, float(built[0].param_groups[0]["stats"]["lr_free_d"])


if __name__ == "__main__":
    workload, k, seeds = sys.argv[1], float(sys.argv[2]), [int(s) for s in sys.argv[3:]] or [0, 1]
    jobs = [(workload, k, s, floor) for floor in (None, *FLOORS) for s in seeds]
    with Pool(int(os.environ.get("PROCS", 2)), maxtasksperchild=1) as pool:
        for (w, k, s, floor), loss, d in pool.imap_unordered(run, jobs):
            print(f"{w} k={k:g} seed {s} {floor_label(floor)}: final validation loss {loss:.5g}, estimate d {d:.3g}", flush=True)
