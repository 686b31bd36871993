"""Ref-AdamW-mini-ScheduleFree: low-memory, schedule-free AdamW for PyTorch."""

from .back_pass import fused_backward
from .batchnorm import recompute_bn_stats
from .checkpoint import averaged_state_dict, load_sharded, save_atomic, save_averaged, save_sharded
from .groups import param_groups
from .optimizer import AdamWMiniSF, RefAdamWMiniSF

# The same classes under names ending in "ScheduleFree": kohya sd-scripts switches eval()/train() around
# saving only for such names (docs/migrating.md).
AdamWMiniScheduleFree = AdamWMiniSF
RefAdamWMiniScheduleFree = RefAdamWMiniSF

__all__ = ["AdamWMiniSF", "AdamWMiniScheduleFree", "RefAdamWMiniSF", "RefAdamWMiniScheduleFree", "averaged_state_dict",
           "fused_backward", "load_sharded", "param_groups", "recompute_bn_stats", "save_atomic", "save_averaged", "save_sharded"]
__version__ = "0.1.0"
