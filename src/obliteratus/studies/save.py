"""A study's results on disk: study.md, study.json and the config used (``obliteratus study``; the
verb is commands/study.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..save import write_atomically


def write_study(result, out: Path, overwrite: bool, config_text: str) -> Path:
    """study.md, study.json and the config used, written atomically into `out`."""

    def fill(tmp: Path) -> None:
        (tmp / "study.md").write_text(result.to_markdown(), "utf-8")
        (tmp / "study.json").write_text(json.dumps(result.to_dict(), indent=2), "utf-8")
        (tmp / "study.yaml").write_text(config_text, "utf-8")

    return write_atomically(out, overwrite, fill)


__all__ = ["write_study"]
