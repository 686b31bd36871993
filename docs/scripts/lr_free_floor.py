"""The lag only above a floor (docs/lr_free.md): the LoRA fine-tune's gap to tuned AdamW+cosine is the ~100
steps the estimate takes to rise from D0 = 1e-6, and the lag slows that rise (the estimate grows with the
distance the iterate moves, which the lagged step shortens). Steps far below any lr one would tune need no
lag, so here the step follows d at once while d ≤ FLOOR, and with the 50-step lag, starting from FLOOR, above
it. An exploration: refadamw.lr_free.advance is wrapped in each run's process; the library is unchanged.
It closes the LoRA gap but fails a rescaled run (lr_free_scaled.py), so it was not taken.
Ours at lr=None, evaluated at the end of each run.

Run: PYTHONPATH=src python docs/scripts/lr_free_floor.py 0 1 2 3   (the seeds; about 10 minutes on 2 cores;
     FLOORS=1e-5,1e-3 runs other floors; RELATIVE=1 reads them as fractions of the weights' RMS)
     PYTHONPATH=src python docs/scripts/lr_free_floor.py shakespeare_long 0 1   (named workloads, no AdamW+cosine
     for a workload the full bench did not tune)
"""
import os
import sys

from lr_free_lag import WORKLOADS, sweep

FLOORS = [float(f) for f in os.environ.get("FLOORS", "1e-4").split(",")]
"""The floors to run (``FLOORS=1e-5,1e-4,1e-3``), each against the defaults."""
RELATIVE = os.environ.get("RELATIVE") == "1"
"""``RELATIVE=1``: each floor is a fraction of the RMS of the sampled initial weights (all tensors pooled:
the bench gives ours one param group), so that it scales with the weights, as the estimate does."""


def floor_label(floor: float | None) -> str:
    return "defaults (lag from D0)" if floor is None else f"no lag below {floor:g}{'·rms(x0)' if RELATIVE else ''}"


VARIANTS = {floor_label(floor): floor for floor in (None, *FLOORS)}


def follow_below(floor_of) -> None:
    """Wrap refadamw.lr_free.advance so that the step follows d at once while d ≤ ``floor_of(stats)`` (a 0-d
    tensor, per group), and with the lag, from the floor up, above it."""
    import torch

    from refadamw import lr_free

    advance = lr_free.advance

    def advance_lagged_above_floor(stats, dots, l1, applied, a, beta3, pull=None):
        advance(stats, dots, l1, applied, a, beta3, pull)
        d, lagged, at = stats["lr_free_d"], stats["lr_free_d_lagged"], floor_of(stats)
        lagged.copy_(torch.where(d <= at, d, torch.maximum(lagged, torch.minimum(d, at))))

    lr_free.advance = advance_lagged_above_floor


def lag_above(floor: float, relative: bool = False) -> None:
    """:func:`follow_below` one floor for the run: ``floor`` itself, or ``relative``: that fraction of the RMS
    of all the anchors seen at the first step."""
    import torch

    from refadamw import lr_free

    init_state = lr_free.init_state
    anchors, at = [], []  # the anchors seen at the first step; the floor, computed once from them

    def init_state_kept(shard):
        state = init_state(shard)
        anchors.append(state["lr_free_anchor"])
        return state

    def floor_of(stats):
        if not at:
            d = stats["lr_free_d"]
            at.append(floor * torch.cat(anchors).square().mean().sqrt() if relative else torch.full_like(d, floor))
        return at[0]

    lr_free.init_state = init_state_kept
    follow_below(floor_of)


def run(job):
    label, workload, seed = job
    from refadamw.bench import runner

    if VARIANTS[label] is not None:
        lag_above(VARIANTS[label], RELATIVE)
    return runner.final_val_loss(workload, "refadamw", None, seed, False)


if __name__ == "__main__":
    named = sys.argv[1:2] and not sys.argv[1].isdigit()
    sweep(VARIANTS, run, [int(s) for s in sys.argv[1 + named:]] or [0, 1],
          sys.argv[1].split(",") if named else WORKLOADS)
