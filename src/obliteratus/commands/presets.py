"""``obliteratus presets``: the shipped presets and baselines and what each does."""

from __future__ import annotations

from rich.table import Table

from ..presets import load_preset, preset_names
from .common import out


def presets() -> None:
    """List the presets and what each does."""
    table = Table(title="presets")
    table.add_column("preset")
    table.add_column("kind")
    table.add_column("what it does")
    for name in preset_names():
        data = load_preset(name)
        text = " ".join(data.get("description", "").split())
        if data.get("source"):
            text += f" [source: {data['source']}]"
        table.add_row(name, data.get("kind", "preset"), text)
    out.print(table)
