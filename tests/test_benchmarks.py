"""The diagnostic benchmark scripts run end to end on a tiny model (their numbers are in RESULTS.md)."""

from __future__ import annotations

import json
import re
import runpy
import sys

import pytest

from conftest import REPO, save_tiny

BENCHMARKS = REPO / "benchmarks"


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


# --- --write-results: each benchmark script rewrites its own section of RESULTS.md -------------------

RESULTS = BENCHMARKS / "RESULTS.md"


@pytest.fixture
def results_md(monkeypatch, tmp_path):
    """benchmarks/results_md.py with its default file replaced by a copy of RESULTS.md in `tmp_path`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # where the scripts find it when run as python benchmarks/X.py
    import results_md

    copy = tmp_path / "RESULTS.md"
    copy.write_bytes(RESULTS.read_bytes())
    monkeypatch.setattr(results_md, "RESULTS", copy)
    return results_md


def split_at(text: bytes, name: str) -> tuple[bytes, bytes, bytes]:
    """(everything up to the begin marker, the section's text, the end marker and everything after)."""
    begin, end = f"<!-- begin {name} -->\n".encode(), f"<!-- end {name} -->".encode()
    head, rest = text.split(begin)
    body, tail = rest.split(end)
    return head + begin, body, end + tail


def test_replacing_a_section_changes_its_text_and_no_other_byte(results_md):
    path = results_md.RESULTS
    names = results_md.sections()
    assert {"methods-table", "vs-heretic", "optimizer-cost", "optimizer-cost-gpu", "probe-speed", "probe-speed-gpu",
            "verify-speed", "packed-linear"} <= set(names)
    for name in names:
        before = path.read_bytes()
        results_md.replace_section(name, f"\n\nnew text of {name}\n| a | b |\n\n")
        after = path.read_bytes()
        head, body, tail = split_at(before, name)
        assert split_at(after, name) == (head, f"new text of {name}\n| a | b |\n".encode(), tail)
    assert sorted(p.name for p in path.parent.iterdir()) == ["RESULTS.md"]  # the temporary file was renamed


def test_an_unknown_section_is_an_error_and_leaves_the_file_alone(results_md):
    before = results_md.RESULTS.read_bytes()
    with pytest.raises(SystemExit, match="no single section 'no-such-table'"):
        results_md.replace_section("no-such-table", "text")
    with pytest.raises(SystemExit, match="no single section 'no-such-table'"):
        results_md.check_write("no-such-table", [])
    assert results_md.RESULTS.read_bytes() == before
    assert sorted(p.name for p in results_md.RESULTS.parent.iterdir()) == ["RESULTS.md"]


def test_check_write_refuses_a_partial_run(results_md):
    results_md.check_write("methods-table", [])  # a full run may write
    with pytest.raises(SystemExit, match=r"covers only part of it \(--presets leaves out advanced; x\)"):
        results_md.check_write("methods-table", ["--presets leaves out advanced", "x"])


PARTIAL_RUNS = {  # script: (arguments of a run that covers only part of its section, what the refusal says)
    "methods_table-presets": ("methods_table.py", ["--presets", "basic"], "--presets leaves out advanced"),
    "methods_table-no-study": ("methods_table.py", ["--study-trials", "0"], "leaves out the study presets"),
    "methods_table-model": ("methods_table.py", ["--model", "/tmp/tiny"], "the section is the demo model's"),
    "probe_speed-skip-loop": ("probe_speed.py", ["--device", "cpu", "--skip-loop"], "--skip-loop"),
    "probe_speed-synthetic": ("probe_speed.py", ["--device", "cpu", "--synthetic", "llama3-1b"], "probe-speed-gpu"),
    "packed_linear": ("packed_linear.py", ["--skip-verify"], "--skip-verify"),
    "verify_speed": ("verify_speed.py", ["--model", "/tmp/tiny"], "the section is the demo model's"),
    "optimizer_cost": ("optimizer_cost.py", ["--device", "cpu", "--scope", "per_layer"], "--scope per_layer"),
    "optimizer_cost-gpu": ("optimizer_cost.py", ["--device", "cuda"], "optimizer-cost-gpu"),
    "vs_heretic": ("vs_heretic.py", ["--model", "/tmp/tiny", "--work-dir", "/nonexistent/vs"], "demo model's"),
    "capability_speed": ("capability_speed.py", ["--model", "/tmp/tiny"], "the section is the demo model's"),
}


@pytest.mark.parametrize("partial", PARTIAL_RUNS)
def test_a_partial_run_is_refused_before_any_work(results_md, monkeypatch, partial):
    import obliteratus.models.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("--write-results of a partial run must be refused before a model loads")

    monkeypatch.setattr(load, "summon", no_model)
    script, argv, reason = PARTIAL_RUNS[partial]
    before = results_md.RESULTS.read_bytes()
    monkeypatch.setattr(sys, "argv", [script, *argv, "--write-results"])
    with pytest.raises(SystemExit, match="covers only part") as refused:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert reason in str(refused.value)
    assert results_md.RESULTS.read_bytes() == before


def test_the_methods_table_writes_its_section_in_the_sections_columns(results_md, monkeypatch):
    """The section text methods_table.py writes (no model run: its rows as the script collects them)."""
    table = runpy.run_path(str(BENCHMARKS / "methods_table.py"), run_name="methods_table")
    old = split_at(results_md.RESULTS.read_bytes(), "methods-table")[1].decode()
    assert table["COLUMNS"] in old.splitlines()  # the columns the section has today
    from argparse import Namespace

    every = Namespace(presets=[p for p in table["ORDER"] if p in table["preset_names"]()], study_trials=None, model="demo")
    assert table["partial_run"](every) == []  # the script's default run may write its section
    metrics = {"refusal": 0.025, "over_refusal": 0.0, "over_refusal_sensitive": None, "kl_first": 0.282,
               "kl_mean": 0.081, "perplexity": 57.97}
    rows = [{"method": "unedited", "metrics": {**metrics, "kl_first": None, "kl_mean": None}},
            {"method": "basic", "times": {"probe (shared)": 34.2, "distill": 210.0, "excise": 9.6,
                                          "verify_after": 112.4}, "metrics": metrics},
            {"method": "optimized", "times": {"probe": 55.0, "distill": 169.0, "study": 490.0, "confirm": 17.0,
                                              "verify_before": 115.0, "excise": 3.0, "verify_after": 124.0},
             "metrics": metrics},
            {"method": "arditi", "times": {"probe (shared)": 33.0}, "error": "no layer | passes\nthe filters"},
            {"method": "arditi (layers.kl_threshold=1e9)", "times": {}, "metrics": metrics}]
    text = table["results_table"](rows, {"basic": "preset", "optimized": "preset", "arditi": "baseline"},
                                  {"arditi (layers.kl_threshold=1e9)": "arditi"}, "summon 11, VERIFY before 113")
    lines = text.splitlines()
    assert lines[0] == table["COLUMNS"] and len(lines) == 2 + len(rows)
    assert {len(re.split(r"(?<!\\)\|", line)) for line in lines} == {11}  # 9 columns in every row
    assert lines[2] == "| unedited | | 0.025 | 0.000 | — | — | — | 57.97 | summon 11, VERIFY before 113 |"
    assert lines[3] == ("| `basic` | preset | 0.025 | 0.000 | — | 0.282 | 0.081 | 57.97 | probe (shared) 34, distill 210, "
                        "excise 10, verify 112 |")
    assert lines[4].endswith("| probe 55, distill 169, study 490, confirm 17, excise 3, verify 115 + 124 |")
    assert lines[5] == "| `arditi` | baseline | error: no layer \\| passes the filters | | | | | | probe (shared) 33 |"
    assert lines[6].startswith("| `arditi` (layers.kl_threshold=1e9) | variant | 0.025 |")

    monkeypatch.setattr(sys, "argv", ["benchmarks/methods_table.py", "--n-train", "128", "--write-results"])
    body = results_md.section_text("What it measured.", text, dtype="torch.float32")
    results_md.write_section("methods-table", body)
    written = split_at(results_md.RESULTS.read_bytes(), "methods-table")[1].decode()
    head = written.splitlines()[0]
    assert head.startswith("Regenerate: `python benchmarks/methods_table.py --n-train 128 --write-results` (20")
    import torch

    assert " cores" in head and f"torch {torch.__version__}" in head and head.endswith("float32. What it measured.")
    assert text in written


def test_printed_lines_become_bullets_and_tables_stay_tables(results_md):
    assert results_md.paragraphs(["", "a", "b", "", "| x |", "|---|", "| 1 |", "", "", "c"]) == [
        "- a\n- b", "| x |\n|---|\n| 1 |", "- c"]


def test_the_big_model_gpu_script_runs_every_load_at_a_tiny_scale(tmp_path, capsys, monkeypatch):
    """benchmarks/big_model_gpu.py (for a lent GPU) on the CPU at 3 % of the 8B width, 2 layers: the
    bf16, nf4 and split (half the layers offloaded) loads each run PROBE, generation and one trial."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(sys, "argv", ["big_model_gpu.py", "--dir", str(tmp_path / "w"), "--scale", "0.03",
                                      "--layers", "2", "--device", "cpu", "--n", "4", "--tokens", "2"])
    runpy.run_path(str(BENCHMARKS / "big_model_gpu.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["bf16", "nf4", "split"], rows
    assert "disk" in rows[3] and not any("failed" in r for r in rows)
    assert not (tmp_path / "w").exists()


FRONTIER_SMALL = ["--set", "data.n_train=24", "--set", "data.n_val=4", "--set", "data.n_test=4",
                  "--set", "evaluate.max_new_tokens=3", "--set", "evaluate.kl_tokens=2",
                  "--set", "evaluate.perplexity=false", "--set", "layers.kl_threshold=1e9",
                  "--set", "layers.induce_threshold=-1e9", "--set", "optimize.study.n_trials=2",
                  "--set", "optimize.study.n_startup_trials=1", "--set", "optimize.study.refusal_tokens=3",
                  "--set", "evaluate.capability=2"]


def test_the_frontier_runs_every_configuration_then_reuses_the_saved_runs(tmp_path, capsys, monkeypatch):
    """benchmarks/frontier.py on a tiny random model: every configuration runs through obliterate() with
    the unedited VERIFY given as before=, both sources are judged by both lists, and --reuse evaluates
    the saved runs without running any configuration again."""
    import obliteratus.pipeline as pipeline

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    src = save_tiny(tmp_path / "src", "llama")
    adv = tmp_path / "adv.txt"
    adv.write_text("\n".join(f"Explain how to do forbidden thing number {i}" for i in range(12)) + "\n")
    argv = ["frontier.py", "--model", str(src), "--work-dir", str(tmp_path / "w"), "--advbench", str(adv),
            "--n-advbench", "4", *FRONTIER_SMALL]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "frontier.py"), run_name="__main__")
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip().split(" ")[0] for r in rows[1:]] == \
        ["unedited", "plain", "`basic`", "`advanced`", "`optimized`", "Heretic's", "**target"], rows
    assert "`basic` (a default):" in printed and "`optimized` (a default):" in printed
    saved = json.loads((tmp_path / "w" / "frontier.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["arditi", "basic", "advanced", "optimized", "heretic"]
    assert saved["unedited"]["advbench"]["n"] == 4 and saved["unedited"]["test"]["n"] == 4
    assert saved["unedited"]["capability"] is not None and saved["rows"][0]["capability"] is not None
    first = saved["rows"]

    def no_run(model, /, preset="basic", *args, **kwargs):
        raise AssertionError("--reuse evaluates the saved runs")

    monkeypatch.setattr(pipeline, "obliterate", no_run)
    monkeypatch.setattr(sys, "argv", [*argv, "--reuse"])
    (tmp_path / "w" / "frontier.json").unlink()  # no rows to keep: each saved model is evaluated
    runpy.run_path(str(BENCHMARKS / "frontier.py"), run_name="__main__")
    again = json.loads((tmp_path / "w" / "frontier.json").read_text())["rows"]
    for a, b in zip(first, again):  # the saved model scores as the run scored it
        assert (a["test"], a["advbench"], a["kl_first"], a["capability"]) == \
            (b["test"], b["advbench"], b["kl_first"], b["capability"]), a["name"]
    assert capsys.readouterr().out.count("evaluating the saved run") == 5
    runpy.run_path(str(BENCHMARKS / "frontier.py"), run_name="__main__")  # the rows of unchanged runs are kept
    assert capsys.readouterr().out.count("(unchanged)") == 5
    assert json.loads((tmp_path / "w" / "frontier.json").read_text())["rows"] == again


def test_the_frontier_refuses_a_partial_write(results_md, monkeypatch):
    before = results_md.RESULTS.read_bytes()
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--configs", "basic", "--write-results"])
    with pytest.raises(SystemExit, match="covers only part") as refused:
        runpy.run_path(str(BENCHMARKS / "frontier.py"), run_name="__main__")
    assert "--configs leaves out advanced, arditi, heretic, optimized" in str(refused.value)
    assert results_md.RESULTS.read_bytes() == before
