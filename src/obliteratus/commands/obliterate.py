"""``obliteratus obliterate MODEL``: all six stages through pipeline.obliterate."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from ..export.gguf import bake_gguf
from ..models.aliases import ALIASES, gguf_source
from ..pipeline import obliterate as run_obliterate
from ..save import check_output_file
from .common import RichReporter, metrics_table, out
from .optimize import print_result
from .options import DATA_OPTIONS, JUDGE_OPTION, MODEL_OPTIONS, Opt, settings_options


@settings_options(*MODEL_OPTIONS, *DATA_OPTIONS, "probe.positions", "probe.batch_size",
                  Opt("layers.layer", help="Use this source layer (implies layers.method = fixed).",
                      implies={"layers.method": "fixed"}),
                  Opt("layers.method", name="layer_method"), "evaluate.max_new_tokens", JUDGE_OPTION)
def obliterate(
    model: str = typer.Argument(..., help="Alias (demo, smollm2-135m), local HF directory, .gguf file or hub id."),
    method: str = typer.Option("basic", "--method", "-m", help="Preset name or a .toml file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the edited model."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Also write the edit as a PEFT LoRA adapter here."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Also write the edit into a copy of the source GGUF "
                                                             "(MODEL a .gguf file or a GGUF alias) here."),
    bake_from: Optional[Path] = typer.Option(None, "--bake-from", help="Bake the edit into this full-precision "
                                             "safetensors checkpoint (written to --output) instead of saving the "
                                             "model in memory: for a run on a quantized or offloaded copy."),
    overrides: dict | None = None,
) -> None:
    """Run all six stages: SUMMON, PROBE, DISTILL, EXCISE, VERIFY, REBIRTH. A preset that searches its
    edit with the optimizer study (optimized, heretic) runs it as `obliteratus optimize` does, with its
    settings."""
    if gguf is not None:  # checked before any work
        if not (model.endswith(".gguf") or model in ALIASES):
            gguf_source(model, Path("."))  # the error that says why
        check_output_file(gguf, sources=(model if model.endswith(".gguf") else None,), what="a GGUF this command wrote")
    with RichReporter() as reporter:
        result = run_obliterate(model, method, str(output) if output else None, overwrite=overwrite,
                                overrides=overrides, reporter=reporter, lora=str(lora) if lora else None,
                                bake_from=str(bake_from) if bake_from else None)
    if gguf is not None:
        write_gguf(result, model, gguf)

    if result.study is not None:
        out.print(f"preset {method!r} searched its edit with the optimizer study (as `obliteratus optimize`)")
        print_result(result.study, model, method)
        return
    out.print(metrics_table(result.before.metrics, result.after.metrics,
                            f"{model} · {method} · layer {result.directions.layer} · k={result.directions.k}"))
    times = Table(title="stage times (s)")
    for name in result.timings:
        times.add_column(name, justify="right")
    times.add_row(*[f"{t:.1f}" for t in result.timings.values()])
    out.print(times)
    if result.output:
        out.print(f"saved to {result.output}", soft_wrap=True)


def write_gguf(result, model: str, target: Path) -> None:
    """--gguf: the run's edit plan baked into its source GGUF (export/gguf.py)."""
    plan = result.edit_plan()
    if plan is None:
        why = (result.edit.ops_missing if result.edit is not None else None) or "the run made no weight edit"
        raise ConfigError(f"--gguf: the edit has no plan to write ({why})")
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.expanduser().resolve().parent) as work:
        done = bake_gguf(plan, gguf_source(model, Path(work)), target)
    out.print(f"GGUF: {done.summary()}: {done.output}", soft_wrap=True)
