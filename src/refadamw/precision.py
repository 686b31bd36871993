"""Precision: storage dtypes, the compute dtype, and stochastic rounding.

SPEC.md §3 item 7. All arithmetic runs in fp32 (fp64 for fp64 parameters)
whatever the storage dtype. Storage dtypes are parsed from strings as well as
``torch.dtype`` objects, because kohya sd-scripts passes optimizer arguments
through ``ast.literal_eval``, which cannot produce a ``torch.dtype``.

Every write of an fp32 result into bf16/fp16 storage (optimizer state and
low-precision parameters alike) is *stochastically* rounded: a value between
two representable neighbours ``lo < x < hi`` becomes ``hi`` with probability
``(x − lo)/(hi − lo)``, so ``E[round(x)] = x`` and updates far below one ulp
still accumulate instead of being rounded away (Gupta et al., "Deep Learning
with Limited Numerical Precision", ICML 2015).

The noise is a counter-based hash of (element index, step, tensor, seed, the
buffer being written), not a draw from a stateful generator: it costs a few
integer ops per element, and a run resumed from a checkpoint replays exactly
the same noise with no generator state to save. The per-tensor part of the
key is kept in the optimizer state, the step is the state's own counter.

The element index is the index in the *whole* flattened tensor, also when a
rank holds only a shard of it (FSDP2): a shard starting at global element
``o`` passes ``index_offset=o`` to :func:`rounding_keys`, so every rank draws
the noise of its own elements and the result does not depend on the world
size. The offset enters through the key alone: word ``i`` of key ``k + o·G``
is word ``i + o`` of key ``k`` (see :func:`random_bits`), so the rounding
kernels need no change and an unsharded tensor (offset 0) keeps its noise.
"""

from __future__ import annotations

import enum
import logging
import os

import torch

logger = logging.getLogger("refadamw")

AUTO = "auto"

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}

_STORABLE = (torch.float32, torch.bfloat16, torch.float16)


def parse_state_dtype(value: object) -> torch.dtype | str:
    """Return ``"auto"`` or the ``torch.dtype`` that ``value`` names.

    Accepts ``torch.float32/bfloat16/float16``, ``"auto"``, and the strings
    ``"fp32"``, ``"float32"``, ``"bf16"``, ``"bfloat16"``, ``"fp16"``,
    ``"float16"`` (also with a ``"torch."`` prefix, any case).
    """
    if isinstance(value, torch.dtype):
        if value not in _STORABLE:
            raise ValueError(
                f"state_dtype={value} is not supported; use one of "
                "torch.float32, torch.bfloat16, torch.float16 or 'auto'"
            )
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key == AUTO:
            return AUTO
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
        raise ValueError(
            f"state_dtype={value!r} is not a known dtype name; use 'auto', "
            f"or one of {sorted(_DTYPE_NAMES)}"
        )
    raise TypeError(
        f"state_dtype must be a torch.dtype or a string, got {type(value).__name__}"
    )


