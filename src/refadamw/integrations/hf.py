"""Hugging Face ``Trainer`` integration.

::

    from refadamw.integrations.hf import RefAdamWCallback, trainer_optimizers

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      optimizers=trainer_optimizers(model, lr=1e-3, weight_decay=0.1),
                      callbacks=[RefAdamWCallback()])

:class:`RefAdamWCallback` feeds the Ref controller and keeps the averaged
weights ``x`` in the model whenever the Trainer evaluates or saves:

* ``max_steps``: ``state.max_steps`` is passed to every ``optimizer.step()``
  (a step pre-hook), so the injection window is known without
  ``total_steps``;
* training loss: each logged ``loss`` (the Trainer averages it over the
  logging interval and over ranks, so every rank feeds the same value; set
  ``logging_steps`` small for a dense signal);
* eval loss: ``metrics["eval_loss"]`` after each evaluation, for the overfit
  detector;
* modes: ``eval()`` at the end of a step after which the Trainer evaluates or
  saves, ``train()`` after that (the Trainer's own ``training_step`` calls
  ``optimizer.train()`` too), and ``eval()`` when training ends, so
  ``trainer.save_model()`` and a later ``trainer.evaluate()`` see ``x``.
  Checkpoints therefore hold ``x``, with the optimizer state saved in eval
  mode to match; resuming switches back to ``y``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..groups import DEFAULT_NO_DECAY, param_groups
from ..optimizer import AdamWMiniSF, RefAdamWMiniSF
from . import as_signal, feed_max_steps, ours

__all__ = ["RefAdamWCallback", "optimizer_cls_and_kwargs", "trainer_optimizers"]


class RefAdamWCallback(TrainerCallback):
    """Feeds loss, eval loss and ``max_steps`` to the optimizer and switches its mode.

    Args:
        eval_loss_key: the metric fed as ``val_loss`` (``"eval_loss"``, or
            e.g. ``"eval_validation_loss"`` with several eval sets).
    """

    def __init__(self, eval_loss_key: str = "eval_loss") -> None:
        if not isinstance(eval_loss_key, str) or not eval_loss_key:
            raise TypeError(f"eval_loss_key must be a non-empty string, got {eval_loss_key!r}")
        self.eval_loss_key = eval_loss_key
        self._optimizers: list[AdamWMiniSF] = []
        self._hooks: list[Any] = []
        self._switched = False  # whether this callback put x in the model for an evaluation or save

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._optimizers = ours([optimizer]) if optimizer is not None else []
        for opt in self._optimizers:
            opt.train()  # a resumed checkpoint holds x and eval-mode state
            if state.max_steps and state.max_steps > 0:
                self._hooks.append(feed_max_steps(opt, int(state.max_steps)))

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (always first) has set should_evaluate/should_save for this step;
        # the Trainer saves *before* calling on_save, so x must be in place now.
        if control.should_evaluate or control.should_save:
            for opt in self._optimizers:
                opt.eval()
            self._switched = bool(self._optimizers)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = as_signal((metrics or {}).get(self.eval_loss_key))
        for opt in self._optimizers:
            if value is not None and isinstance(opt, RefAdamWMiniSF):
                opt.observe(val_loss=value)
        if self._switched and not control.should_save:
            self._back_to_training(state)

    def on_save(self, args, state, control, **kwargs):
        if self._switched:
            self._back_to_training(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = as_signal((logs or {}).get("loss"))
        if value is None:
            return
        for opt in self._optimizers:
            if isinstance(opt, RefAdamWMiniSF):
                opt.observe(loss=value)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._hooks:
            if handle is not None:
                handle.remove()
        self._hooks = []
        for opt in self._optimizers:
            opt.eval()  # the trained model is x: save_model() and evaluate() after train() see it
        self._switched = False

    def _back_to_training(self, state) -> None:
        # After the last step training is over: stay in x rather than round-trip x → y → x.
        if not (state.max_steps and state.global_step >= state.max_steps):
            for opt in self._optimizers:
                opt.train()
        self._switched = False


def _constant(_: int) -> float:
    return 1.0


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
    if not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, AdamWMiniSF):
        raise TypeError(f"optimizer_cls must be AdamWMiniSF or a subclass, got {optimizer_cls!r}")
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
    if not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, AdamWMiniSF):
        raise TypeError(f"optimizer_cls must be AdamWMiniSF or a subclass, got {optimizer_cls!r}")
    optimizer_cls([torch.zeros(1, requires_grad=True)], **kwargs)  # bad kwargs fail here, not mid-setup
    return optimizer_cls, dict(kwargs)
