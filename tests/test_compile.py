"""torch.compile: a compiled ``opt.step`` matches eager, and stops recompiling.

Graph breaks and compiled frames are counted with
``torch._dynamo.utils.counters`` and attached to the test report
(``record_property``); docs/integrations.md lists the measured numbers.
The default run uses the ``aot_eager`` backend (Dynamo and AOTAutograd, no
code generation, so it stays fast on CPU); set ``REFADAMW_TEST_INDUCTOR=1`` to
run the same check with inductor (about 30 s of compilation).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from refadamw import RefAdamWMiniSF

STEPS = 5


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 99), torch.nn.Tanh(), torch.nn.Linear(99, 8))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 64, generator=gen), torch.randn(8, 8, generator=gen)) for _ in range(STEPS)]


def train(backend: str | None, state_dtype: str):
    """Train STEPS steps with ``opt.step`` compiled by ``backend`` (None: eager).

    Returns the parameters, the averaged weights, and the number of frames
    Dynamo had compiled after each step.
    """
    model = build_model()
    opt = RefAdamWMiniSF(model.parameters(), lr=1e-2, total_steps=STEPS, state_dtype=state_dtype)
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend)
    frames = []
    for inputs, targets in batches():
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        step(loss=loss.detach())
        opt.zero_grad()
        frames.append(counters["frames"]["ok"])
    y = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        x = [p.detach().clone() for p in model.parameters()]
    return y, x, frames


def check_compiled_matches_eager(backend: str, state_dtype: str, record_property) -> None:
    y_eager, x_eager, _ = train(None, state_dtype)
    torch._dynamo.reset()
    counters.clear()
    y, x, frames = train(backend, state_dtype)
    for a, b in zip(y + x, y_eager + x_eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    graph_breaks = sum(counters["graph_break"].values())
    record_property("graph_breaks", graph_breaks)
    record_property("frames_compiled_per_step", frames)
    assert graph_breaks == 0, dict(counters["graph_break"])
    # Step 1 sees fresh (uninitialised) state and step 2 the first stored state;
    # from step 3 on, every guard must hold: no recompiles in steady state.
    assert frames[2:] == [frames[1]] * (STEPS - 2), f"recompiled after step 2: frames per step {frames}"


def test_compiled_step_matches_eager(record_property):
    check_compiled_matches_eager("aot_eager", "bf16", record_property)  # the default state dtype


@pytest.mark.skipif(os.environ.get("REFADAMW_TEST_INDUCTOR") != "1", reason="slow: set REFADAMW_TEST_INDUCTOR=1")
def test_inductor_step_matches_eager(record_property):
    check_compiled_matches_eager("inductor", "fp32", record_property)
