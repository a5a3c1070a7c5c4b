"""The diagnostic benchmark scripts run end to end on a tiny model (their numbers are in RESULTS.md)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from conftest import save_tiny

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_svd_span_runs_every_edit(tmp_path, monkeypatch):
    src = save_tiny(tmp_path, "qwen2")
    out = tmp_path / "svd.json"
    monkeypatch.setattr(sys, "argv", ["svd_span.py", "--model", str(src), "--n-train", "8", "--n-val", "4",
                                      "--n-test", "2", "--layer", "1", "--tokens", "3", "--k", "2",
                                      "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "svd_span.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    edits = [r["edit"] for r in rows if "edit" in r]
    assert edits[:2] == ["unedited", "u (basic)"] and len(edits) == 8  # unedited, u, v_1, span x2, u+v_i x2, u+rest
    span = rows[1]["span_fraction_u"]
    assert 0.0 <= span["1"] <= span["2"] <= 1.0 + 1e-9  # a larger span holds more of u
    assert all("kl_first" in r for r in rows if r.get("edit", "unedited") != "unedited")


@pytest.mark.parametrize("window", [[], ["--window"]], ids=["every-layer", "source-window"])
def test_svd_span_sweeps_the_recipe_over_every_candidate_layer(tmp_path, monkeypatch, window):
    src = save_tiny(tmp_path, "qwen2")
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["svd_span.py", "--model", str(src), "--n-train", "8", "--n-val", "4",
                                      "--n-test", "2", "--layer", "1", "--tokens", "2", "--k", "2", "--sweep",
                                      *window, "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "svd_span.py"), run_name="__main__")
    rows = [r for r in json.loads(out.read_text())["rows"] if "edit" in r]
    assert [r["edit"] for r in rows[:2]] == ["unedited", "u (basic) at layer 1"]
    swept = rows[2:]  # one row per candidate layer: the tiny model's 2 layers + embeddings, last 20% pruned
    assert [r.get("layer") for r in swept if "layer" in r] == sorted(r["layer"] for r in swept if "layer" in r)
    assert len(swept) >= 2 and all("kl_first" in r or "skipped" in r for r in swept)
