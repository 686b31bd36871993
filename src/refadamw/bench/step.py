"""``refadamw bench --suite step``: the speed of ``optimizer.step()`` at four real model shapes.

The main suite times ``step()`` on one stack of square layers. Real models
differ in what makes a step slow: a few big tensors are bound by memory
bandwidth, a transformer mixes big matrices with many small vectors, and
LoRA and tiny models are hundreds of small tensors where per-tensor
overhead dominates. So the models here (:mod:`refadamw.bench.shapes`) are
real ``nn.Module``s, their parameters in the module's order, with fixed
random gradients (``randn_like · 1e-2``), and only ``step()`` is timed:

* ``large``: 10 × ``Linear(1024, 1024, bias=False)``: 10 tensors, 10.5M parameters;
* ``transformer``: a GPT (nanoGPT's layout: fused ``qkv``, pre-LayerNorm
  blocks, tied head), 12 layers, d 384, vocab 8192: 148 tensors, 24.6M;
* ``lora``: 320 LoRA pairs of rank 16 at width 640, ``A`` (16, 640) and
  ``B`` (640, 16): 640 tensors, 6.6M;
* ``tiny``: 20 × ``Linear(64, 64)``: 40 tensors, 83k.

Every optimizer (:func:`contenders`) is built on its own copy of the model,
warmed up, then all are timed in interleaved rounds in one process, so drift
of a shared machine hits all alike (:func:`~refadamw.bench.measure.interleaved_medians`),
with 2 threads on CPU. Ours is :class:`~refadamw.AdamWMiniSF` at its defaults
(what a user gets), once more with ``REFADAMW_COMPILE=0`` set around each of
its calls. Reported per model, against fused AdamW:

* the median step time and its ratio to ``torch.optim.AdamW(fused=True)``;
* the transient memory of one steady-state step
  (:func:`~refadamw.bench.memory.transient_peak_bytes`);
* the nominal bytes a step must move per parameter (:func:`nominal_bytes_per_param`)
  and the share of the measured copy bandwidth the step reaches;
* the first step's extra time (compiling) in a fresh process with empty
  compiler caches, and again with the caches it left (:func:`compile_times`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..optimizer import AdamWMiniSF, RefAdamWMiniSF
from . import shapes
from .measure import copy_bandwidth_gbs, interleaved_medians
from .memory import transient_peak_bytes
from .optimizers import MissingPeer, build, training
from .shapes import GPT, build_model

ROUNDS = {("cpu", True): (3, 1), ("cpu", False): (9, 3), ("cuda", True): (5, 5), ("cuda", False): (15, 10)}
"""(device, quick) → (interleaved rounds, steps per round); a CUDA step takes milliseconds."""
WARMUP_STEPS = 3
COMPILE_TIMEOUT_S = 900
COMPILE_BUDGET_S = {"cpu": None, "cuda": 150}
"""Seconds all compile probes together may take (None: no bound): keeps ``--device cuda`` under 5 minutes."""

OURS, BASELINE = "refadamw", "AdamW fused"


# ----------------------------------------------------------------------------- optimizers

@dataclass(frozen=True)
class Contender:
    """An optimizer as the suite runs it: ``make(model)`` builds it; ``env`` is set around each ``step()``;
    ``second_moment`` names its state entries for ``v`` (see :func:`nominal_bytes_per_param`);
    ``per_parameter``: a fused backward pass, timed as ``step_parameter`` for every parameter in
    backward's order (the last first), called inside a backward that does nothing else, then ``step()``."""

    label: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    env: dict[str, str] = field(default_factory=dict)
    second_moment: tuple[str, ...] = ("exp_avg_sq",)
    per_parameter: bool = False


def _peer(name: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model):
        info = {"dim": model.tok_embed.embedding_dim, "n_heads": model.heads} if isinstance(model, GPT) else None
        opt = training(build(name, None, 1000, info=info)[0](model))
        if name == "adam_mini":
            opt.wqk_names.add("attn.qkv")  # Adam-mini's own advice for a fused projection: per-head blocks
        return opt

    return make


