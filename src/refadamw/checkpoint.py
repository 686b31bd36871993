"""Checkpoints that hold the averaged weights ``x`` (SPEC.md §4).

Schedule-Free parameters hold the training point ``y`` while training; the
weights to evaluate, export or ship are the average ``x``. Forgetting
``optimizer.eval()`` before saving is the most common Schedule-Free mistake,
so these helpers switch to ``x`` themselves, whatever mode the optimizer is
in, and put the mode back afterwards.

* :func:`averaged_state_dict` / :func:`save_averaged`: the model's weights
  ``x`` (a ``torch.save`` file), for evaluation and export.
* :func:`save_sharded` / :func:`load_sharded`: model and optimizer with
  ``torch.distributed.checkpoint`` (FSDP2 / DTensor parameters, or plain ones),
  to resume training. The model entry holds ``x`` and the optimizer entry says
  so (eval mode); call ``optimizer.train()`` after loading, as before any
  training.
* :func:`save_atomic`: ``torch.save`` through a temporary file and a rename,
  so a process killed mid-save leaves the previous checkpoint, never half of
  a new one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import torch

from . import param_state
from .averaging import y_to_x
from .optimizer import AdamWMiniSF
from .precision import compute_dtype


def unwrap_optimizer(optimizer: Any) -> AdamWMiniSF:
    """The :class:`AdamWMiniSF` inside trainer wrappers.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, HF's
    wrappers) and ``._optimizer`` (Lightning's ``LightningOptimizer``).
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not hang
        if isinstance(seen, AdamWMiniSF):
            return seen
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if inner is None:
            break
        seen = inner
    raise TypeError(
        f"expected a refadamw optimizer (AdamWMiniSF or RefAdamWMiniSF), possibly wrapped, "
        f"got {type(optimizer).__name__}"
    )


@contextlib.contextmanager
def averaged(*optimizers: Any):
    """``optimizer.averaged()`` for several (possibly wrapped) optimizers at once."""
    with contextlib.ExitStack() as stack:
        for optimizer in optimizers:
            stack.enter_context(unwrap_optimizer(optimizer).averaged())
        yield


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


@torch.no_grad()
def averaged_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` holding the averaged weights ``x``.

    ``x = y − (1−β1)/β1·(z − y)`` is computed into the copy; the parameters and the
    optimizer's mode are not touched, so the training point ``y`` stays
    bit-identical (an ``eval()``/``train()`` round trip is exact only up to
    rounding, which would make DDP replicas differ if one rank saved alone).
    Entries that are not parameters of ``optimizer`` (buffers, frozen weights)
    are copied as they are.
    """
    _check_model(model)
    averages = _averages(unwrap_optimizer(optimizer))
    return {k: averages[id(v)] if id(v) in averages else v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict(keep_vars=True).items()}


def _averages(opt: AdamWMiniSF) -> dict[int, torch.Tensor]:
    """``id(param)`` → a new tensor holding its ``x``, for parameters that hold ``y`` now."""
    out = {}
    for group in opt.param_groups:
        if not group["schedule_free"] or not group["train_mode"]:
            continue  # eval mode: the parameters already hold x
        for param in group["params"]:
            offset = opt.state.get(param, {}).get("z_minus_y")
            if offset is None:
                continue  # never stepped: x = y = z
            dtype = compute_dtype(param.dtype)
            out[id(param)] = y_to_x(param.detach().to(dtype), offset.to(dtype), group["betas"][0]).to(param.dtype)
    return out


def save_averaged(model: torch.nn.Module, optimizer: Any, path: str | os.PathLike) -> None:
    """``torch.save`` the averaged weights ``x`` of ``model`` to ``path``.

    Load them with ``model.load_state_dict(torch.load(path))`` for evaluation
    or export. For sharded (FSDP2) models use :func:`save_sharded`.
    """
    _check_path(path)
    torch.save(averaged_state_dict(model, optimizer), path)


def _dcp():
    import torch.distributed.checkpoint as dcp  # only where a sharded checkpoint is asked for

    return dcp


def save_sharded(model: torch.nn.Module, optimizer: Any, path: str | os.PathLike) -> None:
    """Save model (as ``x``) and optimizer with ``torch.distributed.checkpoint``.

    Every rank calls it. ``DTensor`` parameters and state are saved shard by
    shard. The optimizer's mode is unchanged afterwards.
    """
    _check_model(model)
    _check_path(path)
    opt = unwrap_optimizer(optimizer)
    with opt.averaged():
        _dcp().save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)


def load_sharded(model: torch.nn.Module, optimizer: Any, path: str | os.PathLike) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` and ``optimizer``.

    Every rank calls it, with the model built (and sharded) as when saving and
    a new optimizer over its parameters. Exactly what was saved is loaded: a
    parameter that had optimizer state at the save (whether it is trainable
    now or not) gets it back bit for bit, and one that had none (an unused
    head, a layer frozen then, an expert never routed) has none afterwards and
    gets fresh state on its first step, as in the run that saved. Afterwards
    the model holds ``x`` and the optimizer is in eval mode: call
    ``optimizer.train()`` before training. The optimizer changes only once
    everything has loaded.
    """
    _check_model(model)
    _check_path(path)
    opt = unwrap_optimizer(optimizer)
    target = {"model": model.state_dict(), "optimizer": _load_target(opt, _saved_state_ids(path), path)}
    _dcp().load(target, checkpoint_id=path)
    model.load_state_dict(target["model"])
    opt.load_state_dict(target["optimizer"])


def _saved_state_ids(path: str | os.PathLike) -> set[int]:
    """The optimizer ``state_dict`` ids (parameter ordinals) that the checkpoint holds state for."""
    prefix = "optimizer.state."  # torch.distributed.checkpoint flattens nested keys as "optimizer.state.<id>.<name>"
    keys = _dcp().FileSystemReader(path).read_metadata().state_dict_metadata
    return {int(key[len(prefix):].split(".", 1)[0]) for key in keys if key.startswith(prefix)}


@torch.no_grad()
def _load_target(opt: AdamWMiniSF, saved: set[int], path: str | os.PathLike) -> dict[str, Any]:
    """``opt.state_dict()`` whose state is, for exactly the ``saved`` ids, new tensors laid out as a first
    step lays them out (``torch.distributed.checkpoint`` loads into them in place); ``opt`` is not changed."""
    target = opt.state_dict()
    state, ordinal, params = {}, 0, []
    for group in opt.param_groups:
        for param in group["params"]:
            if ordinal in saved:
                state[ordinal] = param_state.init_state(group, param, opt.seed, ordinal)
            params.append(param)
            ordinal += 1
    unknown = sorted(saved - set(range(ordinal)))
    if unknown:
        raise ValueError(f"the checkpoint {os.fspath(path)!r} holds optimizer state for parameter ids {unknown}, "
                         f"but the optimizer has {ordinal} parameters; build the model as when saving")
    param_state.checkpoint_form(state, params)  # laid out as state_dict() saves it
    target["state"] = state
    return target


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that a crash cannot leave half-written.

    ``obj`` is written to a temporary file ``.<name>.<random>.tmp`` in
    ``path``'s directory, flushed and ``os.fsync``-ed, and then renamed onto
    ``path`` with ``os.replace`` (atomic on POSIX and Windows); on POSIX the
    directory is fsync-ed too, so the rename itself survives a power loss. If
    the process dies at any moment, ``path`` holds either the previous complete
    file or the new complete one (or nothing, if there was none), never a
    truncated one. On an error the temporary file is removed and the error is
    raised; after a hard kill (SIGKILL, power loss) a stale ``.<name>.*.tmp``
    may remain, which is safe to delete. Save model and optimizer in one call
    to keep them consistent (docs/integrations.md, "The safe save pattern").
    """
    _check_path(path)
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with mode 0o666 honours the umask, as torch.save(obj, path) does (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable (Windows cannot open a directory)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
