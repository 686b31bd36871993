"""Hugging Face ``Trainer`` integration.

::

    from refadamw.integrations.hf import RefAdamWCallback, RefAdamWTrainer, trainer_optimizers

    trainer = RefAdamWTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                              optimizers=trainer_optimizers(model, lr=1e-3, weight_decay=0.1),
                              callbacks=[RefAdamWCallback()])

:class:`RefAdamWCallback` feeds the Ref controller and keeps the averaged
weights ``x`` in the model whenever the Trainer evaluates or saves:

* ``max_steps``: ``state.max_steps`` is passed to every ``optimizer.step()``
  (a step pre-hook), so the injection window is known without
  ``total_steps``;
* training loss: with :class:`RefAdamWTrainer` (or :class:`StepLossMixin` on
  your own Trainer subclass), each optimizer step's loss, before that step,
  as a tensor (no host sync). With a plain ``Trainer`` a callback cannot see
  the per-step loss, only each logged ``loss``: the mean over
  ``logging_steps`` steps, arriving after them;
* eval loss: ``metrics["eval_loss"]`` after each evaluation, for the overfit
  detector;
* modes: ``eval()`` at the end of any step or epoch after which the Trainer
  evaluates, saves or stops (``control.should_evaluate``, ``should_save``,
  ``should_training_stop``, as its ``DefaultFlowCallback`` has just set
  them), and ``train()`` when the next step begins. Every checkpoint (steps,
  epoch or best strategy, ``save_only_model``, the final one) and the model
  left after ``train()`` (also the one ``load_best_model_at_end`` loads) hold
  ``x``, with the optimizer state saved in eval mode to match; resuming
  switches back to ``y``;
* BatchNorm: when the model has BatchNorm layers, their running statistics
  are recomputed at ``x`` (:func:`refadamw.recompute_bn_stats`, over the first
  ``bn_batches`` batches of the training set, in order) each time ``x`` is
  put in the model.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..batchnorm import batchnorm_layers, recompute_bn_stats
from ..groups import DEFAULT_NO_DECAY, param_groups
from ..optimizer import AdamWMiniSF, RefAdamWMiniSF
from . import as_signal, check_callback_args, feed_max_steps, ours

logger = logging.getLogger("refadamw")

__all__ = ["RefAdamWCallback", "RefAdamWTrainer", "StepLossMixin", "optimizer_cls_and_kwargs", "trainer_optimizers"]


class RefAdamWCallback(TrainerCallback):
    """Feeds loss, eval loss and ``max_steps`` to the optimizer and switches its mode.

    Args:
        eval_loss_key: the metric fed as ``val_loss`` (``"eval_loss"``, or
            e.g. ``"eval_validation_loss"`` with several eval sets).
        bn_batches: how many training batches recompute the BatchNorm
            statistics at ``x``; 0 turns the recomputation off. Ignored for a
            model without BatchNorm layers. Fewer than about 64 made val loss
            worse than the statistics gathered in training, in the measurement
            in docs/integrations.md: the estimate's noise outweighs the y/x
            mismatch.
    """

    def __init__(self, eval_loss_key: str = "eval_loss", bn_batches: int = 128) -> None:
        check_callback_args("eval_loss_key", eval_loss_key, bn_batches)
        self.eval_loss_key = eval_loss_key
        self.bn_batches = bn_batches
        self._optimizers: list[AdamWMiniSF] = []
        self._hooks: list[Any] = []
        self._model: torch.nn.Module | None = None
        self._bn_loader: Any = None
        self._at_x = False  # x is in the model (and its BatchNorm statistics are fresh) until the next step
        self._step_losses = False  # a StepLossMixin feeds each step's loss: the logged mean is not fed

    def on_train_begin(self, args, state, control, optimizer=None, model=None, train_dataloader=None, **kwargs):
        self._optimizers = ours([optimizer]) if optimizer is not None else []
        for opt in self._optimizers:
            opt.train()  # a resumed checkpoint holds x and eval-mode state
            if state.max_steps and state.max_steps > 0:
                self._hooks.append(feed_max_steps(opt, int(state.max_steps)))
        self._at_x = False
        self._model = model
        self._bn_loader = None
        if self.bn_batches and model is not None and batchnorm_layers(model) and train_dataloader is not None:
            self._bn_loader = _in_order(train_dataloader, args.per_device_train_batch_size)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._at_x:
            for opt in self._optimizers:
                opt.train()  # the Trainer's training_step calls train() too; this covers trainers that do not
            self._at_x = False

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (always first) has just decided this step's evaluation and save;
        # the Trainer evaluates and saves right after this event, before the next step begins.
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self._to_x()

    def on_epoch_end(self, args, state, control, **kwargs):
        # Epoch strategies decide here, after the last step's on_step_end.
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self._to_x()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = as_signal((metrics or {}).get(self.eval_loss_key))
        for opt in self._optimizers:
            if value is not None and opt.controller is not None:
                opt.observe(val_loss=value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = as_signal((logs or {}).get("loss"))
        if value is None or self._step_losses:
            return
        for opt in self._optimizers:
            if opt.controller is not None:
                opt.observe(loss=value)

    def observe_step_loss(self, loss: torch.Tensor) -> None:
        """Feed one optimizer step's training loss (before that step); from then on
        the logged loss is not fed. :class:`StepLossMixin` calls this."""
        self._step_losses = True
        for opt in self._optimizers:
            if opt.controller is not None:
                opt.observe(loss=loss)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._hooks:
            if handle is not None:
                handle.remove()
        self._hooks = []
        self._to_x()  # the trained model is x: save_model() and evaluate() after train() see it

    def _to_x(self) -> None:
        if self._at_x or not self._optimizers:
            return
        for opt in self._optimizers:
            opt.eval()
        if self._bn_loader is not None and any(g["schedule_free"] for o in self._optimizers for g in o.param_groups):
            recompute_bn_stats(self._model, itertools.islice(self._bn_loader, self.bn_batches))
        self._at_x = True


def _in_order(train_dataloader: Any, batch_size: int) -> torch.utils.data.DataLoader:
    """The training set batched as the Trainer batches it, in order and without its sampler.

    A fresh iterator over the Trainer's own (accelerate-prepared) loader would draw from its
    sampler's random state and touch accelerate's end-of-epoch bookkeeping mid-epoch.
    """
    return torch.utils.data.DataLoader(train_dataloader.dataset, batch_size=batch_size, shuffle=False,
                                       collate_fn=train_dataloader.collate_fn, num_workers=0)


class StepLossMixin:
    """A ``Trainer`` mixin that feeds each optimizer step's training loss to the controller.

    ::

        class MyTrainer(StepLossMixin, Trainer): ...

    After the last micro-batch of an optimizer step (``accelerator.sync_gradients``),
    the sum of the step's ``training_step`` losses (the value the Trainer adds
    to its logged loss: the step's mean loss) goes to
    :meth:`RefAdamWCallback.observe_step_loss`, before ``optimizer.step()``.
    It stays a tensor: no host sync. With several processes it is averaged
    over them first (``accelerator.reduce``, one small all-reduce a step), so
    every rank's controller decides the same. A :class:`RefAdamWCallback` is
    added if none was passed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, RefAdamWCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(RefAdamWCallback())
        self._refadamw_step_loss: torch.Tensor | None = None

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        total = loss if self._refadamw_step_loss is None else self._refadamw_step_loss + loss
        if not self.accelerator.sync_gradients:  # more micro-batches to come before this step
            self._refadamw_step_loss = total
            return loss
        self._refadamw_step_loss = None
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="mean")
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, RefAdamWCallback):
                cb.observe_step_loss(total.reshape(()))
        return loss


