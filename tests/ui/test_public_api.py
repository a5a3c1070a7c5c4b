"""The web app adds no model logic: every obliteratus name it imports is one of the public API's (what
the CLI and a notebook use), it imports no tensor library, and `obliteratus ui` fails cleanly without
Gradio or with a bad --auth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

UI = REPO / "src" / "obliteratus" / "ui"
# module -> the names the app may take from it
PUBLIC = {
    "obliteratus": {"obliterate", "Run", "RunRecord"},
    "obliteratus.pipeline": {"obliterate"},
    "obliteratus.chat": {"ChatOptions", "ChatSession"},
    "obliteratus.errors": {"ConfigError", "ObliteratusError"},
    "obliteratus.export.plan": {"apply_plan"},
    "obliteratus.models.load": {"summon"},
    "obliteratus.optimize.strategy": {"default_study_name"},
    "obliteratus.optimize.study": {"StudyReader", "storage_url"},
    "obliteratus.report": {"figures"},
    "obliteratus.report.plots": {"pareto_front", "ready"},
    "obliteratus.presets": {"preset_names"},
    "obliteratus.record": {"METRIC_ROWS", "RunRecord"},
    "obliteratus.run": {"Reporter"},
}
THIRD_PARTY = {"gradio", "PIL", "__future__", "html", "io", "json", "os", "queue", "threading", "time",
               "traceback", "dataclasses", "typing", "pathlib"}


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in `path`, relative imports resolved inside obliteratus.ui."""
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "obliteratus.ui".split(".")
            module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out += [(module, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted(UI.glob("*.py")), ids=lambda p: p.name)
def test_the_ui_imports_only_the_public_api(path):
    for module, name in imports(path):
        if module.startswith("obliteratus.ui"):
            continue
        if module.startswith("obliteratus"):
            assert module in PUBLIC and name in PUBLIC[module], f"{path.name} imports {module}.{name}"
        else:
            assert module.split(".")[0] in THIRD_PARTY, f"{path.name} imports {module} (no tensor code in the UI)"


def test_the_check_sees_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..excise.projection import edit_tensor\nimport torch\n")
    found = imports(bad)
    assert ("obliteratus.excise.projection", "edit_tensor") in found and ("torch", None) in found


def test_the_verb_without_gradio_and_with_a_bad_login(monkeypatch):
    import importlib.util

    from obliteratus.commands.ui import ui
    from obliteratus.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'obliteratus\[ui\]'"):
        ui("demo", Path("runs"), "127.0.0.1", 7860, None, False)
    monkeypatch.undo()
    for bad in ("user", "user:", ":pw"):
        with pytest.raises(ConfigError, match="USER:PASSWORD"):
            ui("demo", Path("runs"), "127.0.0.1", 7860, bad, False)
