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
    """One norm-preserving edit per candidate layer, each made with the SVD of that layer; with
    --window each edit touches the embeddings and layers 0 .. source only, else every writer."""
    import obliteratus.excise as excise_module

    edits = []  # (layer weights of the plan or None, norm_preserve) per edit, in order
    real = excise_module.excise

    def spy(adapter, q, settings, plan=None):
        strength = None if plan is None else dict(plan.strength)
        edits.append((strength, settings.norm_preserve, adapter.n_layers))
        return real(adapter, q, settings, plan)

    monkeypatch.setattr(excise_module, "excise", spy)  # the script imports it by name when it runs
    src = save_tiny(tmp_path, "qwen2")
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["svd_span.py", "--model", str(src), "--n-train", "8", "--n-val", "4",
                                      "--n-test", "2", "--layer", "2", "--tokens", "2", "--k", "2", "--sweep",
                                      *window, "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "svd_span.py"), run_name="__main__")
    rows = [r for r in json.loads(out.read_text())["rows"] if "edit" in r]
    assert [r["edit"] for r in rows[:2]] == ["unedited", "u (basic) at layer 2"]
    swept = rows[2:]  # one row per candidate layer: axes 0 and 1 of the tiny model's 3 layers (last 20% pruned)
    assert [r.get("layer") for r in swept if "layer" in r] == sorted(r["layer"] for r in swept if "layer" in r)
    assert len(swept) >= 2 and all("kl_first" in r or "skipped" in r for r in swept)
    layers = [2] + [r["layer"] for r in swept if "layer" in r]  # u at --layer 2, then each swept layer
    assert len(edits) == len(layers)
    assert [np for _, np, _ in edits] == [False] + [True] * (len(layers) - 1)  # the recipe is norm-preserving
    for (strength, _, n_layers), source in zip(edits, layers):
        if not window:
            assert strength is None  # every writer, as basic edits
            continue
        assert strength[("embed", None)] == 1.0
        edited = {i for kind, i in strength if kind != "embed"}
        assert edited == set(range(min(source + 1, n_layers)))  # layers 0 .. source, and no later one
