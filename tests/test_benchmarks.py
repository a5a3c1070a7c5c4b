"""The diagnostic benchmark scripts run end to end on a tiny model (their numbers are in RESULTS.md)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

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
