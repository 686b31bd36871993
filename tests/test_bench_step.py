"""``refadamw bench --suite step`` on shrunken models, its memory and compile probes, and ``--device``.

No test asserts a timing: the machine is shared and its speed is not the code's.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from refadamw.bench import cli, shapes, step

SMALL = {"large": {"kind": "linears", "layers": 2, "width": 128, "bias": False},
         "transformer": {"kind": "gpt", "layers": 2, "dim": 32, "heads": 4, "vocab": 64, "context": 16},
         "lora": {"kind": "lora", "pairs": 4, "rank": 4, "width": 32},
         "tiny": {"kind": "linears", "layers": 3, "width": 8, "bias": True}}
MIB = 1 << 20


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setenv("REFADAMW_COMPILE", "0")  # compiling is tested in test_compile/test_fused; it is slow
    monkeypatch.setattr(shapes, "MODELS", SMALL)


def test_the_real_models_have_the_shapes_the_docs_give():
    counts = {}
    for name, spec in shapes.MODELS.items():
        params = list(shapes.BUILDERS[spec["kind"]](**{k: v for k, v in spec.items() if k != "kind"}).parameters())
        counts[name] = len(params), sum(p.numel() for p in params)
    assert counts["large"] == (10, 10 * 1024 ** 2)
    assert counts["transformer"][0] == 148 and 24e6 < counts["transformer"][1] < 26e6
    assert counts["lora"] == (640, 320 * 2 * 16 * 640)
    assert counts["tiny"] == (40, 20 * (64 * 64 + 64))


def test_quick_suite_writes_json_markdown_figure_and_doc_block(small, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- step:start -->\nstale\n<!-- step:end -->\nend\n")
    assert cli.main(["bench", "--suite", "step", "--quick", "--out", str(tmp_path), "--doc", str(doc)]) == 0
    data = json.loads((tmp_path / "step.json").read_text())
    assert data["suite"] == "step" and data["device"] == "cpu" and data["copy_bandwidth_gbs"] > 0
    rows = {r["model"]: r for r in data["models"]}
    assert list(rows) == list(SMALL)
    assert rows["transformer"]["tensors"] == 2 * 12 + 4 and rows["lora"]["tensors"] == 8
    for row in rows.values():
        assert {"refadamw", "refadamw + Ref", "refadamw (no compiler)", "AdamW fused", "AdamW foreach",
                "refadamw (fused back pass)"} <= set(row["optimizers"])
        assert row["optimizers"]["AdamW fused"]["ratio_vs_adamw_fused"] == 1.0
        for result in row["optimizers"].values():
            for key in ("ratio_vs_adamw_fused", "median_s", "copy_bandwidth_pct", "bandwidth_bound_s"):
                assert math.isfinite(result[key]) and result[key] > 0, key
            assert result["transient_bytes"] >= 0
        ours = row["optimizers"]["refadamw"]
        assert ours["nominal_bytes_per_param"] >= 20  # y fp32 read + written, g twice, bf16 z − y read + written
        assert row["optimizers"]["AdamW fused"]["nominal_bytes_per_param"] == 28
    # --quick probes compiling on the smallest model only; with REFADAMW_COMPILE=0 that is a plain first step
    assert [name for name, r in rows.items() if "compile" in r] == ["tiny"]
    assert rows["tiny"]["compile"]["cold"]["first_step_s"] > 0 and "compile_s" in rows["tiny"]["compile"]["warm"]
    report = (tmp_path / "step.md").read_text()
    assert "| model | tensors | params | refadamw | refadamw + Ref | refadamw (no compiler) | AdamW fused |" in report
    assert "| tiny | 6 | 216 |" in report and "28 B ·" in report
    assert "stale" not in doc.read_text() and "optimizer.step() speed" in doc.read_text()
    assert (tmp_path / "step.png").stat().st_size > 0


class _Scratch(torch.optim.Optimizer):
    """Allocates a 1 MiB temporary in every step, and 1 MiB of state on the first."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("junk", torch.zeros(MIB // 4))
        scratch = torch.ones(MIB // 4)  # fp32: 1 MiB
        scratch.mul_(2)
        del scratch


def test_transient_memory_sees_a_deliberate_temporary(monkeypatch):
    fused = next(c for c in step.contenders() if c.label == step.BASELINE)
    monkeypatch.setattr(step, "contenders", lambda: [fused, step.Contender("scratch", lambda m: _Scratch(m.parameters()))])
    row = step.measure_model("large", SMALL["large"], "cpu", rounds=1, steps_per_round=1, bandwidth_gbs=10.0,
                             log=lambda _: None)
    scratch = row["optimizers"]["scratch"]["transient_bytes"]
    assert MIB <= scratch < 1.05 * MIB  # the temporary, not the state made in the warm-up steps
    assert row["optimizers"][step.BASELINE]["transient_bytes"] < 0.05 * MIB


def test_an_optimizer_that_fails_on_a_model_is_skipped_with_its_reason(monkeypatch):
    def broken(model):
        raise ValueError("cannot take this shape")

    fused = next(c for c in step.contenders() if c.label == step.BASELINE)
    monkeypatch.setattr(step, "contenders", lambda: [fused, step.Contender("broken", broken)])
    row = step.measure_model("tiny", SMALL["tiny"], "cpu", 1, 1, 10.0, log=lambda _: None)
    assert row["skipped"] == {"broken": "ValueError: cannot take this shape"}
    assert "broken on tiny: ValueError" in step.markdown({
        "device": "cpu", "threads": 2, "torch": torch.__version__, "rounds": 1, "steps_per_round": 1,
        "copy_bandwidth_gbs": 10.0, "models": [row]})


def test_compile_probe_returns_seconds_or_the_error(monkeypatch):
    monkeypatch.setenv("REFADAMW_COMPILE", "0")  # the probe's machinery, not the compiler, is under test here
    times = step.compile_times(SMALL["tiny"])
    for probe in (times["cold"], times["warm"]):
        assert probe["first_step_s"] > 0 and probe["steady_step_s"] > 0
        assert probe["compile_s"] == pytest.approx(probe["first_step_s"] - probe["steady_step_s"])
    broken = step.compile_times({"kind": "nope"}, timeout=60)
    assert "KeyError" in broken["cold"]["error"] and "error" in broken["warm"]
    assert step.compile_times(SMALL["tiny"], timeout=0.01)["cold"] == {"error": "timed out after 0 s"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "step", "--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_device_belongs_to_the_step_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "precision", "--device", "cuda"])
    assert "--device belongs to the step suite" in capsys.readouterr().err


def test_benchmarks_writer_keeps_the_step_block(tmp_path):
    results = Path(__file__).parents[1] / "docs" / "bench" / "results.json"
    shutil.copy(results, tmp_path / "results.json")
    benchmarks = tmp_path / "BENCHMARKS.md"
    block = "<!-- step:start -->\n### optimizer.step() speed\n\n| a | b |\n<!-- step:end -->"
    benchmarks.write_text(f"# Benchmarks\n\nstale generated text\n\n{block}\n")
    argv = ["bench", "--render", str(tmp_path / "results.json"), "--benchmarks", str(benchmarks)]
    assert cli.main(argv) == 0
    text = benchmarks.read_text()
    assert "stale generated text" not in text and "### Results" in text
    assert text.endswith(f"\n{block}\n") and text.count("<!-- step:start -->") == 1
    assert cli.main(argv) == 0
    assert benchmarks.read_text() == text  # rewriting again changes nothing
