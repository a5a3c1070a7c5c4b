"""``obliteratus report RUN_DIR``: rebuild a run's report (the page itself: report/html.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..report.html import build_report


def report(run_dir: Path = typer.Argument(..., help="Run directory written by obliterate --output.")) -> None:
    """(Re)build RUN_DIR/report.html and RUN_DIR/plots/*.png from the run's saved metadata."""
    Console().print(f"report: {build_report(run_dir)}", soft_wrap=True)  # a path is never broken
