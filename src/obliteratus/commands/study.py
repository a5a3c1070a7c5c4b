"""``obliteratus study CONFIG.yaml``: run a study's reversible ablations and tabulate them (the runner:
studies/runner.py; the files it writes: studies/save.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..batching import max_positions
from ..data.prompts import read_text
from ..errors import ConfigError
from ..models.load import summon
from ..pipeline import prepare_prompts, split_prompt_sets
from ..presets import load_preset
from ..save import check_output
from ..settings import resolve_settings
from ..studies.runner import load_study, run_study
from ..studies.save import write_study


def study(
    config: Path = typer.Argument(..., help="Study YAML (see examples/studies/)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for study.md / study.json "
                                          "(default: study-<config name> in the current directory)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Run reversible ablations (layers, heads, FFN, embedding dims) and tabulate their effect."""
    spec = load_study(config)
    config_text = read_text(config, ConfigError, "study config")  # saved with the results
    out = output or Path(f"study-{Path(config).stem}")
    check_output(out, overwrite, source=spec.model)  # fail before any work
    settings = resolve_settings(load_preset(spec.preset) if spec.preset else None, spec.settings)
    splits = split_prompt_sets(settings)  # a bad prompt file fails before the model loads
    console = Console(stderr=True)
    loaded = summon(spec.model, settings.model)
    prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
    result = run_study(loaded, prompts, settings, spec,
                       on_row=lambda r: console.print(f"  {r.label}: done in {r.seconds:.1f}s"))
    path = write_study(result, out, overwrite, config_text)
    table = Table(title=f"{spec.name} · {spec.model}")
    table.add_column("ablation")
    for c in result.columns:
        table.add_column(c, justify="right")
    for r in result.rows:
        table.add_row(r.label, *["—" if r.metrics.get(c) is None else f"{r.metrics[c]:.4f}" for c in result.columns])
    Console().print(table)
    Console().print(f"saved to {path}", soft_wrap=True)