class RefAdamWTrainer(StepLossMixin, Trainer):
    """``transformers.Trainer`` with :class:`StepLossMixin`: the controller gets every step's loss."""


def _constant(_: int) -> float:
    return 1.0


def _check_optimizer_args(optimizer_cls: Any, kwargs: dict[str, Any]) -> None:
    if not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, AdamWMiniSF):
        raise TypeError(f"optimizer_cls must be AdamWMiniSF or a subclass, got {optimizer_cls!r}")
    if "lr" not in kwargs:
        # The Trainer passes TrainingArguments.learning_rate only to optimizers it builds itself, so a
        # user who set it there would silently get the lr-free default instead.
        logger.warning("refadamw: no lr given, so %s estimates its own step size (lr=None, the lr-free default); "
                       "the Trainer does not pass TrainingArguments.learning_rate on, so that setting is unused. "
                       "Pass lr=... here for a fixed lr (docs/lr_free.md)", optimizer_cls.__name__)


def trainer_optimizers(
    model: torch.nn.Module,
    *,
    weight_decay: float = 0.0,
    no_decay=DEFAULT_NO_DECAY,
    optimizer_cls: type[AdamWMiniSF] = RefAdamWMiniSF,
    **kwargs: Any,
) -> tuple[AdamWMiniSF, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    The optimizer gets no-decay groups for biases and norms
    (:func:`refadamw.param_groups`); ``kwargs`` go to ``optimizer_cls``. The
    scheduler is constant: Schedule-Free needs none, and without one the
    Trainer would add its default linear decay.
    """
    _check_optimizer_args(optimizer_cls, kwargs)
    optimizer = optimizer_cls(param_groups(model, weight_decay, no_decay), **kwargs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def optimizer_cls_and_kwargs(
    optimizer_cls: type[AdamWMiniSF] = RefAdamWMiniSF, **kwargs: Any
) -> tuple[type[AdamWMiniSF], dict[str, Any]]:
    """``(class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer builds the param groups itself (with ``args.weight_decay``).
    Set ``lr_scheduler_type="constant"`` in ``TrainingArguments``: the default
    linear decay would fight Schedule-Free.
    """
    _check_optimizer_args(optimizer_cls, kwargs)
    optimizer_cls([torch.zeros(1, requires_grad=True)], **kwargs)  # bad kwargs fail here, not mid-setup
    return optimizer_cls, dict(kwargs)
