"""The Shakespeare transformer trained 5× longer (6000 steps): does a step size that suits a short run
still suit a long one? Same model, data and split as :mod:`.shakespeare`."""

from __future__ import annotations

from . import shakespeare
from .base import Task

LENGTH = 5


def make(seed: int = 0, quick: bool = False) -> Task:
    return shakespeare.make(seed, quick, length=LENGTH, name="shakespeare_long")
