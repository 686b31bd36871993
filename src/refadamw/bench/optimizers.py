"""The optimizers the benchmark compares, by name, as ``(make_optimizer, schedule)`` pairs.

``make_optimizer(model)`` builds the optimizer; ``schedule(optimizer, steps)``
returns an lr scheduler or None. Peers that are not installed raise
:class:`MissingPeer`, which the suites report as a skip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import AdamWMiniSF, RefAdamWMiniSF
from ..controller import RefController

WARMUP_FRACTION = 0.05
"""AdamW+cosine warms up over this share of the run (and ``schedulefree`` likewise)."""


class MissingPeer(RuntimeError):
    """A peer optimizer's package is not installed."""


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int):
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training(optimizer):
    """Put a Schedule-Free optimizer (schedulefree's) in train mode, as it must be before stepping."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    return optimizer


NAMES = ("refadamw", "adamw_mini_sf", "adamw_cosine", "adamw_constant", "schedulefree", "adam_mini", "prodigy_sf",
         "seed_legacy")
"""Every optimizer :func:`build` knows, in the order reports list them."""


def build(name: str, lr: float | None, steps: int, info: dict | None = None,
          **options) -> tuple[Callable, Callable | None]:
    """``(make_optimizer, schedule)`` for optimizer ``name`` at peak lr ``lr`` (None: its default).

    ``options`` go to our optimizers' constructors (e.g. ``state_dtype``,
    ``ref_alpha``, ``repair``); ``controller`` (a dict) passes keyword
    tunables to the Ref controller (``ladder``, ``pull_after``,
    ``skip_level``...), for the repair-policy sweep.
    ``info`` is the task's ``info`` (Adam-mini needs the model's ``dim`` and
    ``n_heads``).
    """
    lr_kw = {} if lr is None else {"lr": lr}
    if name == "refadamw":
        tunables = options.pop("controller", None)

        def make(model):
            opt = RefAdamWMiniSF(model.parameters(), total_steps=steps, **lr_kw, **options)
            if tunables:  # a repair policy other than the default, for the ladder sweep
                c = opt.controller
                opt.controller = RefController(c.ref_alpha, c.ref_window, steps, c.repair, c.device, **tunables)
            return opt

        return make, None
    if name == "refadamw_lr_free":
        # Not in NAMES (at scale 1 it is ours at its defaults): the lr-sensitivity rows of the lr-free mode,
        # where the bench's "lr" is lr_free_scale, the factor on the estimate.
        scale = 1.0 if lr is None else lr
        return (lambda model: RefAdamWMiniSF(model.parameters(), total_steps=steps, lr=None, lr_free_scale=scale,
                                             **options)), None
    if name == "adamw_mini_sf":
        return (lambda model: AdamWMiniSF(model.parameters(), **lr_kw, **options)), None
    if name in ("adamw_cosine", "adamw_constant"):
        schedule = warmup_cosine if name == "adamw_cosine" else None
        return (lambda model: torch.optim.AdamW(model.parameters(), lr=lr or 1e-3, weight_decay=0.0)), schedule
    if name == "schedulefree":
        try:
            import schedulefree
        except ImportError as err:
            raise MissingPeer("schedulefree is not installed (pip install schedulefree)") from err
        warmup = max(1, int(WARMUP_FRACTION * steps))
        return (lambda model: schedulefree.AdamWScheduleFree(model.parameters(), lr=lr or 2.5e-3,
                                                             warmup_steps=warmup)), None
    if name == "adam_mini":
        try:
            from adam_mini import Adam_mini
        except ImportError as err:
            raise MissingPeer("adam_mini is not installed (pip install adam-mini)") from err
        shape = {k: v for k, v in (info or {}).items() if k in ("dim", "n_heads")}

        def make_adam_mini(model):
            # Adam-mini finds embeddings, heads and attention blocks by parameter name.
            opt = Adam_mini(model.named_parameters(), lr=lr or 1e-3, weight_decay=0.0, verbose=False, **shape)
            if (info or {}).get("lora"):
                # Its query/key rule splits a (dim, dim) weight by head; a LoRA factor of wq is (rank, dim).
                opt.wqk_names.clear()
            return opt

        return make_adam_mini, None
    if name == "prodigy_sf":
        try:
            from prodigyplus import ProdigyPlusScheduleFree
        except ImportError as err:
            raise MissingPeer("prodigy-plus-schedule-free is not installed "
                              "(pip install --no-deps prodigy-plus-schedule-free)") from err
        # Its lr is a multiplier on Prodigy's estimate (default 1.0), not a step size.
        return (lambda model: ProdigyPlusScheduleFree(model.parameters(), lr=1.0 if lr is None else lr)), None
    if name == "seed_legacy":
        from refadamwmini_schedulefree import RefAdamWminiScheduleFree

        # The original arithmetic (SPEC.md §2) at the original defaults, called as trainers call it: no loss.
        return (lambda model: RefAdamWminiScheduleFree(model.parameters(), lr=lr or 1e-3, legacy=True,
                                                       ref_max_steps=steps)), None
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(NAMES)}")
