"""The CPU fast path: one hand-written multi-tensor kernel per param group (``native.c``).

SPEC.md §6. A ``torch.compile``d pass per tensor (kernels/fused.py) pays
dynamo's guards and a launch per tensor: LoRA's hundreds of small tensors
spent most of ``step()`` there. Here one C call covers every tensor of a
group, as ``torch._fused_adamw_`` does for AdamW:

1. :meth:`Plan.row_sums` reads each gradient once for its block sums of
   squares and its squared norm (the hygiene gate, auto-lr and the Ref
   controller need every norm before any tensor is written);
2. :meth:`Plan.update` then reads ``g``, ``y`` and ``δ = z − y`` once more
   and writes ``y``, ``δ`` and ``v`` once, a block at a time: ``v``, the
   denominator and the elementwise Schedule-Free step of
   :mod:`refadamw.kernels.common` (the algorithm: :mod:`refadamw.kernels`;
   ``native.c`` lists the operations in its order);
3. :meth:`Plan.step` does both in one parallel region, gate included, when
   the coefficients do not depend on the norms.

Each call is one OpenMP region on torch's own thread pool (the library
links the libgomp torch loaded), over work items of about
:data:`ITEM_NUMEL` elements, whatever the tensor count, and runs on one
thread below :data:`PARALLEL_NUMEL` elements. The per-tensor coefficients
come in as columns computed by tensor ops, and the rounding keys are derived
in C from the step and key vectors, so nothing syncs and nothing here loops
in Python per element. The static part of a group (pointers of the state
buffers, shapes, work items, scratch) is built once, in a :class:`Plan`.

The source is compiled on first use with the system C compiler (``$CC``,
else ``cc``; about a second) into ``$REFADAMW_CACHE_DIR`` (default
``~/.cache/refadamw``), keyed by a hash of the source, flags, compiler and
CPU. Without a compiler, or with ``REFADAMW_COMPILE=0``, the multi-tensor
path runs instead (one warning when compiling fails).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .. import lr_free

logger = logging.getLogger("refadamw")

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
"""``-ffp-contract=off``: no fused multiply-adds, so each operation rounds like the eager path's."""
OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
"""Tried in turn: a compiler without OpenMP (Apple's clang) still builds a one-thread kernel, which beats
the multi-tensor path, and one that does not know ``-march=native`` builds for the generic target."""

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
COEFFICIENTS = ("weight_decay", "y_offset", "y_step", "offset_decay", "offset_step", "v_weight", "sqrt_bias2", "eps")
"""The columns of the coefficient matrix, in ``native.c``'s order."""
ITEM_NUMEL = 1 << 15
"""Work items hold about this many elements: small enough to balance two to many threads, large enough
that a LoRA factor is one item."""
PARALLEL_NUMEL = 1 << 18
"""Groups with fewer elements run on the calling thread: opening a parallel region costs more than it saves."""

_library = None
_failed = False
_storable_dtypes: frozenset = frozenset()
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class _Group(ctypes.Structure):
    """``group_t`` of native.c: one group's tensors, as pointers into tensors the :class:`Plan` holds."""

    _fields_ = ([(name, _P) for name in ("y", "g", "offset", "v", "y_dt", "g_dt", "offset_dt", "v_dt", "rows",
                                         "cols", "sq_at", "per_element", "fresh", "coef_cols", "coef_strides",
                                         "steps", "tensor_keys", "sq", "item_sum", "tensor_sum")]
                + [("n", _I64), ("n_items", _I64)] + [(name, _P) for name in ("item_t", "r0", "r1")]
                + [(name, _P) for name in ("lf_anchor", "lf_sum", "lf_a", "lf_gate")]
                + [("lf_beta3", ctypes.c_float), ("lf_stride", _I64)]
                + [(name, _P) for name in ("lf_item_dot", "lf_item_l1", "lf_dot", "lf_l1")])


