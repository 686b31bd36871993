"""Ref-AdamW-mini-ScheduleFree: low-memory, schedule-free AdamW for PyTorch."""

from .optimizer import AdamWMiniSF, RefAdamWMiniSF

__all__ = ["AdamWMiniSF", "RefAdamWMiniSF"]
__version__ = "0.1.0"
