"""Optimizer memory: state bytes per parameter, and the peak process memory of ``step()``.

Peak memory is read from the kernel's high-water mark of the process's
resident set (``VmHWM``), so each optimizer runs in a fresh subprocess:
the model and its gradients are allocated first, the mark is reset to the
current resident set and read, then the optimizer is built and stepped, and
the growth of the mark is what the optimizer cost (its state plus any
temporaries its ``step()`` allocates).

:func:`transient_peak_bytes` isolates the temporaries: the peak of the bytes
allocated and not yet freed inside one ``step()``, beyond what was allocated
before it. On CUDA the caching allocator counts that peak itself; on CPU
nothing does, so the step runs under the profiler with ``profile_memory``,
which records every allocation and free with its size, and the peak of
their running sum is taken. That sum counts tensors (not pages), and a
steady-state step allocates no state, so it is the step's scratch memory.
"""

from __future__ import annotations

import ctypes
import json
import resource
import subprocess
import sys
from collections.abc import Callable

import torch

from .measure import linear_stack, state_bytes_per_param

MIB = 1 << 20


def _rss_peak_bytes() -> int:
    """The process's resident-set high-water mark.

    ``VmHWM`` where Linux has it: ``ru_maxrss`` survives ``exec``, so a child
    started from a large process would start at its parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_rss_peak() -> None:
    """Set the high-water mark to the current resident set (Linux ≥ 4.0), so setup's peaks do not count.

    Freed heap memory first goes back to the OS (glibc's ``malloc_trim``):
    otherwise the optimizer's allocations would reuse pages that setup's
    temporaries left resident, and its growth would read too low.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def _load_rounding_kernel() -> None:
    """Load and compile the rounding kernel before measuring: that one-off cost (the compiler's code,
    about 100 MiB of process memory) does not grow with the model and is not optimizer state."""
    from ..precision import LOW_PRECISION, stochastic_round

    for dtype in LOW_PRECISION:
        stochastic_round(torch.ones(8), dtype, torch.zeros((), dtype=torch.int32))


def _in_subprocess(call: str, env: dict[str, str] | None = None, missing_ok: bool = False) -> dict | None:
    """The JSON result of ``call``, an expression over this module, run in a fresh interpreter. With
    ``missing_ok``, None when it fails for a package that is not installed."""
    code = f"import json; from refadamw.bench import memory; print(json.dumps(memory.{call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=not missing_ok)
    if out.returncode != 0:
        if "ModuleNotFoundError" in out.stderr:
            return None
        raise RuntimeError(f"the memory probe {call} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_optimizer(name: str, params):
    """The optimizers the memory probe knows, by name."""
    from .. import AdamWMiniSF, RefAdamWMiniSF

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name.startswith("ours_"):  # ours_<state_dtype>
        return AdamWMiniSF(params, state_dtype=name.removeprefix("ours_"))
    if name.startswith("ref_"):
        return RefAdamWMiniSF(params, state_dtype=name.removeprefix("ref_"), total_steps=100)
    raise ValueError(f"unknown optimizer {name!r}")


def probe(name: str, layers: int, width: int, steps: int = 3) -> dict:
    """Run in this process: peak-RSS growth of building and stepping optimizer ``name``."""
    torch.set_num_threads(2)
    model = linear_stack(layers, width)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    n_params = sum(p.numel() for p in model.parameters())
    _load_rounding_kernel()
    _reset_rss_peak()
    before = _rss_peak_bytes()
    opt = make_optimizer(name, model.parameters())
    for _ in range(steps):
        opt.step()
    grown = _rss_peak_bytes() - before
    return {"optimizer": name, "params": n_params, "peak_step_bytes": grown,
            "peak_step_bytes_per_param": grown / n_params, "state_bytes_per_param": state_bytes_per_param(opt)}


def peak_memory(names: list[str], layers: int = 48, width: int = 1024) -> list[dict]:
    """:func:`probe` for each optimizer, each in its own subprocess (default: about 50M parameters)."""
    return [_in_subprocess(f"probe({name!r}, {layers}, {width})") for name in names]


TRAINING_BATCH = 4
"""Rows of the probe's input: activations stay a small share beside ~50M parameters' weights."""
TRAINING = ("backward only", "adamw_fused", "ours", "ours_fused_back_pass", "ref_fused_back_pass", "prodigy_plus",
            "prodigy_plus_fused_back_pass")
"""The configurations :func:`training_peak_memory` knows; "backward only" frees each gradient in a hook with
no optimizer, the baseline the others are measured against (activations, one gradient at a time)."""


def make_training_optimizer(name: str, model: torch.nn.Module):
    """``(optimizer or None, hooks or None)`` for a :data:`TRAINING` configuration."""
    from .. import AdamWMiniSF, RefAdamWMiniSF
    from ..back_pass import fused_backward

    if name == "backward only":
        def free(p):
            p.grad = None
        return None, [p.register_post_accumulate_grad_hook(free) for p in model.parameters()]
    if name.startswith("prodigy_plus"):
        from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree

        opt = ProdigyPlusScheduleFree(model.parameters(), fused_back_pass=name.endswith("fused_back_pass"))
    elif name == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        cls = RefAdamWMiniSF if name.startswith("ref") else AdamWMiniSF
        extra = {"total_steps": 100} if cls is RefAdamWMiniSF else {}
        opt = cls(model.parameters(), fused_back_pass=name.endswith("fused_back_pass"), **extra)
    return opt, fused_backward(model, opt) if name.endswith("fused_back_pass") else None


def training_probe(name: str, layers: int, width: int, steps: int = 3) -> dict:
    """Run in this process: the peak resident memory of a training step (forward, backward, ``step()``)
    beyond the weights, after ``steps - 1`` steps have created the state."""
    torch.set_num_threads(2)
    model = linear_stack(layers, width)
    x = torch.randn(TRAINING_BATCH, width)
    n_params = sum(p.numel() for p in model.parameters())
    _load_rounding_kernel()
    _reset_rss_peak()
    weights = _rss_peak_bytes()
    opt, _ = make_training_optimizer(name, model)
    for step in range(steps):
        if step == steps - 1:
            _reset_rss_peak()
        model(x).square().mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = _rss_peak_bytes() - weights
    return {"config": name, "params": n_params, "peak_bytes": peak, "peak_bytes_per_param": peak / n_params,
            "state_bytes_per_param": 0.0 if opt is None else state_bytes_per_param(opt)}


def training_peak_memory(names: tuple[str, ...] = TRAINING, layers: int = 48, width: int = 1024) -> list[dict]:
    """:func:`training_probe` for each configuration, each in a fresh subprocess, with glibc's mmap threshold
    fixed so freed tensors go back to the system at once (its default adapts upward, and freed gradients
    would then stay resident and read as held). ``optimizer_bytes_per_param``: the peak beyond that of
    "backward only", that is gradients + state + the step's temporaries. A configuration whose package is
    missing is left out."""
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    results = [r for r in (_in_subprocess(f"training_probe({name!r}, {layers}, {width})", env, missing_ok=True)
                           for name in names) if r is not None]
    base = next((r["peak_bytes_per_param"] for r in results if r["config"] == "backward only"), 0.0)
    for r in results:
        r["optimizer_bytes_per_param"] = r["peak_bytes_per_param"] - base
    return results


def transient_peak_bytes(step: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes that one call of ``step()`` holds allocated beyond what existed before it."""
    if device != "cpu":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    nodes, sizes = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while nodes:  # allocations are leaves under the op that made them, or at the top when made outside any op
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))  # a free has a negative size
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak
