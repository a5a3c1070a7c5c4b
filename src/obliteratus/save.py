"""REBIRTH: write the edited model as a normal Hugging Face checkpoint (safetensors), with the
run's metadata, its directions and a model card. Written to a temporary directory beside the
target and renamed into place, so a failure leaves nothing half-written."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .errors import ObliteratusError, OutputExistsError


def check_output(out: str | os.PathLike, overwrite: bool, source: str | None = None) -> Path:
    """Validate the output path before any work is done."""
    path = Path(out).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists() and path == Path(source).expanduser().resolve():
        raise ObliteratusError(f"output {path} is the source model; the source is never modified")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output directory {path} exists; pass --overwrite to replace it")
    return path


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("obliteratus", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def write_atomically(out: Path, overwrite: bool, fill) -> Path:
    """Call `fill(tmp_dir)`, then move tmp_dir to `out` (replacing it only when `overwrite`)."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(meta: dict) -> str:
    before, after = meta.get("metrics_before", {}), meta.get("metrics_after", {})

    def row(name: str, key: str, fmt: str = "{:.3f}") -> str:
        b, a = before.get(key), after.get(key)
        show = lambda v: "—" if v is None else fmt.format(v)  # noqa: E731
        return f"| {name} | {show(b)} | {show(a)} |"

    sel = meta.get("selection", {})
    return "\n".join([
        "---",
        "tags: [obliteratus, abliteration]",
        "---",
        f"# {Path(meta['model']['source']).name} — abliterated with obliteratus ({meta['preset']})",
        "",
        f"Source: `{meta['model']['source']}` ({meta['model']['family']}, {meta['model']['n_layers']} layers).",
        f"Directions: {meta['directions']['method']}, k = {meta['directions']['k']}, from layer "
        f"{sel.get('layer')} (position {sel.get('position')}), selected by `{sel.get('method')}`.",
        f"Edit: lambda = {meta['edit']['lam']}, norm-preserving = {meta['edit']['norm_preserve']}, "
        f"{len(meta['edit']['edited'])} tensors edited.",
        "",
        "Evaluated on held-out prompts never used to find the directions:",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        row("refusal rate (harmful test)", "refusal"),
        row("over-refusal (harmless test)", "over_refusal"),
        row("KL first token (harmless)", "kl_first"),
        row("KL mean over first tokens (harmless)", "kl_mean"),
        row("perplexity (held-out text)", "perplexity", "{:.2f}"),
        "",
        "All parameters, per-layer scores and timings are in `obliteratus.json`; the directions are in "
        "`directions.safetensors`.",
        "",
    ])


def save_run(model, tokenizer, out: str | os.PathLike, metadata: Callable[[], dict], tensors: dict[str, torch.Tensor],
             overwrite: bool = False, steering=None, pca: dict | None = None) -> Path:
    """Save the (edited) model, tokenizer, ``obliteratus.json``, ``directions.safetensors`` and README.md.
    `metadata` is called after the weights are written, so it can include the time that took.
    A ``steering.SteeringSpec`` is written beside them (``summon`` attaches it again), and `pca`
    (:func:`analysis.pca.run_pca`: the report's PCA panels) as ``pca.json``."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = metadata()
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()},
                  str(tmp / "directions.safetensors"),
                  metadata={"method": str(meta["directions"]["method"])})
        (tmp / "obliteratus.json").write_text(json.dumps(meta, indent=2, default=str), "utf-8")
        (tmp / "README.md").write_text(model_card(meta), "utf-8")
        if steering is not None:
            from .steering import write_steering_files

            write_steering_files(steering, tmp)
        if pca is not None:
            (tmp / "pca.json").write_text(json.dumps(pca), "utf-8")
        from .report import build_report  # report.html + plots/ (panels need matplotlib; noted when missing)

        build_report(tmp)

    return write_atomically(Path(out), overwrite, fill)
