"""Seed compatibility: the original optimizers' names and signatures, and their legacy arithmetic.

See :mod:`refadamw.compat.seed` (front doors) and :mod:`refadamw.compat.legacy`
(``legacy=True``); docs/migrating.md explains what changed and why.
"""

from .legacy import LegacyAdamWminiScheduleFree, LegacyRefAdamWminiScheduleFree
from .seed import AdamWminiScheduleFree, RefAdamWminiScheduleFree

__all__ = ["AdamWminiScheduleFree", "LegacyAdamWminiScheduleFree", "LegacyRefAdamWminiScheduleFree",
           "RefAdamWminiScheduleFree"]
