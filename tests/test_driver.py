"""One driver: every preset runs from Python through ``obliterate()`` (the fixed edit, the kernel grid
and the Optuna study are strategies of its "choose the edit" step) and writes the same
``obliteratus.json``, validated by one model (record.RunRecord); a loaded model can be passed in, and
``run.save(dir)`` later writes what ``output=`` writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from obliteratus import RunRecord, obliterate
from obliteratus.errors import ConfigError, ObliteratusError
from obliteratus.presets import preset_names
from obliteratus.record import GridRecord, StudyRecord

from conftest import merge, save_tiny

SMALL = {"data": {"n_train": 24, "n_val": 4, "n_test": 4},
         "evaluate": {"max_new_tokens": 3, "kl_tokens": 2, "perplexity": False},
         # a random model has no refusal direction to pass Arditi's filters: open them
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9},
         "optimize": {"study": {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 3}}}
RDO_FAST = {"directions": {"rdo": {"max_steps": 6, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4}}}
STUDY_PRESETS = {"optimized", "heretic"}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("src"), "llama")


def written(out: Path) -> dict:
    """What a run directory holds, comparable between runs: the record less timings and versions, and
    the hashes of the weights, directions and PCA panels."""
    meta = json.loads((out / "obliteratus.json").read_text())
    for key in ("timings_s", "versions"):
        meta.pop(key)
    files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
             for name in ("model.safetensors", "directions.safetensors", "pca.json")}
    return {"meta": meta, "files": files}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_runs_through_obliterate_and_writes_the_one_record(src, tmp_path, name):
    out = tmp_path / "out"
    run = obliterate(str(src), name, str(out), **merge(SMALL, RDO_FAST if name == "rdo" else {}))
    record = RunRecord.load(out)
    assert record == RunRecord.load(out / "obliteratus.json") and record.preset == name
    assert json.loads(record.to_json()) == json.loads((out / "obliteratus.json").read_text())  # written by the model
    assert record.metrics_after == run.metrics["after"] and record.metrics_before == run.metrics["before"]
    assert 0.0 <= run.metrics["after"]["refusal"] <= 1.0
    if name in STUDY_PRESETS:  # the study chose the edit: its trial, front and pick are in the record
        assert isinstance(record.optimize, StudyRecord) and run.study.chosen.number == record.optimize.trial
        assert run.directions is None and record.selection.method == "optuna"
        assert (out.parent / "out.study" / "study.db").is_file()
    else:
        assert record.optimize is None and run.study is None and record.directions.k == run.directions.k


def test_the_kernel_grid_is_a_strategy_of_the_same_driver(src, tmp_path):
    grid = {"enabled": True, "search": "grid", "max_weight": [1.0], "position": [0.5], "distance": [0.5],
            "min_ratio": [0.0]}
    run = obliterate(str(src), "basic", str(tmp_path / "out"), overrides=SMALL, optimize=grid)
    record = RunRecord.load(tmp_path / "out")
    assert isinstance(record.optimize, GridRecord) and len(record.optimize.trials) == 2
    assert run.search == record.optimize.model_dump()


def test_a_notebook_run_needs_no_reporter_and_a_loaded_model_is_not_reloaded(src, tmp_path, monkeypatch):
    import obliteratus.pipeline as pipeline
    from obliteratus.models.load import summon

    loaded = summon(str(src))

    def no_summon(*args, **kwargs):
        raise AssertionError("a Loaded passed in is used as it is")

    monkeypatch.setattr(pipeline, "summon", no_summon)
    monkeypatch.chdir(tmp_path)  # the study's default folder: obliteratus-runs/<study name>
    run = obliterate(loaded, preset="optimized", **SMALL)
    assert set(run.metrics) == {"before", "after"} and run.loaded is loaded and "summon" not in run.timings
    run.save(tmp_path / "saved")
    assert RunRecord.load(tmp_path / "saved").optimize.study_name == f"obliteratus-{src.name}-optimized"
    assert (tmp_path / "obliteratus-runs" / f"obliteratus-{src.name}-optimized" / "study.db").is_file()
    with pytest.raises(ObliteratusError, match="exists"):
        run.save(tmp_path / "saved")  # the same output checks as output=
    run.save(tmp_path / "saved", overwrite=True)


@pytest.mark.parametrize("name", ["basic", "optimized"])
def test_saving_later_writes_what_output_writes(src, tmp_path, name):
    now = obliterate(str(src), name, str(tmp_path / "now"), **SMALL)
    later = obliterate(str(src), name, **SMALL, study=None if name == "basic" else {}, run_dir=None if name == "basic"
                       else str(tmp_path / "now.study-2"))
    assert later.output is None and not (tmp_path / "later").exists()
    assert later.save(tmp_path / "later").is_dir() and later.output == str((tmp_path / "later").resolve())
    a, b = written(tmp_path / "now"), written(tmp_path / "later")
    if name == "optimized":  # two studies in two storages, identical trials
        a["meta"]["optimize"].pop("storage"), b["meta"]["optimize"].pop("storage")
        a["meta"]["optimize"]["options"].pop("storage"), b["meta"]["optimize"]["options"].pop("storage")
    assert a == b and now.metrics == later.metrics


def test_before_from_another_preset_is_reused_and_checked(src, tmp_path):
    """Comparing presets on one model: run.before of one run is the next run's VERIFY before (not
    measured again), and gives the after-metrics a fresh run gives; other prompts or settings are refused."""
    import obliteratus.pipeline as pipeline

    first = obliterate(str(src), "basic", **merge(SMALL, {"evaluate": {"capability": 2}}))
    assert first.before.metrics["capability_items"] == 22 and "answer_quality" in first.after.metrics
    with_cap = merge(SMALL, {"evaluate": {"capability": 2}})
    fresh = obliterate(str(src), "advanced", **with_cap)
    calls = []
    real = pipeline.evaluate_model
    pipeline.evaluate_model = lambda *a, **k: calls.append(k.get("make_reference")) or real(*a, **k)
    try:
        reused = obliterate(str(src), "advanced", before=first.before, **with_cap)
    finally:
        pipeline.evaluate_model = real
    assert calls == [None] and reused.before is first.before and "verify_before" not in reused.timings
    assert reused.after.metrics == fresh.after.metrics
    with pytest.raises(ConfigError, match="other test prompts"):
        obliterate(str(src), "basic", before=first.before, **merge(with_cap, {"data": {"n_test": 3}}))
    with pytest.raises(ConfigError, match="other evaluate settings"):
        obliterate(str(src), "basic", before=first.before, **SMALL)  # the capability check off
    with pytest.raises(ConfigError, match="make_reference"):
        obliterate(str(src), "basic", before=first.after, **with_cap)


def test_overrides_and_keyword_sections_merge(src, tmp_path):
    run = obliterate(str(src), "basic", overrides=merge(SMALL, {"excise": {"lam": 0.5, "norm_preserve": True}}),
                     excise={"lam": 2.0})
    assert run.settings.excise.lam == 2.0 and run.settings.excise.norm_preserve is True and run.edit.lam == 2.0


def test_study_only_options_and_a_worker(src, tmp_path):
    with pytest.raises(ConfigError, match="options of the optimizer study"):
        obliterate(str(src), "basic", worker=True, **SMALL)
    with pytest.raises(ConfigError, match="--lora"):
        obliterate(str(src), "optimized", lora=str(tmp_path / "ad"), **SMALL)
    run = obliterate(str(src), "optimized", str(tmp_path / "out"), worker=True, run_dir=str(tmp_path / "st"), **SMALL)
    assert run.edit is None and run.study.chosen is None and run.study.front and not (tmp_path / "out").exists()
    with pytest.raises(ObliteratusError, match="worker"):
        run.save(tmp_path / "out")


def test_a_resumed_studys_trial_count_starts_at_its_finished_trials(src, tmp_path):
    """The trials task of a resumed study (total n_trials) is advanced by the trials it already has
    first, so a progress bar shows the study's count, not this run's."""
    from obliteratus.run import Reporter

    class Counts(Reporter):
        def __init__(self):
            self.steps: list[int] = []

        def task(self, label, total):
            return self.steps.append if label == "trials" else (lambda n: None)

    first, again = Counts(), Counts()
    where = dict(worker=True, run_dir=str(tmp_path / "st"), **SMALL)
    obliterate(str(src), "optimized", study={"n_trials": 2}, reporter=first, **where)
    obliterate(str(src), "optimized", study={"n_trials": 3}, reporter=again, **where)
    assert first.steps == [1, 1] and again.steps == [2, 1]


def test_the_record_refuses_what_obliteratus_does_not_write(tmp_path):
    good = {"preset": "basic", "settings": {}, "model": {"source": "m", "path": "m", "family": "llama",
                                                        "model_type": "llama", "n_layers": 3, "d_model": 32,
                                                        "dtype": "float32", "device": "cpu", "tied_lm_head": False},
            "directions": {"method": "diff_means", "k": 1}, "selection": {"layer": 1, "position": -1, "method": "fixed"},
            "edit": {"lam": 1.0, "norm_preserve": False, "k": 1, "edited": [], "variant": "project", "details": {}},
            "metrics_before": {}, "metrics_after": {}, "timings_s": {}, "versions": {}, "seed": 0,
            "splits": {"harmful": {"train": 1}}}
    path = tmp_path / "obliteratus.json"
    path.write_text(json.dumps(good))
    assert RunRecord.load(path).optimize is None
    path.write_text(json.dumps({**good, "metrics_afterr": {}}))
    with pytest.raises(ObliteratusError, match="metrics_afterr"):
        RunRecord.load(path)
    path.write_text(json.dumps({**good, "optimize": {"study_name": "s"}}))
    with pytest.raises(ObliteratusError, match="not an obliteratus run record"):
        RunRecord.load(path)
