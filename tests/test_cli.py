import json
import subprocess
import sys

import pytest

from refadamw.bench import cli

pytest.importorskip("sklearn")


def test_demo_writes_results(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "5", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    names = {q["optimizer"] for q in result["quality"]}
    assert {"refadamw (defaults)", "AdamWMiniSF", "adamw_constant", "adamw_cosine"} <= names
    assert result["step_time"]["adamw_fused"]["ratio_vs_adamw_fused"] == 1.0
    assert result["step_time"]["AdamWMiniSF"]["state_bytes_per_param"] < 4.1
    assert "val_loss=" in capsys.readouterr().out
    assert "| AdamWMiniSF |" in (tmp_path / "demo.md").read_text()


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--seeds", "0"])
    with pytest.raises(SystemExit):
        cli.main([])


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "refadamw", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_readme_block_is_rewritten(tmp_path):
    from refadamw.bench.demo import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nold\n<!-- demo:end -->\noutro\n")
    update_readme(str(readme), "| new |")
    assert readme.read_text() == "intro\n<!-- demo:start -->\n| new |\n<!-- demo:end -->\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="demo:start"):
        update_readme(str(readme), "| new |")
