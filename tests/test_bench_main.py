"""``refadamw bench``, the main job, shrunk to one workload and a small timing model."""

import io
import json
import math

import torch

import pytest

from refadamw.bench import cli, main, optimizers
from refadamw.bench.progress import Progress

RUN_KEYS = {"workload", "optimizer", "lr", "seed", "final_val_loss", "state_bytes_per_param",
            "step_time_ratio_vs_adamw_fused"}
STEP_KEYS = {"params", "ratio_vs_adamw_fused", "ratio_vs_adamw_foreach", "bytes_moved_per_param", "ns_per_param",
             "copy_bandwidth_gbs"}


@pytest.fixture
def small_timing(monkeypatch):
    monkeypatch.setattr(main, "STEP_LAYERS", 2)
    monkeypatch.setattr(main, "STEP_WIDTH", 256)
    real = main.copy_bandwidth_gbs
    monkeypatch.setattr(main, "copy_bandwidth_gbs", lambda: real(numel=1 << 20, rounds=3))


def test_quick_main_job_writes_results_curves_readme_and_benchmarks(small_timing, tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nend\n")
    benchmarks = tmp_path / "BENCHMARKS.md"
    names = "refadamw,adamw_cosine,schedulefree,seed_legacy"
    assert cli.main(["bench", "--quick", "--workloads", "friedman", "--optimizers", names, "--out", str(tmp_path),
                     "--readme", str(readme), "--benchmarks", str(benchmarks)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["optimizers"] == names.split(",")
    assert all(RUN_KEYS <= run.keys() for run in data["runs"])
    # refadamw_lr_free: the lr-sensitivity runs of our lr-free default (its factor on the estimate)
    assert {r["optimizer"] for r in data["runs"]} == set(names.split(",")) | {"refadamw_lr_free"}
    assert STEP_KEYS <= data["step_time"].keys()
    assert data["step_time"]["bytes_moved_per_param"] == main.ours_bytes_moved_per_param()
    assert data["step_time_per_optimizer"]["adamw_fused"]["ratio_vs_adamw_fused"] == 1.0
    ours = [r for r in data["summary"] if r["optimizer"] == "refadamw"][0]
    assert ours["lr"] == main.default_lr() and len(ours["final_val_loss"]) == 1
    cosine = [r for r in data["summary"] if r["optimizer"] == "adamw_cosine"][0]
    assert cosine["ratio_vs_adamw_cosine"] == 1.0
    assert ours["ratio_vs_adamw_cosine"] == pytest.approx(ours["mean"] / cosine["mean"])
    # lr × {1/3, 1, 3} for ours, AdamW+cosine and schedulefree; spikes for the same three.
    assert {r["optimizer"] for r in data["lr_sensitivity"]} == {"refadamw", "adamw_cosine", "schedulefree"}
    assert all(len(r["losses"]) == 3 for r in data["lr_sensitivity"])
    ours_sensitivity = [r for r in data["lr_sensitivity"] if r["optimizer"] == "refadamw"][0]
    assert ours_sensitivity["lr"] is None and sorted(map(float, ours_sensitivity["losses"])) == [
        pytest.approx(1 / 3), 1.0, 3.0], "lr-free: the factors go on the estimate"
    assert ours_sensitivity["losses"]["1"] == ours["final_val_loss"][0]
    assert {r["optimizer"] for r in data["spike"]} == {"refadamw", "adamw_cosine", "schedulefree"}
    assert [(r["optimizer"], r["clip"]) for r in data["spike"]] == list(main.SPIKED)
    assert all(len(r["clean"]) == len(r["spiked"]) == 1 for r in data["spike"])
    assert any(r["spike"] for r in data["runs"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves_friedman.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and "refadamw (defaults)" in text and text.startswith("intro")
    assert benchmarks.read_text().startswith("# Benchmarks")
    assert "`refadamw bench --quick --workloads friedman --out" in benchmarks.read_text(), "the command that made it"
    assert "lr sensitivity" in benchmarks.read_text()
    out = capsys.readouterr().out
    assert "Final validation loss" in out and "Spike recovery" in out
    assert "| friedman | adamw_cosine | z-score (ZClip) |" in out and "| friedman | refadamw | norm 1.0 |" in out
    # --render rebuilds the same report from results.json without running anything.
    again = tmp_path / "again.md"
    assert cli.main(["bench", "--render", str(tmp_path / "results.json"), "--benchmarks", str(again)]) == 0
    assert again.read_text() == benchmarks.read_text()
    _check_retime(tmp_path, data, monkeypatch)


def _check_retime(tmp_path, data, monkeypatch):
    """--render --retime puts a new step() row into results.json (every run's ratio too) and keeps the losses."""
    real = main.step_benchmark
    calls = []

    def doubled(names, skipped):  # the real timing, made recognizable
        timed = real(names, skipped)
        calls.append(names)
        for row in timed["per_optimizer"].values():
            row["ratio_vs_adamw_fused"] *= 2
        return timed

    monkeypatch.setattr(main, "step_benchmark", doubled)
    out = tmp_path / "retimed"
    assert cli.main(["bench", "--render", str(tmp_path / "results.json"), "--retime", "--out", str(out)]) == 0
    assert calls == [tuple(data["optimizers"])]
    new = json.loads((out / "results.json").read_text())
    assert [r["final_val_loss"] for r in new["runs"]] == [r["final_val_loss"] for r in data["runs"]]
    assert new["summary"] == data["summary"]
    per = new["step_time_per_optimizer"]
    assert per["adamw_fused"]["ratio_vs_adamw_fused"] == 2.0
    for r in new["runs"]:
        name = "refadamw" if r["optimizer"] == "refadamw_lr_free" else r["optimizer"]
        assert r["step_time_ratio_vs_adamw_fused"] == per[name]["ratio_vs_adamw_fused"]
    assert "timed again after the run" in (out / "results.md").read_text()
    assert "timed again" not in (tmp_path / "results.md").read_text()


def test_retime_needs_render():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--retime"])


def test_render_refuses_what_is_not_a_main_results_file(tmp_path, capsys):
    assert cli.main(["bench", "--render", str(tmp_path / "missing.json")]) == 1
    (tmp_path / "ladder.json").write_text('{"suite": "ladder"}')
    assert cli.main(["bench", "--render", str(tmp_path / "ladder.json")]) == 1
    assert "not a main-suite results.json" in capsys.readouterr().err


def test_render_merges_a_rerun_of_some_optimizers_into_an_earlier_run(small_timing, tmp_path, monkeypatch, capsys):
    """``--render base.json,update.json``: the update's optimizers replace their rows (ours re-run with a
    different step fraction here), the others stay, each with its ratio to its own run's AdamW+cosine."""
    base, update, merged = tmp_path / "base", tmp_path / "update", tmp_path / "merged"
    run = ["bench", "--quick", "--workloads", "friedman"]
    assert cli.main(run + ["--optimizers", "refadamw,adamw_cosine,schedulefree", "--out", str(base)]) == 0
    from refadamw import lr_free

    monkeypatch.setattr(lr_free, "STEP_FRACTION", 0.5)
    assert cli.main(run + ["--optimizers", "refadamw,adamw_cosine", "--out", str(update)]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    assert cli.main(["bench", "--render", f"{base / 'results.json'},{update / 'results.json'}", "--out", str(merged),
                     "--readme", str(readme)]) == 0
    old, new, both = (json.loads((d / "results.json").read_text()) for d in (base, update, merged))

    def rows(data, key, optimizer):
        return [r for r in data[key] if r["optimizer"] == optimizer]

    assert rows(both, "summary", "refadamw") == rows(new, "summary", "refadamw") != rows(old, "summary", "refadamw")
    assert rows(both, "runs", "refadamw_lr_free") == rows(new, "runs", "refadamw_lr_free")
    assert rows(both, "spike", "schedulefree") == rows(old, "spike", "schedulefree")
    assert [(r["optimizer"], r["clip"]) for r in both["spike"]] == list(main.SPIKED)
    assert rows(both, "summary", "schedulefree") == rows(old, "summary", "schedulefree")
    cosine = rows(new, "summary", "adamw_cosine")[0]["mean"]
    assert rows(both, "summary", "refadamw")[0]["ratio_vs_adamw_cosine"] == pytest.approx(
        rows(both, "summary", "refadamw")[0]["mean"] / cosine)
    assert both["step_time"] == old["step_time"] and both["optimizers"] == old["optimizers"]
    assert set(both["curves"]["friedman"]) == set(old["curves"]["friedman"])
    assert both["merged"] == [{"file": str(update / "results.json"), "optimizers": ["refadamw", "adamw_cosine"],
                               "workloads": ["friedman"]}]
    assert "are from a later run" in (merged / "results.md").read_text() and "old" not in readme.read_text()
    other_seeds = dict(new, seeds=[0, 1])
    (tmp_path / "seeds.json").write_text(json.dumps(other_seeds))
    assert cli.main(["bench", "--render", f"{base / 'results.json'},{tmp_path / 'seeds.json'}"]) == 1
    assert "cannot share a table" in capsys.readouterr().err
    no_baseline = dict(new, optimizers=["refadamw"])
    (tmp_path / "ours.json").write_text(json.dumps(no_baseline))
    assert cli.main(["bench", "--render", f"{base / 'results.json'},{tmp_path / 'ours.json'}"]) == 1
    assert "did not run adamw_cosine" in capsys.readouterr().err


def test_missing_peer_is_skipped_with_a_note(monkeypatch, small_timing, tmp_path):
    real = optimizers.build

    def build(name, *args, **kwargs):
        if name == "adam_mini":
            raise optimizers.MissingPeer("adam_mini is not installed (pip install adam-mini)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(main, "build", build)
    monkeypatch.setattr(main, "SENSITIVITY", ())
    monkeypatch.setattr(main, "SPIKED", ())
    assert cli.main(["bench", "--quick", "--workloads", "friedman", "--optimizers", "adamw_cosine,adam_mini",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "adam_mini" in data["skipped"] and data["optimizers"] == ["adamw_cosine"]
    assert "Skipped adam_mini" in (tmp_path / "results.md").read_text()


def test_full_mode_tunes_peers_on_their_grid_and_keeps_ours_at_its_default():
    assert main.default_lr() is None, "ours is reported at its defaults: lr-free"
    bench = main.MainBench(False, (0, 1), ("friedman",), ("refadamw",))
    assert bench.grid("adamw_cosine") == main.GRIDS["adamw_cosine"]
    assert main.default_lr() in bench.grid("refadamw")
    quick = main.MainBench(True, (0,), ("friedman",), ("refadamw",))
    assert quick.grid("refadamw") == (main.default_lr(),) and len(quick.grid("schedulefree")) == 1


@pytest.mark.parametrize("argv, message", [
    (["bench", "--optimizers", "sgd"], "--optimizers"),
    (["bench", "--optimizers", "refadamw"], "adamw_cosine"),
    (["bench", "--suite", "ladder", "--readme", "R.md"], "main suite"),
    (["bench", "--seeds", "0"], "--seeds"),
])
def test_bad_bench_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_progress_bar_draws_on_a_terminal_and_logs_one_line_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    live, log = Tty(), io.StringIO()
    for stream in (live, log):
        bar = Progress(stream, total_runs=2)
        bar.start("friedman refadamw", 10)
        for step in range(1, 11):
            bar.update(step, 0.5)
        bar.finish("val loss 0.1")
    assert "[1/2] friedman refadamw [" in live.getvalue() and "10/10" in live.getvalue()
    assert log.getvalue() == "[1/2] friedman refadamw val loss 0.1\n"


def test_workload_without_its_data_is_skipped_with_the_install_hint(monkeypatch, small_timing, tmp_path, capsys):
    real = main.runner.make_task

    def make_task(name, seed=0, quick=False):
        if name == "fashion_mnist":
            raise main.MissingData("Fashion-MNIST not found; apt-get install dataset-fashion-mnist")
        return real(name, seed, quick)

    monkeypatch.setattr(main.runner, "make_task", make_task)
    monkeypatch.setattr(main, "SENSITIVITY", ())
    monkeypatch.setattr(main, "SPIKED", ())
    assert cli.main(["bench", "--quick", "--workloads", "fashion_mnist,friedman", "--optimizers", "adamw_cosine",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["workloads"] == ["friedman"] and "apt-get" in data["skipped_workloads"]["fashion_mnist"]
    assert cli.main(["bench", "--quick", "--workloads", "fashion_mnist", "--optimizers", "adamw_cosine",
                     "--out", str(tmp_path)]) == 1
    assert "apt-get" in capsys.readouterr().err


def test_zscore_clip_follows_the_zclip_rule():
    """Warm-up norms set μ, σ²; an outlier with z > 2.5 is cut to μ + 2.5·σ/(z/2.5); the EMA takes the
    applied norm."""
    from refadamw.bench.clipping import ZScoreClip

    model = torch.nn.Linear(1, 1, bias=False)
    clip = ZScoreClip(warmup=4)
    for norm in (1.0, 2.0, 1.0, 2.0):  # μ = 1.5, σ = 0.5
        model.weight.grad = torch.tensor([[norm]])
        clip(model)
    assert (clip.mean, clip.var) == (1.5, 0.25)
    model.weight.grad = torch.tensor([[1.9]])  # z = 0.8: untouched
    clip(model)
    assert model.weight.grad.item() == pytest.approx(1.9)
    mean, std = clip.mean, math.sqrt(clip.var)
    model.weight.grad = torch.tensor([[1000.0]])
    assert clip(model) == pytest.approx(1000.0)
    z = (1000.0 - mean) / (std + 1e-6)
    applied = mean + 2.5 * std / (z / 2.5)
    assert model.weight.grad.item() == pytest.approx(applied, rel=1e-5) and clip.clipped == 1
    assert clip.mean == pytest.approx(0.97 * mean + 0.03 * applied)


def test_runner_clips_after_the_spike_and_before_step():
    from refadamw.bench import runner
    from refadamw.bench.workloads import base

    seen = []

    class Probe(torch.optim.SGD):
        def step(self, closure=None):
            grads = [p.grad for p in self.param_groups[0]["params"]]
            seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return super().step(closure)

    def task():
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        return base.Task(name="t", model=base.seeded_model(0, lambda: torch.nn.Linear(4, 1)), steps=6, eval_every=0,
                         train_batch=lambda step: (x, x.sum(1, keepdim=True)),
                         loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                         val_loss=lambda m: 0.0)

    runner.train(task(), lambda m: Probe(m.parameters(), lr=0.0), spike=(2, 1, 1000.0), clip=1.0)
    assert max(seen) <= 1.0 + 1e-5 and len(seen) == 6
