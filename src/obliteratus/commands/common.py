"""What the verbs share: the rich consoles, the progress reporter, the metrics table, the gathering
of CLI overrides and the one-line error exit."""

from __future__ import annotations

import sys
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import ConfigError
from ..record import METRIC_ROWS
from ..settings import deep_merge, nest, parse_value

console = Console(stderr=True)
out = Console()


class RichReporter:
    def __init__(self):
        self.progress = Progress(TextColumn("  {task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[bold cyan]{name.upper()}[/]")

    def task(self, label: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)

    def done(self, name: str, seconds: float) -> None:
        self.progress.console.print(f"  [dim]{name} done in {seconds:.1f}s[/]")


def gather(pairs: dict[str, object], sets: list[str] | None) -> dict:
    """CLI overrides as a nested dict: only options the user gave, then --set key.path=value."""
    flat = {k: v for k, v in pairs.items() if v is not None}
    for item in sets or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        flat[key.strip()] = parse_value(value.strip())
    return deep_merge({}, nest(flat))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metrics_table(before: dict, after: dict | None, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before" if after is not None else "value", justify="right")
    if after is not None:
        table.add_column("after", justify="right")
    for label, key in METRIC_ROWS:
        if key not in before and (after is None or key not in after):
            continue
        cells = [_fmt(before.get(key))] + ([_fmt(after.get(key))] if after is not None else [])
        table.add_row(label, *cells)
    return table


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain text: never wrapped or styled
    sys.exit(code)


__all__ = ["RichReporter", "console", "fail", "gather", "metrics_table", "out"]
