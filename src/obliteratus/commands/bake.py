"""``obliteratus bake PLAN --model SRC --output DIR``: a run's edit plan applied to a safetensors
checkpoint shard by shard (export/bake.py), for checkpoints larger than RAM."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..errors import ConfigError

from ..export.bake import bake as bake_checkpoint
from ..export.gguf import bake_gguf
from ..export.plan import load_plan


def bake(plan: Path = typer.Argument(..., help="edit_plan.safetensors, or the run directory that holds it."),
         model: Path = typer.Option(..., "--model", help="Source checkpoint directory (safetensors, sharded or not) "
                                                         "or .gguf file; only read."),
         output: Path = typer.Option(..., "--output", "-o", help="Directory for the edited checkpoint (a .gguf file "
                                                                 "for a GGUF source)."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it is a previous output."),
         skip_hash_check: bool = typer.Option(False, "--skip-hash-check",
                                              help="Bake even where an edited tensor's sha256 differs from the one "
                                                   "the plan recorded (the same model stored differently).")) -> None:
    """Apply a run's edit plan to a full-precision checkpoint one shard at a time (memory: the largest
    edited tensor, not the model), or to a GGUF file (only the edited tensors are rewritten). Every
    other file or tensor is copied; the output is written atomically. When the run loaded a local
    safetensors checkpoint, the plan holds each edited tensor's sha256 there, and a source tensor
    that differs (another model or revision) stops the bake before the output exists."""
    if model.suffix == ".gguf":
        if overwrite:
            raise ConfigError("--overwrite: a GGUF output is never replaced; remove it yourself")
        done = bake_gguf(load_plan(plan), model, output)
        Console().print(f"baked {done.summary()}: {done.output}", soft_wrap=True)
        return
    report = bake_checkpoint(load_plan(plan), model, output, overwrite, check_hashes=not skip_hash_check)
    Console().print(f"baked {len(report.edited)} tensors over {report.shards} shard(s) in {report.seconds:.1f} s: "
                    f"{report.output}", soft_wrap=True)
