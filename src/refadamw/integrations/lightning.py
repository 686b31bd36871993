"""Lightning integration.

::

    from refadamw.integrations.lightning import RefAdamWCallback

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return RefAdamWMiniSF(param_groups(self, weight_decay=0.1), lr=1e-3)

    trainer = L.Trainer(max_steps=1000, callbacks=[RefAdamWCallback()])

:class:`RefAdamWCallback` does for Lightning what
:class:`refadamw.integrations.hf.RefAdamWCallback` does for the HF Trainer:

* ``max_steps``: ``trainer.estimated_stepping_batches`` is passed to every
  ``optimizer.step()`` (a step pre-hook);
* training loss: Lightning's automatic optimization calls
  ``optimizer.step(closure)``, and the closure's loss feeds the controller.
  With several ranks the hook makes the closure return the loss averaged over
  ranks, so every rank's controller decides the same;
* eval loss: ``trainer.callback_metrics[val_loss_key]`` after each validation;
* modes: ``x`` during validation (and the sanity check), ``y`` again after;
  ``x`` at the end of training; checkpoints hold ``x`` with the optimizer
  state saved in eval mode to match (resuming switches back to ``y``). The
  swap happens in ``on_save_checkpoint``, so it holds for every save,
  whenever ``ModelCheckpoint`` (or ``trainer.save_checkpoint``) makes it;
* BatchNorm: when the module has BatchNorm layers, their running statistics
  are recomputed at ``x`` (:func:`refadamw.recompute_bn_stats`, over the
  first ``bn_batches`` batches of the training set, in order) before each
  validation and save and at the end of training. The module is called as
  ``pl_module(batch[0])`` (or ``pl_module(**batch)`` for a dict batch); pass
  ``bn_forward(pl_module, batch)`` for another call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ..batchnorm import batchnorm_layers, recompute_bn_stats
from ..checkpoint import averaged
from ..optimizer import AdamWMiniSF
from . import as_signal, check_callback_args, feed_max_steps, ours

__all__ = ["RefAdamWCallback", "mean_loss_closure"]


def mean_loss_closure(strategy: Any):
    """A step pre-hook making the closure return its loss averaged over ranks.

    ``strategy.reduce(tensor, reduce_op="mean")`` is Lightning's all-reduce.
    The closure itself (forward, backward, Lightning's bookkeeping) is run
    unchanged; only the value handed to the optimizer changes.
    """

    def hook(opt, args, kwargs):
        # torch passes step()'s own args, starting with the optimizer itself.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            return None

        def closure_with_mean_loss():
            loss = closure()
            if isinstance(loss, torch.Tensor):
                return strategy.reduce(loss.detach(), reduce_op="mean")
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_with_mean_loss}
        return (args[0], closure_with_mean_loss, *args[2:]), kwargs

    return hook


class RefAdamWCallback(Callback):
    """Feeds loss, validation loss and ``max_steps`` to the optimizer and switches its mode.

    Args:
        val_loss_key: the logged metric fed as ``val_loss`` (``self.log(...)``
            in ``validation_step``); nothing is fed while it is absent.
        bn_batches: how many training batches recompute the BatchNorm
            statistics at ``x``; 0 turns the recomputation off. Ignored for a
            module without BatchNorm layers. Fewer than about 64 made val loss
            worse than the statistics gathered in training, in the measurement
            in docs/integrations.md.
        bn_forward: ``bn_forward(pl_module, batch)`` runs one batch for the
            recomputation (default: ``pl_module(batch[0])``).
    """

    def __init__(self, val_loss_key: str = "val_loss", bn_batches: int = 128,
                 bn_forward: Callable[[Any, Any], Any] | None = None) -> None:
        check_callback_args("val_loss_key", val_loss_key, bn_batches)
        if bn_forward is not None and not callable(bn_forward):
            raise TypeError(f"bn_forward must be callable, got {bn_forward!r}")
        self.val_loss_key = val_loss_key
        self.bn_batches = bn_batches
        self.bn_forward = bn_forward
        self._hooks: list[Any] = []
        self._validating = contextlib.ExitStack()
        self._bn_fresh_at: int | None = None  # the global step whose x the BatchNorm statistics were computed at

    @staticmethod
    def _ours(trainer) -> list[AdamWMiniSF]:
        return ours(getattr(trainer, "optimizers", None) or [])

    def on_train_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        for opt in self._ours(trainer):
            opt.train()  # a resumed checkpoint holds x and eval-mode state
            if isinstance(total, int) or (isinstance(total, float) and math.isfinite(total)):
                self._hooks.append(feed_max_steps(opt, int(total)))
            if trainer.world_size > 1 and opt.controller is not None:
                self._hooks.append(opt.register_step_pre_hook(mean_loss_closure(trainer.strategy)))

    def on_train_end(self, trainer, pl_module):
        for handle in self._hooks:
            if handle is not None:
                handle.remove()
        self._hooks = []
        for opt in self._ours(trainer):
            opt.eval()  # the trained model is x
        self._recompute_bn(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._validating.enter_context(averaged(*self._ours(trainer)))
        if not trainer.sanity_checking:  # before training, x = y and the statistics are the initial ones
            self._recompute_bn(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        value = as_signal(trainer.callback_metrics.get(self.val_loss_key))
        if value is not None and not trainer.sanity_checking:
            for opt in self._ours(trainer):
                if opt.controller is not None:
                    opt.observe(val_loss=value)
        self._validating.close()

    def on_exception(self, trainer, pl_module, exception):
        self._validating.close()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Lightning has already put the model's and optimizers' state in `checkpoint`;
        # replace them with x and the matching eval-mode optimizer state.
        opts = self._ours(trainer)
        if not opts:
            return
        with averaged(*opts):
            self._recompute_bn(trainer, pl_module)
            weights = trainer.strategy.lightning_module_state_dict()
            checkpoint["state_dict"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in weights.items()}
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]

    def _recompute_bn(self, trainer, pl_module) -> None:
        """BatchNorm statistics at x (which must be in the model), once per global step."""
        opts = self._ours(trainer)
        if (not self.bn_batches or self._bn_fresh_at == trainer.global_step or not batchnorm_layers(pl_module)
                or not any(g["schedule_free"] for o in opts for g in o.param_groups)):
            return
        loader = getattr(trainer, "train_dataloader", None)
        if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_size is None:
            return  # no loader yet, several combined, or a batch sampler: no batches to recompute from
        in_order = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                                               collate_fn=loader.collate_fn, num_workers=0)
        recompute_bn_stats(pl_module, itertools.islice(in_order, self.bn_batches), forward=self.bn_forward)
        self._bn_fresh_at = trainer.global_step
