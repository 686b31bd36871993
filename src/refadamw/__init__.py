"""Ref-AdamW-mini-ScheduleFree: low-memory, schedule-free AdamW for PyTorch."""

from .checkpoint import averaged_state_dict, load_sharded, save_atomic, save_averaged, save_sharded
from .groups import param_groups
from .optimizer import AdamWMiniSF, RefAdamWMiniSF

__all__ = ["AdamWMiniSF", "RefAdamWMiniSF", "averaged_state_dict", "load_sharded", "param_groups", "save_atomic",
           "save_averaged", "save_sharded"]
__version__ = "0.1.0"
