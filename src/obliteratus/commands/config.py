"""``obliteratus config [--method PRESET] [--set ...]``: every setting as a commented TOML file
(settings_file.py writes it)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..presets import load_preset
from ..settings import Settings, resolve_settings
from ..settings_file import HEADER, settings_toml
from .common import gather


def config(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="A preset name or .toml file to resolve "
                                                                      "(default: none, the defaults)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any setting, e.g. --set excise.lam=2"),
) -> None:
    """Print every setting as a commented TOML file: the settings a run with --method and --set would
    use (OBLITERATUS_* environment variables applied, secrets redacted); with none of them, the
    defaults, i.e. the shipped default.toml."""
    settings = resolve_settings(load_preset(method) if method else None, gather({}, sets))
    header = HEADER if settings == Settings() else (
        f"# obliteratus settings: {'preset ' + method if method else 'the defaults'}, the OBLITERATUS_* "
        f"environment variables{' and --set' if sets else ''} applied (secrets redacted).\n"
        "# Run with them: --method THIS_FILE.toml\n")
    sys.stdout.write(settings_toml(settings, header))