def contenders() -> list[Contender]:
    ours = lambda model: AdamWMiniSF(model.parameters())  # the defaults: whatever path a user gets
    with_ref = lambda model: RefAdamWMiniSF(model.parameters(), total_steps=10_000)
    return [Contender(OURS, ours),
            Contender(f"{OURS} + Ref", with_ref),
            Contender(f"{OURS} (no compiler)", ours, env={"REFADAMW_COMPILE": "0"}),
            Contender(BASELINE, lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)),
            Contender("AdamW foreach", lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)),
            Contender("schedulefree", _peer("schedulefree")),
            Contender("adam_mini", _peer("adam_mini"), second_moment=("v", "vmean")),
            Contender(f"{OURS} (fused back pass)", lambda model: AdamWMiniSF(model.parameters(), fused_back_pass=True),
                      per_parameter=True)]


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """Set ``env`` in ``os.environ`` for the duration, then restore what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stepper(opt: torch.optim.Optimizer, env: dict[str, str], per_parameter: bool = False) -> Callable[[], None]:
    if per_parameter:
        order = [(p, g, i) for g in reversed(opt.param_groups) for i, p in reversed(list(enumerate(g["params"])))]
        anchor = torch.zeros((), requires_grad=True)

        class InBackward(torch.autograd.Function):
            """A backward whose only work is the hooks' calls, so they run inside backward, as hooks do."""

            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                for p, group, i in order:
                    opt.step_parameter(p, group, i)
                return grad

        def step_in_backward():
            InBackward.apply(anchor).backward()
            opt.step()

        return step_in_backward
    if not env:
        return opt.step

    def step():
        with environment(env):
            opt.step()

    return step


def nominal_bytes_per_param(opt: torch.optim.Optimizer, second_moment: tuple[str, ...]) -> float:
    """The bytes per parameter a step must read and write at least, from the actual dtypes.

    Per tensor: the parameter read and written and the gradient read once;
    every state tensor of the parameter's size read and written (AdamW's
    ``m`` and ``v``, our ``z − y``); and where ``v`` is one value per block
    (ours, Adam-mini), one more read of the gradient for the block mean
    square, which must be complete before the elementwise pass can divide by
    it, plus ``v`` itself. Fused AdamW in fp32: 28; ours with a bf16
    ``z − y`` and row ``v``: 20. A lower bound: any real step moves more.
    """
    moved = numel = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            state, n = opt.state[p], p.numel()
            nbytes = 2 * p.element_size() + p.grad.element_size()
            nbytes += sum(2 * t.element_size() for t in state.values()
                          if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == n)
            v = next((state[k] for k in second_moment if k in state), None)
            if v is not None and v.numel() < n:
                nbytes += p.grad.element_size() + 2 * v.element_size() * v.numel() / n
            moved += nbytes * n
            numel += n
    return moved / numel


# ----------------------------------------------------------------------------- measurements

def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device != "cpu" else (lambda: None)


def measure_model(name: str, spec: dict, device: str, rounds: int, steps_per_round: int, bandwidth_gbs: float,
                  log: Callable[[str], None] = print) -> dict:
    """Time, profile and size every contender on one model; a contender that fails is reported as skipped."""
    model = build_model(spec, device)
    row = {"model": name, "spec": spec, "tensors": len(list(model.parameters())),
           "params": sum(p.numel() for p in model.parameters()), "optimizers": {}, "skipped": {}}
    del model
    log(f"step: {name}: {row['tensors']} tensors, {row['params']:,} parameters")
    setups = {}
    for c in contenders():
        try:
            opt = c.make(build_model(spec, device))
            step = stepper(opt, c.env, c.per_parameter)
            for _ in range(WARMUP_STEPS):  # lazy state, and ours compiles here
                step()
        except MissingPeer as err:
            row["skipped"][c.label] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - a peer that cannot take this model is a result, not a crash
            row["skipped"][c.label] = f"{type(err).__name__}: {err}"
            log(f"  skipped {c.label}: {row['skipped'][c.label]}")
            continue
        setups[c.label] = c, opt, step
    medians = interleaved_medians({label: step for label, (_, _, step) in setups.items()}, rounds,
                                  steps_per_round, _sync(device))
    base = medians.get(BASELINE, float("nan"))
    for label, (c, opt, step) in setups.items():
        moved = nominal_bytes_per_param(opt, c.second_moment)
        bound_s = moved * row["params"] / (bandwidth_gbs * 1e9)
        transient = transient_peak_bytes(step, device)
        row["optimizers"][label] = {
            "median_s": medians[label], "ratio_vs_adamw_fused": medians[label] / base,
            "transient_bytes": transient, "transient_bytes_per_param": transient / row["params"],
            "nominal_bytes_per_param": moved, "bandwidth_bound_s": bound_s,
            "copy_bandwidth_pct": 100 * bound_s / medians[label]}
        log(f"  {label:24s} {medians[label] * 1e3:9.3f} ms  {medians[label] / base:6.2f}× fused AdamW  "
            f"transient {transient / row['params']:.3g} B/param")
    return row


