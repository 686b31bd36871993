"""Precision: which dtype state is stored in, and which dtype the math runs in.

SPEC.md §3 item 7. All arithmetic runs in fp32 (fp64 for fp64 parameters)
whatever the storage dtype. Storage dtypes are parsed from strings as well as
``torch.dtype`` objects, because kohya sd-scripts passes optimizer arguments
through ``ast.literal_eval``, which cannot produce a ``torch.dtype``.

Writing into bf16/fp16 storage with stochastic rounding belongs to the
low-precision issue; until it lands, only fp32 storage (and ``"auto"``, which
means fp32 for now) is accepted, and low-precision *parameters* are written
back with round-to-nearest by :func:`write_back`.
"""

from __future__ import annotations

import torch

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


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def write_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Store a result computed in ``compute_dtype`` into ``dst``'s storage.

    Same-dtype writes are plain copies. Lower-precision destinations are
    rounded to nearest by ``copy_``; stochastic rounding replaces this when
    the low-precision issue lands.
    """
    dst.copy_(src)
