"""An alternative to the Prodigy estimate, measured and not adopted (docs/lr_free.md): DoG, "Distance over
Gradients" (Ivgi, Hinder & Carmon, ICML 2023, arXiv:2302.12022), on the same samples of z as the estimate.

DoG steps with η_t = r̄_t / sqrt(Σ_{s≤t} ‖u_s‖²), r̄_t = max(r_ε, max_{s≤t} ‖z_s − x0‖). Our steps are Adam's
normalised u = g/sqrt(v̂), whose elements have mean square about 1, so Σ‖u_s‖² ≈ n·t and, on the sample,

    η_t = c · r̄_t / sqrt(t),   r̄_t = max(D0, max_{s≤t} rms(z_S − x0_S))

which replaces d in refadamw.lr_free (the 50-step lag and the warmup stay; the step is η itself, so
STEP_FRACTION = 1). The patch wraps the tensor-op path (REFADAMW_COMPILE=0, so the CPU kernel does not
take the sums itself) and touches nothing on disk. ``c`` = 1 is DoG; 4 is the variant that won Shakespeare.

Run: PYTHONPATH=src python docs/scripts/lr_free_dog.py 0 1   (the seeds; about 15 minutes on 2 cores)
"""
import os
import sys

from lr_free_lag import THEN, sweep

VARIANTS = {"DoG (c = 1)": 1.0, "DoG × 4 (c = 4)": 4.0}


def use_dog(c: float) -> None:
    import torch

    from refadamw import lr_free

    read, commit = lr_free.Observation.read, lr_free.Observation.commit
    last = {}

    def read_with_distance(self, positions, params, grads):
        read(self, positions, params, grads)
        states = [self.states[i] for i in positions]
        z = torch.cat([lr_free.sampled(p).to(torch.float32) for p in params])
        z = z + torch.cat([lr_free.sampled(s["z_minus_y"]).to(torch.float32) for s in states])
        anchor = torch.cat([s["lr_free_anchor"] for s in states])
        self.distance_sq = getattr(self, "distance_sq", 0) + (anchor - z).square().sum()
        self.count = getattr(self, "count", 0) + anchor.numel()

    def commit_with_distance(self, applied):
        last["rms"] = (self.distance_sq / self.count).sqrt()
        return commit(self, applied)

    def advance_dog(stats, dots, l1, applied, a, beta3, pull=None):  # measured before the repair cut: no cut here
        d, lagged = stats["lr_free_d"], stats["lr_free_d_lagged"]
        r_bar = stats.setdefault("dog_r_bar", torch.full((), lr_free.D0, device=d.device))
        r_bar.copy_(torch.where(applied, torch.maximum(r_bar, last["rms"]), r_bar))
        t = stats["steps"].to(torch.float32) + 1
        d.copy_(torch.where(applied, c * r_bar / t.sqrt(), d))
        lagged.copy_(torch.where(applied, lagged + (d - lagged) / lr_free.LAG_STEPS, lagged))

    lr_free.Observation.read, lr_free.Observation.commit = read_with_distance, commit_with_distance
    lr_free.advance, lr_free.STEP_FRACTION = advance_dog, 1.0


def run(job):
    label, workload, seed = job
    os.environ["REFADAMW_COMPILE"] = "0"
    from refadamw.bench import runner

    use_dog(VARIANTS[label])
    return runner.final_val_loss(workload, "refadamw", None, seed, False, **THEN)


if __name__ == "__main__":
    sweep(VARIANTS, run, [int(s) for s in sys.argv[1:]] or [0, 1])
