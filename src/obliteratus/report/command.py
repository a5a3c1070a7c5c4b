"""``obliteratus report RUN_DIR``: typer-style command function (registered by cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def report(run_dir: Path = typer.Argument(..., help="Run directory written by obliterate --output.")) -> None:
    """(Re)build RUN_DIR/report.html and RUN_DIR/plots/*.png from the run's saved metadata."""
    from rich.console import Console

    from .html import build_report

    Console().print(f"report: {build_report(run_dir)}", soft_wrap=True)  # a path is never broken
