"""The app's helpers without a browser: the saved-runs table and the output name."""

from __future__ import annotations

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
