"""``refadamw bench --suite lora``, shrunk to run in seconds."""

from __future__ import annotations

import json

from refadamw.bench import cli, lora


def test_lora_suite_reports_quality_and_state_bytes_per_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("REFADAMW_COMPILE", "0")  # the compiled pass is tested elsewhere; compiling is slow
    monkeypatch.setattr(lora, "STEPS", {True: (10, 10), False: (10, 10)})
    monkeypatch.setattr(lora, "RANKS", (8,))
    monkeypatch.setattr(lora, "LR_GRID", (1e-2,))
    assert cli.main(["bench", "--suite", "lora", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lora.json").read_text())
    results = data["results"]
    assert set(results) == {"r8/element", "r8/rows", "r8/A columns"}
    # bf16 state: z − y is 2 B/param; per-element v adds 2 more, blocks about 0.1
    assert 3.9 < results["r8/element"]["bytes_per_param"] < 4.2
    assert results["r8/rows"]["bytes_per_param"] < 2.3
    assert all(v < data["val_before"][0] for r in results.values() for v in r["val"])  # fine-tuning helped
    assert "| 8 | rows |" in (tmp_path / "lora.md").read_text()
