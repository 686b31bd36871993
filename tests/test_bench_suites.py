"""``refadamw bench --suite``: the precision and controller suites, shrunk to run in seconds."""

import json
import math

import pytest

from refadamw.bench import cli, memory, optimizers, suites


@pytest.fixture
def tiny(monkeypatch):
    """One lr per optimizer, two λ, one window, a small memory probe."""
    monkeypatch.setattr(suites, "LR_GRIDS", {"refadamw": (2e-2,), "schedulefree": (1e-2,), "adamw_cosine": (1e-2,)})
    monkeypatch.setattr(suites, "LAMBDAS", (0.0, 0.05))
    monkeypatch.setattr(suites, "WINDOWS", ((0.2, 0.8),))
    real = suites.peak_memory
    monkeypatch.setattr(suites, "peak_memory", lambda names, layers: real(names[:2], layers=1, width=256))


def test_controller_suite_reports_spikes_alarms_and_the_sweep(tiny, tmp_path, capsys):
    doc = tmp_path / "controller_doc.md"
    doc.write_text("before\n<!-- controller:start -->\nold\n<!-- controller:end -->\nafter\n")
    assert cli.main(["bench", "--suite", "controller", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path), "--doc", str(doc)]) == 0
    assert "old" not in doc.read_text() and "Spike recovery" in doc.read_text()
    data = json.loads((tmp_path / "controller.json").read_text())
    labels = {row["optimizer"] for row in data["spike"]}
    assert {"refadamw (plain step)", "refadamw (loss fed)", "adamw_cosine"} <= labels
    for row in data["spike"]:
        assert len(row["clean"]) == len(row["spiked"]) == 1
    assert {r["lambda"] for r in data["lambda_sweep"]} == {0.0, 0.05}
    assert all(0 <= f <= 1 for r in data["false_alarms"] for f in r["flagged_fraction"])
    report = (tmp_path / "controller.md").read_text()
    assert "Spike recovery" in report and "| friedman |" in report
    assert "λ=0.05" in capsys.readouterr().out


def test_precision_suite_reports_bytes_quality_time_and_memory(tiny, tmp_path):
    assert cli.main(["bench", "--suite", "precision", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "precision.json").read_text())
    assert data["bytes_per_param"]["bf16"] < 2.1 < data["bytes_per_param"]["fp32"]
    assert data["quality"][0]["workload"] == "friedman" and data["quality"][0]["ratio_bf16_vs_fp32"] > 0
    assert data["step_time"]["adamw_fused"]["ratio_vs_adamw_fused"] == 1.0
    assert [r["optimizer"] for r in data["peak_memory"]] == ["adamw_fused", "adamw"]


