"""Fused update: the Schedule-Free step of one tensor as a single compiled pass.

SPEC.md §6. Fused AdamW runs at about the memory bandwidth, moving 28 bytes
per parameter. The multi-tensor path moves far more: every ``_foreach_*`` op is
its own pass over the tensors, and a bf16 ``z`` adds the rounding passes. Here
the elementwise part of the update (its last three lines in the stored
coordinates, :mod:`refadamw.kernels`) is one ``torch.compile``-generated loop
of :func:`refadamw.kernels.common.schedule_free_step` that reads ``y``, ``g``
and ``δ = z − y`` once and writes ``y`` and ``δ`` once (16 bytes per parameter
with a bf16 ``δ``), ``g`` with NaN/inf read as 0 and the writes into bf16/fp16
stochastically rounded, with the per-tensor coefficients of
:func:`refadamw.averaging.offset_coefficients` (Ref repair and averaging folded
together).

Everything of size "one value per block" stays outside: the block mean
squares (a row-wise norm, one more read of ``g``), the ``v`` EMA and the
denominator are small tensors. The arithmetic is the multi-tensor path's
(:mod:`refadamw.kernels.foreach`), in the same order; tests hold the two
equal. Each tensor is viewed as ``(n_blocks, block_numel)`` (per-element
``v`` is ``block_numel = 1``), so a handful of dynamic-shape graphs serve
every shape; a layout whose blocks are not contiguous (dim-1 blocks of a
Conv1D weight) passes its blocked view and a broadcastable ``denom`` instead
(:meth:`refadamw.partition.BlockLayout.grid`).

A step with a non-finite gradient runs with η = c = ρ = 0 and leaves ``y`` and
``δ`` exactly as they were, since the gradient is read as 0 where it is not finite.

If compiling fails (no C++ compiler, say) the optimizer warns once and the
multi-tensor path takes over; ``REFADAMW_COMPILE=0`` skips compiling.
"""

from __future__ import annotations

import logging
import os

import torch

from ..precision import LOW_PRECISION, round_bits
from .common import schedule_free_step

logger = logging.getLogger("refadamw")

_FLOAT_MAX = torch.finfo(torch.float32).max

COEFFICIENTS = ("weight_decay", "y_offset", "y_step", "offset_decay", "offset_step")
"""The per-tensor scalars of one fused pass, in the order of its ``coef`` vector."""


def _store(dst: torch.Tensor, value: torch.Tensor, key: torch.Tensor | None) -> None:
    dst.copy_(round_bits(value, dst.dtype, key) if dst.dtype in LOW_PRECISION else value)


def sf_pass(y, g, offset, denom, coef, key_y, key_offset) -> None:
    """One tensor's elementwise Schedule-Free update, in place (:func:`~refadamw.kernels.common.schedule_free_step`).

    ``y``, ``g``, ``offset``: ``(n_blocks, block_numel)`` views of the
    parameter, its gradient and ``δ = z − y`` (or blocked views); ``denom``:
    fp32, ``(n_blocks, 1)`` (or shaped to broadcast against them); ``coef``:
    fp32 vector ordered as :data:`COEFFICIENTS`;
    ``key_y``/``key_offset``: rounding keys for bf16/fp16 storage (ignored otherwise).
    """
    g = g.float()
    d = torch.where(g.abs() <= _FLOAT_MAX, g, 0.0)
    yf, of = y.float(), offset.float()  # y and offset themselves when fp32: updated in place
    schedule_free_step([yf], [d], [of], [denom], coef[0], *([coef[i]] for i in range(1, 5)))
    _store(y, yf, key_y)
    _store(offset, of, key_offset)


_compiled = None
_compile_failed = False
RECOMPILE_LIMIT = 64


def available() -> bool:
    """Whether the fused pass can be used: compiling is allowed and has not failed."""
    return not _compile_failed and os.environ.get("REFADAMW_COMPILE", "1") != "0"


def fused_pass(y, g, offset, denom, coef, key_y, key_offset) -> bool:
    """Run :func:`sf_pass` compiled; False (after one warning) when compiling fails."""
    global _compiled, _compile_failed
    if torch.compiler.is_compiling():  # inside the caller's torch.compile: let it trace the plain function
        sf_pass(y, g, offset, denom, coef, key_y, key_offset)
        return True
    if not available():
        return False
    if _compiled is None:
        # Without the raised threshold inductor stores g/denom (read by both the y and the z update) to
        # a temporary and splits the update into two loops; recomputing it per use is cheaper.
        _compiled = torch.compile(sf_pass, dynamic=True, options={"realize_reads_threshold": 64})
    try:
        # One graph per storage-dtype pair and shape class (square, not, one column): more than
        # dynamo's default of 8 for one function when bf16/fp16 parameters and state mix.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            _compiled(y, g, offset, denom, coef, key_y, key_offset)
        return True
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager path
        _compile_failed = True
        logger.warning("refadamw: torch.compile of the fused update failed (%s: %s); "
                       "using the multi-tensor path", type(err).__name__, err)
        return False


def eligible(param: torch.Tensor, grad: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether a tensor can take the fused pass: fp32 math on dense, contiguous storage."""
    plain = type(param) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor  # not DTensor
    return (plain and param.dtype != torch.float64 and param.is_contiguous() and grad.is_contiguous()
            and offset.is_contiguous() and not grad.is_sparse and param.numel() > 1)
