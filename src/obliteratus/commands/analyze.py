"""``obliteratus analyze MODEL -o DIR``: every analysis on one model (the computation:
analysis/analyze.py; the options' defaults: analysis/options.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..analysis.analyze import analyze as run_analyze
from .common import out
from .options import Opt, command_options, settings_options


@settings_options(Opt("analyze.preset", ("--method", "-m")), "analyze.n_train", "analyze.n_test", "analyze.layers",
                  "analyze.layer", "analyze.probe_method", "analyze.patch_prompts", "analyze.patch_layers",
                  "analyze.top_k")
def analyze(
    model: str = typer.Argument(..., help="Alias, local directory, .gguf file or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for analysis.json."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    overrides: dict | None = None,
) -> None:
    """Probe accuracy/AUROC per layer, logit lens, activation patching, projections, concept cones, PCA."""
    options = command_options(overrides, "analyze")  # its defaults: analysis/options.py
    overrides = {k: v for k, v in overrides.items() if k != "analyze"}
    result = run_analyze(model, str(output), **options.model_dump(), overwrite=overwrite, overrides=overrides)
    direction = result["direction"]
    out.print(f"analysis of {model} (direction from layer {direction['layer']}, chosen by {direction['chosen_by']}) "
              f"written to {output}/analysis.json")
