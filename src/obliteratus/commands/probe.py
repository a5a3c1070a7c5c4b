"""``obliteratus probe MODEL -o DIR``: PROBE alone, saving the activations and the per-layer norms."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table
from safetensors.torch import save_file

from ..batching import max_positions
from ..directions.diff_means import mean_difference
from ..models.load import summon
from ..pipeline import prepare_prompts, split_prompt_sets
from ..pipeline import probe as run_probe
from ..save import check_output, write_atomically
from ..settings import resolve_settings
from .common import RichReporter, out
from .options import MODEL_OPTIONS, settings_options


@settings_options("probe.positions", "probe.batch_size", "data.n_train", *MODEL_OPTIONS)
def probe(
    model: str = typer.Argument(...),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for activations.safetensors and norms.json."),
    overwrite: bool = typer.Option(False),
    overrides: dict | None = None,
) -> None:
    """PROBE alone: save train-split activations and the per-layer difference-of-means norms."""
    settings = resolve_settings(None, overrides)
    check_output(output, overwrite, source=model)
    splits = split_prompt_sets(settings)  # a bad prompt file fails before the model loads
    with RichReporter() as reporter:
        start = time.perf_counter()
        loaded = summon(model, settings.model)
        prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
        cache = run_probe(loaded, prompts, settings, reporter)
        seconds = time.perf_counter() - start
    diffs = mean_difference(cache.harmful, cache.harmless)  # [k, L+1, d]
    norms = diffs.norm(dim=-1)  # [k, L+1]

    def fill(tmp: Path) -> None:
        save_file({"harmful": cache.harmful, "harmless": cache.harmless, "mean_diff": diffs},
                  str(tmp / "activations.safetensors"))
        (tmp / "norms.json").write_text(json.dumps({"model": model, "layer_norms": norms.tolist(),
                                                    "shape": list(cache.harmful.shape), "seconds": seconds}, indent=2))

    write_atomically(output, overwrite, fill)
    table = Table(title=f"‖mean(harmful) − mean(harmless)‖ per layer (last position) · {model}")
    table.add_column("layer", justify="right")
    table.add_column("norm", justify="right")
    for i, v in enumerate(norms[-1].tolist()):
        table.add_row("embed" if i == 0 else str(i), f"{v:.3f}")
    out.print(table)
    out.print(f"saved to {output}", soft_wrap=True)