def resolve_state_dtype(requested: object, param_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of ``z − y`` (or the momentum) for a parameter of ``param_dtype``.

    ``"auto"`` means bf16, except fp64 for fp64 parameters: on the benchmark
    workloads bf16 state with stochastic rounding matched fp32 state
    (docs/precision.md), at half the memory.
    """
    dtype = parse_state_dtype(requested)
    if dtype == AUTO:
        return torch.float64 if param_dtype == torch.float64 else torch.bfloat16
    return dtype


def second_moment_dtype(storage: torch.dtype, layout=None) -> torch.dtype:
    """The storage dtype of ``v``: fp32 for block ``v`` (one value per block, so it costs nothing and
    needs no rounding pass), else the state dtype, but never fp16, whose range flushes small ``g²`` to 0.
    ``layout``: the parameter's :class:`~refadamw.partition.BlockLayout` (None: per element)."""
    if storage == torch.float64:
        return storage
    if storage == torch.float16 or (layout is not None and not layout.per_element):
        return torch.float32
    return storage


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


LOW_PRECISION = (torch.bfloat16, torch.float16)


class Salt(enum.IntEnum):
    """Which buffer a write goes to, so two buffers of one tensor get independent noise."""

    PARAM = 1
    Z_MINUS_Y = 2
    EXP_AVG = 3
    EXP_AVG_SQ = 4
    MODE_SWITCH = 5


# Multipliers of the 32-bit integer hash below (C. Wellons' "lowbias32"); the
# second does not fit a signed int32 and is written as its two's complement.
_MIX_A = 0x7FEB352D
_MIX_B = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9 - (1 << 32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche hash on int32 tensors.

    int32 multiplication wraps modulo 2³², which is what a 32-bit hash wants;
    right shifts are arithmetic, so each one is masked to act as a logical shift.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX_A
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX_B
    return x ^ ((x >> 16) & 0xFFFF)


def tensor_key(seed: int, ordinal: int) -> int:
    """The per-tensor part of the rounding key (a Python int in int32 range).

    The same hash as :func:`_mix32`, on Python ints: it runs when a state is
    created, and must not touch a device tensor's value.
    """
    x = (seed * 0x27D4EB2F + ordinal) & 0xFFFFFFFF
    for shift, multiplier in ((16, _MIX_A), (15, _MIX_B)):
        x ^= x >> shift
        x = (x * multiplier) & 0xFFFFFFFF
    x ^= x >> 16
    return x - (1 << 32) if x >= 1 << 31 else x


def _wrap32(x: int) -> int:
    """A Python int reduced to the int32 it wraps to."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def rounding_keys(tensor_keys: torch.Tensor, step: torch.Tensor, salt: Salt, index_offset: int = 0) -> torch.Tensor:
    """Keys for one write: a hash of each tensor's key, its step and the buffer.

    ``tensor_keys`` (int32) and ``step`` (any float or int dtype) broadcast
    together; the result is int32 on their device. ``index_offset`` is the
    global index of the first element written (a shard's start in the whole
    flattened tensor; 0 for a whole tensor). No host sync.
    """
    counter = step.to(torch.int32) * _GOLDEN + int(salt) * _MIX_A
    return shift_key(_mix32(tensor_keys.to(torch.int32) ^ _mix32(counter)), index_offset)


def shift_key(key: torch.Tensor, index_offset: int) -> torch.Tensor:
    """The key under which element ``i`` draws the word that element ``i + index_offset`` draws under ``key``."""
    # (i + o)·G + k = i·G + (k + o·G) modulo 2³²
    return key + _wrap32(index_offset * _GOLDEN) if index_offset else key


def random_bits(numel: int, key: torch.Tensor) -> torch.Tensor:
    """``numel`` uniformly distributed int32 words for rounding key ``key``: word ``i`` is
    ``mix(i·G + key)``, the word the rounding kernels draw for element ``i``."""
    index = torch.arange(numel, dtype=torch.int32, device=key.device)
    return _mix32(index * _GOLDEN + key)


_BF16_DROPPED = 16  # fp32 has 23 fraction bits, bf16 7
_FP16_DROPPED = 13  # fp16 has 10
_FP16_MIN_NORMAL = 2.0**-14
_FP16_SUBNORMAL_ULP = 2.0**-24


# The two kernels take contiguous 1-D or 2-D tensors (stochastic_round passes flat ones, so one
# compiled graph per dtype serves every shape); element i of the flattened tensor gets word i.
def _element_index(src: torch.Tensor) -> torch.Tensor:
    """Each element's index in the flattened (contiguous) tensor, shaped like ``src`` (1-D or 2-D).

    For a 2-D tensor it is built as ``row·cols + col``, not as a reshaped
    ``arange``: the same numbers, but a compiled kernel then walks it in the
    same 2-D loop as the rest of a fused update instead of a second, flat one.
    """
    if src.dim() == 2:
        rows, cols = src.shape
        rows_index = torch.arange(rows, dtype=torch.int32, device=src.device).unsqueeze(1)
        return rows_index * cols + torch.arange(cols, dtype=torch.int32, device=src.device)
    return torch.arange(src.numel(), dtype=torch.int32, device=src.device).view(src.shape)


def _bits(src: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return _mix32(_element_index(src) * _GOLDEN + key)


def _round_bf16(src: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    bits = _bits(src, key)
    mask = (1 << _BF16_DROPPED) - 1
    return ((src.view(torch.int32) + (bits & mask)) & ~mask).view(torch.float32).to(torch.bfloat16)


def _round_fp16(src: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    bits = _bits(src, key)
    mask = (1 << _FP16_DROPPED) - 1
    normal = ((src.view(torch.int32) + (bits & mask)) & ~mask).view(torch.float32)
    uniform = (bits >> _FP16_DROPPED & 0x3FFF).float() * 2.0**-14
    subnormal = torch.floor(src.abs() / _FP16_SUBNORMAL_ULP + uniform) * _FP16_SUBNORMAL_ULP
    return torch.where(src.abs() < _FP16_MIN_NORMAL, subnormal.copysign(src), normal).to(torch.float16)


_EAGER = {torch.bfloat16: _round_bf16, torch.float16: _round_fp16}


def round_bits(src: torch.Tensor, dtype: torch.dtype, key: torch.Tensor) -> torch.Tensor:
    """The rounding arithmetic of :func:`stochastic_round` on a contiguous fp32 ``src``, uncompiled.

    For use inside another compiled kernel (the fused update), which inlines it.
    """
    return _EAGER[dtype](src, key)

COMPILE_MIN_NUMEL = 2
"""Tensors this large are rounded by a ``torch.compile``-generated single-pass kernel.

In eager mode the hash and the rounding are about 20 separate tensor passes,
which made a bf16-state step over 10× slower than an fp32 one on CPU; the
compiled kernel does all of it in one loop, and its call overhead is below
the eager kernel's even for a 256-element tensor. (Sizes 0 and 1 stay eager:
dynamic-shape graphs specialise on them.) The graph runs single-threaded:
inductor's OpenMP pool and ATen's compete for the same cores otherwise, which
measured slower overall. Set ``REFADAMW_COMPILE=0`` to stay eager; if
compiling fails (no C++ compiler, say) it warns once and stays eager. Both
give bit-identical results.
"""

_compiled: dict[torch.dtype, object] = {}
_compile_failed = False


def _rounder(dtype: torch.dtype, numel: int):
    global _compile_failed
    if numel < COMPILE_MIN_NUMEL or _compile_failed or os.environ.get("REFADAMW_COMPILE", "1") == "0":
        return _EAGER[dtype]
    if dtype not in _compiled:
        _compiled[dtype] = torch.compile(_EAGER[dtype], dynamic=True, options={"cpp.threads": 1})
    return _compiled[dtype]


def stochastic_round(src: torch.Tensor, dtype: torch.dtype, key: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``src`` to ``dtype`` (bf16 or fp16) stochastically and without bias.

    bf16 keeps the top 16 bits of an fp32 word: adding 16 random bits to the
    word and truncating rounds the magnitude up with probability equal to the
    dropped fraction. fp16 drops 13 bits the same way where it is normal; in its
    subnormal range (|x| < 2⁻¹⁴) the spacing is a fixed 2⁻²⁴, so there it
    computes ``floor(|x|/2⁻²⁴ + u)`` with a uniform ``u`` of 14 bits instead.
    """
    global _compile_failed
    if dtype not in _EAGER:
        raise ValueError(f"stochastic rounding targets bf16 or fp16, not {dtype}")
    if src.dtype != torch.float32:
        src = src.float()
    # detach(): a view of another tensor would make the compiled graph guard on that base's shape
    flat = src.contiguous().view(-1).detach()
    rounder = _rounder(dtype, flat.numel())
    try:
        with torch.no_grad():  # one grad mode, so the compiled graph is never rebuilt for the other
            return rounder(flat, key).view(src.shape)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager kernel
        if rounder is _EAGER[dtype]:
            raise
        _compile_failed = True
        logger.warning("refadamw: torch.compile of the stochastic-rounding kernel failed (%s: %s); "
                       "using the slower eager kernel", type(err).__name__, err)
        return _EAGER[dtype](flat, key).view(src.shape)


def write_back(dst: torch.Tensor, src: torch.Tensor, key: torch.Tensor | None) -> None:
    """Store a result computed in ``compute_dtype`` into ``dst``'s storage.

    Writes into bf16/fp16 from a wider dtype are stochastically rounded with
    rounding key ``key``; all other writes are plain copies.
    """
    if dst.dtype in LOW_PRECISION and src.dtype != dst.dtype:
        if key is None:
            raise ValueError("a write into bf16/fp16 storage needs a rounding key")
        dst.copy_(stochastic_round(src, dst.dtype, key))
    else:
        dst.copy_(src)