def test_ladder_suite_compares_repair_policies(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(suites, "LADDERS", {"seed-era": {"ladder": (0.0, 0.3, 0.5, 1.0), "pull_after": 1,
                                                          "skip_level": 3}, "default": {}})
    monkeypatch.setattr(suites, "LADDER_SPIKES", (None, 1000.0))
    assert cli.main(["bench", "--suite", "ladder", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ladder.json").read_text())["ladder"]
    assert [r["policy"] for r in rows] == ["seed-era", "default"]
    assert all(len(r["clean"]) == len(r["x1000"]) == len(r["flagged_fraction"]) == 1 for r in rows)
    assert "×1000 ÷ clean" in (tmp_path / "ladder.md").read_text()


def test_peak_memory_probe_sees_the_optimizer_state():
    fp32, bf16 = memory.peak_memory(["ours_fp32", "ours_bf16"], layers=2, width=1024)
    assert fp32["state_bytes_per_param"] > 3.9 and bf16["state_bytes_per_param"] < 2.1
    with pytest.raises(ValueError, match="unknown optimizer"):
        memory.make_optimizer("sgd", [])


def test_training_memory_probe_sees_the_gradients_freed_by_the_fused_backward_pass():
    rows = {r["config"]: r for r in memory.training_peak_memory(("backward only", "ours", "ours_fused_back_pass"),
                                                                 layers=4, width=1024)}
    ordinary, fused = rows["ours"]["optimizer_bytes_per_param"], rows["ours_fused_back_pass"]["optimizer_bytes_per_param"]
    assert ordinary > 5.5  # bf16 z − y (2) + fp32 gradients (4)
    # the state (2.09 B/param with the lr-free samples), one gradient at a time, and the lr-free sums'
    # sample-sized temporaries (each 4/97 B/param; together about 0.5 B/param at this size)
    assert 1.9 < fused < 3.6 and fused < ordinary - 2.5
    assert rows["backward only"]["optimizer_bytes_per_param"] == 0.0


def test_backward_suite_reports_memory_quality_and_spikes(tiny, monkeypatch, tmp_path):
    from refadamw.bench import backward

    real = backward.training_peak_memory
    monkeypatch.setattr(backward, "training_peak_memory",
                        lambda: real(("backward only", "ours_fused_back_pass"), layers=1, width=256))
    monkeypatch.setattr(backward, "STEPS", {True: (20, 20)})
    monkeypatch.setattr(backward, "LR_GRID", (3e-2,))
    monkeypatch.setattr(backward, "SPIKES", (1000.0,))
    assert cli.main(["bench", "--suite", "backward", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "backward.json").read_text())
    assert [r["config"] for r in data["memory"]] == ["backward only", "ours_fused_back_pass"]
    assert len(data["quality"]) == 4 and all(math.isfinite(r["ratio"]) for r in data["quality"])
    assert {r["fused_back_pass"] for r in data["spikes"]} == {False, True}
    report = (tmp_path / "backward.md").read_text()
    assert "fused ÷ ordinary" in report and "×1000 spiked ÷ clean" in report


def test_unknown_optimizer_and_bad_bench_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.build("sgd", 1e-3, 10)
    for argv in (["bench", "--suite", "nope"], ["bench", "--suite", "precision", "--seeds", "0"],
                 ["bench", "--suite", "precision", "--workloads", "mnist"]):
        with pytest.raises(SystemExit):
            cli.main(argv)


def test_seed_suite_compares_legacy_with_the_front_door(tmp_path):
    doc = tmp_path / "migrating.md"
    doc.write_text("<!-- seed:start -->\nold\n<!-- seed:end -->\n")
    assert cli.main(["bench", "--suite", "seed", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path), "--doc", str(doc)]) == 0
    rows = json.loads((tmp_path / "seed.json").read_text())["seed"]
    assert [r["optimizer"] for r in rows][:2] == ["legacy, lr 1e-3", "legacy, lr 1e-3, + loss (the injection runs)"]
    assert all(len(r["final_val_loss"]) == 1 and r["steps_run"][0] > 0 for r in rows)
    assert "Seed compatibility" in doc.read_text() and "old" not in doc.read_text()


def test_robustness_suite_retunes_adamw_at_every_size(monkeypatch, tmp_path):
    from refadamw.bench import robustness

    monkeypatch.setattr(robustness, "GRID", (3e-3, 1e-2))
    seen = []
    real = robustness.runner.make_task

    def recording(name, seed, quick, **sizes):
        task = real(name, seed, quick, **sizes)
        seen.append((sizes, task.info["width"], task.info["batch"]))
        return task

    monkeypatch.setattr(robustness.runner, "make_task", recording)
    assert cli.main(["bench", "--suite", "robustness", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "robustness.json").read_text())["robustness"]
    assert [r["size"] for r in rows] == list(robustness.SIZES)
    widths = {tuple(sorted(s.items())): (w, b) for s, w, b in seen}
    assert widths[(("width_factor", 4),)] == (4 * 64, 64) and widths[(("batch_factor", 4),)] == (64, 4 * 64)
    for row in rows:
        assert set(row["adamw_cosine_grid"]) == {"0.003", "0.01"}
        assert row["adamw_cosine"] == min(row["adamw_cosine_grid"].values()), "one seed: the best of its grid"
        assert row["refadamw_ratio"] == pytest.approx(row["refadamw"] / row["adamw_cosine"])
        assert row["refadamw_lr_3e-3"] != row["refadamw"], "the defaults must not run the former fixed lr"
    assert "width ×4" in (tmp_path / "robustness.md").read_text()


def test_defaults_suite_varies_one_default_at_a_time(monkeypatch, tmp_path):
    from refadamw.bench import defaults

    monkeypatch.setattr(defaults, "VARIANTS", {"defaults": {}, "warmup_steps=0": {"warmup_steps": 0},
                                               "ref_alpha=0": {"ref_alpha": 0.0}})
    built = []
    real = defaults.runner.build

    def recording(name, lr, steps, **kw):
        make, schedule = real(name, lr, steps, **kw)
        return (lambda model: built.append(make(model)) or built[-1]), schedule

    monkeypatch.setattr(defaults.runner, "build", recording)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- defaults:start -->\nold\n<!-- defaults:end -->\n")
    assert cli.main(["bench", "--suite", "defaults", "--quick", "--seeds", "1", "--workloads", "friedman",
                     "--out", str(tmp_path), "--doc", str(doc)]) == 0
    rows = json.loads((tmp_path / "defaults.json").read_text())["defaults"]
    assert [r["variant"] for r in rows] == ["defaults", "warmup_steps=0", "ref_alpha=0"]
    assert rows[0]["ratio"] == 1.0 and all(math.isfinite(r["mean"]) for r in rows)
    assert rows[1]["ratio"] == pytest.approx(rows[1]["mean"] / rows[0]["mean"])
    groups = [o.param_groups[0] for o in built]
    assert all(g["lr_free"] for g in groups)  # every variant in the lr-free mode
    assert [g["warmup_steps"] for g in groups] == [20, 0, 20]
    assert [o.controller.ref_alpha for o in built] == [0.05, 0.05, 0.0]
    assert "geo-mean" in doc.read_text() and "old" not in doc.read_text()


def test_bench_entries_for_the_lr_free_mode_and_prodigy_at_defaults():
    import torch

    model = torch.nn.Linear(4, 4)
    lr_free = optimizers.build("refadamw_lr_free", None, 10)[0](model)
    assert lr_free.param_groups[0]["lr_free"] is True and lr_free.param_groups[0]["lr_free_scale"] == 1.0
    assert optimizers.build("refadamw_lr_free", 0.5, 10)[0](model).param_groups[0]["lr_free_scale"] == 0.5
    assert optimizers.build("refadamw", None, 10)[0](model).param_groups[0]["lr_free"] is True, "the defaults"
    fixed = optimizers.build("refadamw", 3e-3, 10)[0](model)
    assert fixed.param_groups[0]["lr_free"] is False and fixed.param_groups[0]["lr"] == 3e-3
    pytest.importorskip("prodigyplus")
    prodigy = optimizers.build("prodigy_sf", None, 10)[0](model)
    assert type(prodigy).__name__ == "ProdigyPlusScheduleFree" and prodigy.param_groups[0]["lr"] == 1.0
