"""A faster rise of the lr-free estimate (docs/lr_free.md): the LoRA fine-tune's gap to tuned AdamW+cosine is
the ~100 steps the estimate takes to grow from D0 = 1e-6, so start it higher, refadamw.lr_free.D0 = 1e-5,
alone and with averaging_power = 1 (later iterates weigh more in the average, so the steps of a too-fast
rise weigh less), against the defaults of now; ours at lr=None, evaluated at the end of each run.

Run: PYTHONPATH=src python docs/scripts/lr_free_rise.py 0 1   (the seeds; about 25 minutes on 2 cores)
"""
import sys

from lr_free_lag import sweep

VARIANTS = {  # label → (refadamw.lr_free.D0, options of RefAdamWMiniSF)
    "defaults (D0 = 1e-6)": (1e-6, {}),
    "D0 = 1e-5": (1e-5, {}),
    "D0 = 1e-5, averaging_power = 1": (1e-5, {"averaging_power": 1.0}),
}


def run(job):
    label, workload, seed = job
    from refadamw import lr_free
    from refadamw.bench import runner

    lr_free.D0, options = VARIANTS[label]
    return runner.final_val_loss(workload, "refadamw", None, seed, False, **options)


if __name__ == "__main__":
    sweep(VARIANTS, run, [int(s) for s in sys.argv[1:]] or [0, 1])