def first_step(spec: dict, device: str = "cpu", steps: int = 5) -> dict:
    """Run in a fresh process: seconds of our first ``step()`` on ``spec``'s model, and of later ones."""
    torch.set_num_threads(2)
    model = build_model(spec, device)
    opt = AdamWMiniSF(model.parameters())
    sync = _sync(device)
    sync()
    start = time.perf_counter()
    opt.step()
    sync()
    first = time.perf_counter() - start
    steady = interleaved_medians({"step": opt.step}, steps, 1, sync)["step"]
    return {"first_step_s": first, "steady_step_s": steady, "compile_s": first - steady}


def _probe(spec: dict, device: str, env: dict[str, str], timeout: float) -> dict:
    """:func:`first_step` in a subprocess: its result, or ``{"error": why}``."""
    code = (f"import json; from refadamw.bench.step import first_step; "
            f"print(json.dumps(first_step({spec!r}, {device!r})))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode == 0:
        with contextlib.suppress(ValueError, IndexError):
            return json.loads(out.stdout.strip().splitlines()[-1])
    tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
    return {"error": f"exit {out.returncode}: {tail[-400:]}"}


def compile_times(spec: dict, device: str = "cpu", timeout: float = COMPILE_TIMEOUT_S) -> dict:
    """First-step overhead of ours with empty compiler caches (``cold``), then with the caches it left (``warm``).

    Each runs :func:`first_step` in its own process, so nothing compiled in
    this one helps; the caches (inductor's, triton's, ours) live in a
    temporary folder, removed afterwards. ``compile_s`` is the first step's
    time minus the median of the next ones (it includes creating the state).
    """
    with tempfile.TemporaryDirectory(prefix="refadamw-compile-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton",
               "REFADAMW_CACHE_DIR": f"{tmp}/refadamw"}
        start = time.perf_counter()
        cold = _probe(spec, device, env, timeout)
        warm = _probe(spec, device, env, max(1.0, timeout - (time.perf_counter() - start)))
        return {"cold": cold, "warm": warm}


# ----------------------------------------------------------------------------- the suite

def _load() -> float | None:
    """The 1-minute load average: timings on a machine busy with other work are not the optimizer's."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def step(bench, workloads: tuple[str, ...]) -> tuple[dict, str]:
    """The suite (``workloads`` and seeds are not used: the models are its own)."""
    device = bench.device
    rounds, per_round = ROUNDS[(device, bench.quick)]
    threads, load_before = torch.get_num_threads(), _load()
    torch.set_num_threads(2)
    try:
        bandwidth = copy_bandwidth_gbs(device=device)
        bench.log(f"step: copy bandwidth {bandwidth:.1f} GB/s on {device}")
        rows = [measure_model(name, spec, device, rounds, per_round, bandwidth, bench.log)
                for name, spec in shapes.MODELS.items()]
    finally:
        torch.set_num_threads(threads)
    load = [load_before, _load()]  # around the timings, not the compile probes (which load the machine)
    # --quick: one compile probe, on the smallest model (with dynamic shapes the graphs barely depend on it)
    probed = {min(rows, key=lambda r: r["params"])["model"]} if bench.quick else set(shapes.MODELS)
    budget, start = COMPILE_BUDGET_S[device], time.perf_counter()
    for row in rows:
        if row["model"] not in probed:
            continue
        left = COMPILE_TIMEOUT_S if budget is None else budget - (time.perf_counter() - start)
        if left < 10:
            row["compile"] = {"cold": {"error": "not run: the compile-probe time budget is spent"}}
            continue
        bench.log(f"step: first-step compile time on {row['model']} (fresh processes)")
        row["compile"] = compile_times(row["spec"], device, timeout=min(left, COMPILE_TIMEOUT_S))
    data = {"device": device, "torch": torch.__version__, "rounds": rounds, "steps_per_round": per_round,
            "threads": 2 if device == "cpu" else None, "copy_bandwidth_gbs": bandwidth, "models": rows,
            "refadamw_compile_env": os.environ.get("REFADAMW_COMPILE"), "cpus": os.cpu_count(),
            "load_average": load}
    return data, markdown(data)


def _compile_cell(probe: dict | None, key: str) -> str:
    if not probe:
        return "-"
    if "error" in probe:
        return probe["error"].replace("|", "/")
    return f"{probe[key]:.3g}"


def markdown(data: dict) -> str:
    from .report import table

    rows = data["models"]
    labels = [c.label for c in contenders() if any(c.label in r["optimizers"] or c.label in r["skipped"] for r in rows)]

    def cells(row: dict, fmt: Callable[[dict], str]) -> list[str]:
        return [fmt(row["optimizers"][label]) if label in row["optimizers"] else "skipped" for label in labels]

    def models(fmt: Callable[[dict], str]) -> list[list]:
        return [[r["model"], r["tensors"], f"{r['params']:,}", *cells(r, fmt)] for r in rows]

    head = ["model", "tensors", "params", *labels]
    where = (f"{data['device']}, {data['threads']} threads" if data["threads"] else data["device"])
    load = data.get("load_average") or [None]
    if None not in load:
        where += f"; load average {load[0]:.1f} before the timings, {load[1]:.1f} after, {data['cpus']} CPUs"
    lines = ["### optimizer.step() speed", "",
             f"`refadamw bench --suite step` ({where}, torch {data['torch']}): median of {data['rounds']} "
             f"interleaved rounds of {data['steps_per_round']} step(s), fixed random gradients; "
             "step time ÷ `torch.optim.AdamW(fused=True)` (median ms in brackets):", "",
             table(head, models(lambda o: f"{o['ratio_vs_adamw_fused']:.3g}× ({o['median_s'] * 1e3:.3g} ms)")), "",
             "Transient memory of one steady-state step (peak bytes allocated beyond those held before it), "
             "bytes per parameter:", "",
             table(head, models(lambda o: f"{o['transient_bytes_per_param']:.3g}")), "",
             f"Nominal bytes a step must move per parameter, and the share of the copy bandwidth "
             f"({data['copy_bandwidth_gbs']:.1f} GB/s) it reaches: (nominal bytes ÷ bandwidth) ÷ measured time:", "",
             table(head, models(lambda o: f"{o['nominal_bytes_per_param']:.3g} B · {o['copy_bandwidth_pct']:.3g}%")),
             "", f"First `step()` of {OURS} in a fresh process, seconds; compile = first step − median later step "
             "(cold: empty compiler caches; warm: the caches the cold run left):", "",
             table(["model", "cold first step", "cold compile", "warm first step", "warm compile"],
                   [[r["model"], *(_compile_cell(r["compile"].get(k), key) for k in ("cold", "warm")
                                   for key in ("first_step_s", "compile_s"))]
                    for r in rows if "compile" in r])]
    skipped = [f"- {label} on {r['model']}: {why}" for r in rows for label, why in r["skipped"].items()]
    if skipped:
        lines += ["", "Skipped:", "", *skipped]
    return "\n".join(lines)


def figure(data: dict, out: Path) -> Path:
    """``step.png``: step time ÷ fused AdamW per model, one bar per optimizer."""
    from .plots import grouped_bars

    ratios = {row["model"]: {label: r["ratio_vs_adamw_fused"] for label, r in row["optimizers"].items()}
              for row in data["models"]}
    return grouped_bars(ratios, out / "step.png", "step() time ÷ fused AdamW",
                        f"optimizer.step() on {data['device']}", reference=1.0)