def _cache_dir() -> Path:
    return Path(os.environ.get("REFADAMW_CACHE_DIR") or Path.home() / ".cache" / "refadamw")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    """The kernel's shared library, built on the first call on this machine and then found in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *map(" ".join, OPTIONAL_FLAGS), version,
                                       platform.machine(), _cpu_flags(), torch.__version__]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"refadamw_native_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for extra in OPTIONAL_FLAGS:
            result = subprocess.run([compiler, *FLAGS, *extra, "-o", str(built), str(SOURCE)], capture_output=True,
                                    text=True)
            if result.returncode == 0:
                break
        result.check_returncode()
        os.replace(built, target)  # atomic: a concurrent build leaves one complete file
    return target


def _load():
    global _library, _failed
    compiler = shutil.which(os.environ.get("CC") or "cc")
    try:
        if compiler is None:
            raise FileNotFoundError("no C compiler (set $CC)")
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        _failed = True
        detail = getattr(err, "stderr", "") or err
        logger.warning("refadamw: building the CPU multi-tensor kernel failed (%s); using the multi-tensor path",
                       str(detail).strip()[:500])
        return None
    for entry in (library.refadamw_row_sums, library.refadamw_update, library.refadamw_step):
        entry.argtypes = [ctypes.POINTER(_Group), ctypes.c_int, _I64]
        entry.restype = None
    library.refadamw_stochastic_round.argtypes = [_P, _I64, ctypes.c_int, ctypes.c_int32, _P]
    library.refadamw_stochastic_round.restype = None
    global _storable_dtypes
    _storable_dtypes = frozenset(DTYPE_CODES) if library.refadamw_has_f16() else frozenset(DTYPE_CODES) - {
        torch.float16}
    _library = library
    return library


def available() -> bool:
    """Whether the kernel can run: compiling is allowed and has not failed (it is built on the first call)."""
    return not _failed and os.environ.get("REFADAMW_COMPILE", "1") != "0"


def library():
    return _library if _library is not None else _load()


def _storable(t: torch.Tensor) -> bool:
    return t.dtype in _storable_dtypes and t.device.type == "cpu" and t.is_contiguous()


def eligible(param: torch.Tensor, grad: torch.Tensor, offset: torch.Tensor, v: torch.Tensor, layout) -> bool:
    """Whether one tensor can take the kernel: dense, contiguous CPU storage in fp32/bf16/fp16, and blocks
    that are contiguous runs (per-element ``v`` or leading block axes). Needs the library loaded. Checked
    when a :class:`Plan` is built; each call checks again what can change between steps (the gradient's
    dtype and layout, the parameter's layout)."""
    return (type(param) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor  # not DTensor
            and not grad.is_sparse and all(_storable(t) for t in (param, grad, offset, v)) and layout.contiguous)


def stochastic_round(src: torch.Tensor, dtype: torch.dtype, key: int) -> torch.Tensor:
    """The kernel's stochastic rounding of fp32 ``src`` into ``dtype`` (flattened), for tests."""
    src = src.detach().float().contiguous().view(-1)
    out = torch.empty(src.numel(), dtype=dtype)
    library().refadamw_stochastic_round(src.data_ptr(), src.numel(), DTYPE_CODES[dtype], key, out.data_ptr())
    return out


def _ptrs(tensors) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _codes(tensors) -> torch.Tensor:
    return torch.tensor([DTYPE_CODES[t.dtype] for t in tensors], dtype=torch.int32)


class LrFreeTerms(NamedTuple):
    """What the kernel needs to add a lr-free group's terms (:mod:`refadamw.lr_free`): the step's weight
    ``a`` (0-d), whether ``s`` is updated (0-d bool; :meth:`Plan.step` uses its own hygiene gate) and β3."""

    weight: torch.Tensor
    gate: torch.Tensor
    beta3: float


class Plan:
    """The static part of one group's call: state pointers, block shapes, work items and scratch.

    Valid while the group's tensors with gradients and their state buffers stay the same objects;
    the optimizer rebuilds it otherwise.
    """

    def __init__(self, params, offsets, vs, layouts, lr_free_states=None):
        self.lib = library()
        n = len(params)
        rows = [p.numel() if lay.per_element else lay.n_blocks for p, lay in zip(params, layouts)]
        cols = [1 if lay.per_element else p.numel() // max(r, 1) for p, lay, r in zip(params, layouts, rows)]
        self.per_element = torch.tensor([lay.per_element for lay in layouts], dtype=torch.int8)
        self.rows, self.cols = torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)
        sq_at, total = [], 0
        for r, lay in zip(rows, layouts):
            sq_at.append(total)
            total += 0 if lay.per_element else r
        self.sq_at = torch.tensor(sq_at, dtype=torch.int64)
        self.sq = torch.empty(total, dtype=torch.float32)
        items = []
        for t, (r, c) in enumerate(zip(rows, cols)):
            per_item = max(1, ITEM_NUMEL // max(c, 1))
            items += [(t, r0, min(r, r0 + per_item)) for r0 in range(0, r, per_item)]
        self.items = torch.tensor(items or [(0, 0, 0)], dtype=torch.int64)[: len(items)].T.contiguous()
        self.n, self.n_items = n, len(items)
        self.item_sum = torch.empty(self.n_items, dtype=torch.float64)
        self.tensor_sum = torch.empty(n, dtype=torch.float64)
        self.offset_ptrs, self.v_ptrs = _ptrs(offsets), _ptrs(vs)
        self.offset_codes, self.v_codes = _codes(offsets), _codes(vs)
        self.y_codes = _codes(params)
        self.not_fresh = torch.zeros(n, dtype=torch.int8)
        self._keep = (offsets, vs)  # the buffers whose pointers are held
        self._summed = None  # the gradients whose block sums `sq` holds
        item_t, r0, r1 = self.items
        self.group = _Group(
            offset=self.offset_ptrs.data_ptr(), v=self.v_ptrs.data_ptr(), y_dt=self.y_codes.data_ptr(),
            offset_dt=self.offset_codes.data_ptr(), v_dt=self.v_codes.data_ptr(), rows=self.rows.data_ptr(),
            cols=self.cols.data_ptr(), sq_at=self.sq_at.data_ptr(), per_element=self.per_element.data_ptr(),
            sq=self.sq.data_ptr(), item_sum=self.item_sum.data_ptr(), tensor_sum=self.tensor_sum.data_ptr(),
            n=n, n_items=self.n_items, item_t=item_t.data_ptr(), r0=r0.data_ptr(), r1=r1.data_ptr())
        if lr_free_states is not None:  # the lr-free sample buffers of refadamw.lr_free, one pair per tensor
            self.lr_free_ptrs = [_ptrs([s[key] for s in lr_free_states]) for key in lr_free.STATE_KEYS]
            self.lr_free_sums = torch.empty(2 * self.n_items + 2 * n, dtype=torch.float64)
            self._keep += tuple([s[key] for s in lr_free_states] for key in lr_free.STATE_KEYS)
            parts = self.lr_free_sums.split([self.n_items, self.n_items, n, n])
            self.group.lf_anchor, self.group.lf_sum = (t.data_ptr() for t in self.lr_free_ptrs)
            (self.group.lf_item_dot, self.group.lf_item_l1, self.group.lf_dot,
             self.group.lf_l1) = (t.data_ptr() for t in parts)
        else:
            self.lr_free_sums = None

    def row_sums(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Each gradient's sum of squares (fp64, ``(n,)``), or None when a gradient does not fit the
        kernel this step (another dtype, not contiguous). The block sums stay in the plan for :meth:`update`."""
        if not self._set_grads(grads):
            return None
        self._call(self.lib.refadamw_row_sums)
        self._summed = list(grads)
        return self.tensor_sum

    def update(self, params, grads, fresh: list[bool], columns: list[torch.Tensor], steps: torch.Tensor,
               tensor_keys: torch.Tensor, lr_free_terms: LrFreeTerms | None = None) -> bool:
        """The step, in place; False (nothing written) when a gradient or parameter does not fit the
        kernel this step. ``columns``: the per-tensor coefficients in :data:`COEFFICIENTS` order, each
        a vector of one value per tensor or a 0-d tensor for all; ``steps`` (int64) and ``tensor_keys``
        (int32): each tensor's step after this update and its rounding key, from which the kernel
        derives the rounding keys of its writes. Reads the block sums of the last :meth:`row_sums` on
        these gradients (computed here otherwise)."""
        summed, self._summed = self._summed, None
        if summed is None or len(summed) != len(grads) or not all(map(operator.is_, summed, grads)):
            if self.row_sums(grads) is None:
                return False
        if not self._set_update(params, fresh, columns, steps, tensor_keys, lr_free_terms):
            return False
        self._call(self.lib.refadamw_update)
        return True

    def step(self, params, grads, columns: list[torch.Tensor], steps: torch.Tensor,
             tensor_keys: torch.Tensor, lr_free_terms: LrFreeTerms | None = None) -> torch.Tensor | None:
        """:meth:`row_sums` and :meth:`update` in one parallel region, for coefficients that do not depend
        on the norms (no auto-lr, no controller, no fresh state): the update is written only if every
        tensor's sum of squares is finite. Returns the sums (None, nothing done, when a tensor does not
        fit the kernel this step); the caller derives the hygiene gate from them as the kernel did."""
        self._summed = None
        if not self._set_grads(grads) or not self._set_update(params, None, columns, steps, tensor_keys,
                                                                lr_free_terms):
            return None
        self._call(self.lib.refadamw_step)
        return self.tensor_sum

    def _set_grads(self, grads) -> bool:
        codes = [DTYPE_CODES[g.dtype] if g.dtype in _storable_dtypes and g.is_contiguous() else -1 for g in grads]
        if -1 in codes:
            return False
        self._per_call = [_ptrs(grads), torch.tensor(codes, dtype=torch.int32)]
        self.group.g, self.group.g_dt = (t.data_ptr() for t in self._per_call)
        return True

    def lr_free_results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tensor's ``⟨g_S, x0_S − z_S⟩`` and ``‖s‖₁`` (fp32) of the last call given lr-free terms."""
        sums = self.lr_free_sums[2 * self.n_items:].to(torch.float32)
        return sums[: self.n], sums[self.n:]

    def _set_update(self, params, fresh, columns, steps, tensor_keys, lr_free_terms) -> bool:
        if not all(p.is_contiguous() for p in params):  # p.data replaced by a strided tensor
            return False
        if lr_free_terms is not None and self.lr_free_sums is None:
            raise ValueError("lr-free terms for a plan built without the lr-free buffers")
        g = self.group
        if lr_free_terms is None:
            g.lf_stride = 0
        else:
            weight = lr_free_terms.weight.to(torch.float32).contiguous()
            gate = lr_free_terms.gate.to(torch.bool).contiguous()
            self._per_call += [weight, gate]
            g.lf_a, g.lf_gate, g.lf_beta3, g.lf_stride = weight.data_ptr(), gate.data_ptr(), lr_free_terms.beta3, \
                lr_free.STRIDE
        columns = [c.to(torch.float32).contiguous() for c in columns]
        held = [_ptrs(params), torch.tensor(fresh, dtype=torch.int8) if fresh and any(fresh) else self.not_fresh,
                _ptrs(columns), torch.tensor([1 if c.dim() else 0 for c in columns], dtype=torch.int64),
                steps.contiguous(), tensor_keys.to(torch.int32).contiguous(), columns]
        self._per_call += held
        g.y, g.fresh, g.coef_cols, g.coef_strides, g.steps, g.tensor_keys = (t.data_ptr() for t in held[:6])
        return True

    def _call(self, entry) -> None:
        entry(ctypes.byref(self.group), torch.get_num_threads(), PARALLEL_NUMEL)
