"""The app's helpers without a browser: the saved-runs table and the output name."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from obliteratus import obliterate  # noqa: E402
from obliteratus.errors import ConfigError  # noqa: E402
from obliteratus.ui.app import output_dir, runs_rows, saved_runs  # noqa: E402

from conftest import merge, save_tiny  # noqa: E402
from support.presets import SMALL  # noqa: E402


def test_saved_runs_table(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    run = obliterate(str(src), "basic", str(tmp_path / "runs" / "a"), **merge(SMALL, {}))
    (tmp_path / "runs" / "not-a-run").mkdir()
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "obliteratus.json").write_text("{")
    found = saved_runs(tmp_path / "runs")
    assert {p.name for p in found} == {"a", "broken"}
    rows = {r[0]: r for r in runs_rows(found)}
    assert rows["a"][1:3] == ["basic", str(src)]
    assert rows["a"][4] == f"{run.metrics['after']['refusal']:.3f}"
    assert rows["broken"][1] == "unreadable"
    assert saved_runs(tmp_path / "nowhere") == []


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "a\\b"])
def test_output_name_is_one_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="one folder name"):
        output_dir(tmp_path, name)
    assert output_dir(tmp_path, " run-2 ") == tmp_path / "run-2"


def test_the_optimize_tab_keeps_the_study_where_the_cli_does(tmp_path):
    """study_place gives the CLI's defaults for the same output (``optimize -o OUT``): the study name
    and ``<OUT>.study/study.db``, so either resumes the other's study; nothing is made on disk."""
    from obliteratus.optimize.strategy import StudyEdit
    from obliteratus.presets import load_preset
    from obliteratus.settings import resolve_settings
    from obliteratus.ui.app import study_place

    out, where, url = study_place(tmp_path, "/models/tiny ", "optimized", "study-1", "")
    cli = StudyEdit(resolve_settings(load_preset("optimized"), {}), "/models/tiny", "optimized", str(out), {}, None,
                    None, False)
    assert where["study"]["study_name"] == cli.name and Path(where["run_dir"]) == cli.run_dir
    assert url == f"sqlite:///{(tmp_path / 'study-1.study' / 'study.db').resolve()}"
    assert not any(tmp_path.iterdir())
    _, where, url = study_place(tmp_path, "m", "heretic", "s", " postgresql://u:p@h/db ")
    assert url == "postgresql://u:p@h/db" and where["run_dir"] is None and where["study"]["storage"] == url


def test_the_study_reader_sees_trials_as_they_are_added(tmp_path):
    """What the Optimize tab streams: the reader reads nothing (and makes no file) before the study
    exists, then the completed trials of each run, the front among them; picking from them and baking
    gives the picked trial."""
    pytest.importorskip("optuna")
    from obliteratus.optimize.study import StudyReader, front_of
    from obliteratus.ui.app import pick_choices, study_place, trial_rows

    src = save_tiny(tmp_path / "src", "llama")
    out, where, url = study_place(tmp_path / "runs", str(src), "optimized", "s", "")
    reader = StudyReader(url, where["study"]["study_name"])
    assert reader.read().trials == [] and not (tmp_path / "runs").exists()
    seen = []
    for n in (2, 4):
        obliterate(str(src), "optimized", study={**where["study"], "n_trials": n}, run_dir=where["run_dir"],
                   worker=True, **SMALL)
        state = reader.read()
        seen.append(state.finished)
        assert {r.number for r in state.trials} <= set(range(n)) and state.front == front_of(state.trials)
    assert seen == [2, 4]
    rows = trial_rows(state)
    assert [int(r[0]) for r in rows] == sorted((r.number for r in state.trials), reverse=True)
    choices = pick_choices(state)
    assert choices[0][1] == "default" and {int(v) for _, v in choices[1:]} == {r.number for r in state.trials}
    picked = state.trials[-1].number
    run = obliterate(str(src), "optimized", str(out), study={**where["study"], "n_trials": state.finished},
                     run_dir=where["run_dir"], pick=picked, **SMALL)
    assert run.study.chosen.number == picked and reader.read().finished == 4  # baking ran no trial


def test_figures_are_the_reports_pngs_in_page_order(tmp_path):
    pytest.importorskip("matplotlib")
    from obliteratus.report import figures
    from obliteratus.ui.app import gallery

    src = save_tiny(tmp_path / "src", "llama")
    obliterate(str(src), "basic", str(tmp_path / "runs" / "a"), **merge(SMALL, {}))
    found = figures(tmp_path / "runs" / "a")
    assert [p.name for p, _ in found][:2] == ["layer_norms.png", "selection.png"] and all(p.is_file() for p, _ in found)
    assert gallery([tmp_path / "runs" / "a"], named=True)[0][1] == "a: direction norm per layer"
    assert figures(tmp_path / "nowhere") == []


@pytest.mark.parametrize("value", [None, "", "many"])
def test_an_empty_number_field_is_one_error_line(value):
    from obliteratus.ui.app import given

    with pytest.raises(ConfigError, match="^trials: give a number$"):
        given(value, "trials", int)
    assert given(3.0, "trials", int) == 3 and given("0.5", "strength") == 0.5


def test_the_study_reader_names_a_storage_it_cannot_reach():
    """A database server that is not there: one error naming the storage without its password (the
    Optimize tab shows it), not an empty study."""
    pytest.importorskip("optuna")
    pytest.importorskip("psycopg2")
    from obliteratus.optimize.study import StudyReader

    with pytest.raises(ConfigError, match="^cannot read the study storage postgresql://") as err:
        StudyReader("postgresql://me:secret@127.0.0.1:1/db", "s").read()
    assert "secret" not in str(err.value)
