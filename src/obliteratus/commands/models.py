"""``obliteratus models [--prepare NAME]``: the offline model aliases and the supported architectures."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..models import ALIASES, supported_families
from ..models.aliases import cache_root, is_prepared
from ..models.aliases import prepare as do_prepare
from .common import out


def models(prepare: Optional[str] = typer.Option(None, "--prepare", help="Assemble and convert an alias now.")) -> None:
    """List model aliases and supported architectures; --prepare NAME builds an alias's local cache."""
    if prepare:
        path = do_prepare(prepare)
        out.print(f"{prepare}: {path}", soft_wrap=True)
        return
    table = Table(title="model aliases (offline)")
    for col in ("alias", "model", "prepared", "install"):
        table.add_column(col)
    for alias in ALIASES.values():
        table.add_row(alias.name, alias.description, "yes" if is_prepared(alias.name) else "no", escape(alias.install))
    out.print(table)
    out.print(f"cache: {cache_root()}")
    out.print("architectures: the families of the adapter table (" + ", ".join(supported_families()) + ") and "
              "any other decoder-only causal LM or image-text-to-text model of the installed transformers whose "
              "residual writers architecture discovery finds at load time (benchmarks/coverage.py lists them)",
              soft_wrap=True)
