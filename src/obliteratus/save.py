"""REBIRTH: write the edited model as a normal Hugging Face checkpoint (safetensors), with the
run's metadata, its directions and a model card. Written to a temporary directory beside the
target and renamed into place, so a failure leaves nothing half-written."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .errors import ObliteratusError, OutputExistsError
from .models.aliases import ALIASES, cache_root
from .record import RunRecord
from .report import build_report
from .steering import write_steering_files


MARKER = ".obliteratus-output"  # written into every directory write_atomically creates
# Outputs written before the marker existed: a file that only this tool's verbs write.
LEGACY_OUTPUTS = ("obliteratus.json", "norms.json", "analysis.json", "study.json")


def source_path(source: str | os.PathLike | None) -> Path | None:
    """The local files of `source`: its directory, its .gguf file or an alias's converted cache."""
    if source is None:
        return None

    path = cache_root() / str(source) if str(source) in ALIASES else Path(source).expanduser()
    return path.resolve() if path.exists() else None


def cache_roots() -> list[Path]:
    """The caches models are read from: the alias cache and the Hugging Face hub cache."""
    from huggingface_hub import constants

    return [cache_root().expanduser().resolve(), Path(constants.HF_HUB_CACHE).expanduser().resolve()]


def overlaps(a: Path, b: Path) -> bool:
    """`a` and `b` (resolved) are the same path or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def is_previous_output(path: Path) -> bool:
    """A directory this tool wrote (it holds the marker, or a file only our verbs write)."""
    return (path / MARKER).is_file() or any((path / name).is_file() for name in LEGACY_OUTPUTS)


def check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path`'s parent must be a directory we can create entries in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ObliteratusError(f"output {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".obliteratus-write-check-", dir=parent)
    except OSError as err:
        raise ObliteratusError(f"output {path}: cannot write in {parent} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def refuse_protected(path: Path, sources: tuple[str | None, ...], relation: str, hint: str = "") -> None:
    """Raise when `path` (resolved) overlaps one of the `sources`' files or a model cache."""
    for src in (source_path(s) for s in sources):
        if src is not None and overlaps(path, src):
            raise ObliteratusError(f"output {path} {relation} the source model {src}; the source is never modified{hint}")
    for root in cache_roots():
        if overlaps(path, root):
            raise ObliteratusError(f"output {path} {relation} the model cache {root}; caches are never modified{hint}")


def check_output(out: str | os.PathLike, overwrite: bool, source: str | None = None,
                 others: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Validate the output path before any work is done. It must not contain or lie inside the
    source model, a model cache or another output of the same command (`others`); an existing
    directory is replaced only with `overwrite`, and only when it is empty or a previous output of
    this tool; the directory it goes in must be writable."""
    path = Path(out).expanduser().resolve()
    src = source_path(source)
    if src is not None and path == src:
        raise ObliteratusError(f"output {path} is the source model; the source is never modified")
    refuse_protected(path, (source,), "overlaps", ": choose a directory outside it")
    for other in others:
        if other is not None and overlaps(path, Path(other).expanduser().resolve()):
            raise ObliteratusError(f"output {path} overlaps the other output {Path(other).expanduser().resolve()}; "
                                   "give each output its own directory")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output directory {path} exists; pass --overwrite to replace it")
    if path.exists() and any(path.iterdir()) and not is_previous_output(path):
        raise OutputExistsError(f"output directory {path} exists and is not an obliteratus output (it has no "
                                f"{MARKER} or {'/'.join(LEGACY_OUTPUTS)}); --overwrite replaces only an empty "
                                "directory or a previous output: remove it yourself or choose another path")
    check_writable(path)
    return path


def check_output_file(out: str | os.PathLike, sources: tuple[str | None, ...] = (),
                      inputs: tuple[str | os.PathLike, ...] = (),
                      replaceable: Callable[[Path], bool] | None = None, what: str = "an output of this command") -> Path:
    """Validate an output *file* before any work: not inside a source model or a model cache, not
    one of the command's `inputs`, not a directory; an existing file is replaced only when
    `replaceable(path)` says it is a previous output; the directory it goes in must be writable."""
    path = Path(out).expanduser().resolve()
    refuse_protected(path, sources, "is inside")
    for item in inputs:
        if Path(item).expanduser().resolve() == path:
            raise ObliteratusError(f"output {path} is also the input file; write the output to another file")
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a directory; give a file name")
    if path.exists() and not (replaceable is not None and replaceable(path)):
        raise OutputExistsError(f"output {path} exists and is not {what}; remove it yourself or choose another path")
    check_writable(path)
    return path


def write_file_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_file)` beside `out`, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("obliteratus", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


OWNER = ".obliteratus-owner"  # in each temporary directory: the pid and host of the process writing it
_TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)-[a-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temp_dir(parent: Path, name: str, kind: str) -> Path:
    """A new ``.NAME.KIND-PID-XXXX`` directory in `parent` that records its owner (pid and host)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
    (tmp / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), "utf-8")
    return tmp


def remove_stale(parent: Path) -> list[str]:
    """Remove the temporary directories in `parent` that a killed write left behind (their process,
    on this host, is gone); returns one note per directory removed or left in place."""
    notes = []
    if not parent.is_dir():
        return notes
    for entry in sorted(parent.iterdir()):
        match = _TEMP.match(entry.name)
        if not match or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / OWNER).read_text("utf-8"))
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"{entry} looks like an unfinished write by another obliteratus process; it is left in "
                         "place: remove it if no obliteratus process is writing there")
            continue
        if host != socket.gethostname() or _alive(pid):
            continue  # still being written (or another machine's: we cannot tell)
        shutil.rmtree(entry, ignore_errors=True)
        notes.append(f"removed {entry}, left by an interrupted write (process {pid} is gone)")
    return notes


def write_atomically(out: Path, overwrite: bool, fill) -> Path:
    """Call `fill(tmp_dir)`, then move tmp_dir to `out` (replacing it only when `overwrite`).
    The directory is marked as this tool's output (MARKER); temporary directories of earlier writes
    in the same parent whose process was killed are removed first, with a note on stderr."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for note in remove_stale(out.parent):
        print(f"note: {note}", file=sys.stderr)
    tmp = _temp_dir(out.parent, out.name, "tmp")
    try:
        fill(tmp)
        (tmp / OWNER).unlink()
        (tmp / MARKER).write_text(json.dumps({"tool": "obliteratus"}) + "\n", "utf-8")
        if out.exists():
            old = _temp_dir(out.parent, out.name, "old")
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
        row("answer quality (compliant harmful answers)", "answer_quality"),
        row("capability check (multiple choice, accuracy)", "capability"),
        "",
        "All parameters, per-layer scores and timings are in `obliteratus.json`; the directions are in "
        "`directions.safetensors`.",
        "",
    ])


def save_run(model, tokenizer, out: str | os.PathLike, metadata: Callable[[], RunRecord | dict],
             tensors: dict[str, torch.Tensor], overwrite: bool = False, steering=None, pca: dict | None = None,
             plan=None, weights: Callable[[Path], None] | None = None) -> Path:
    """Save the (edited) model, tokenizer, ``obliteratus.json``, ``directions.safetensors`` and README.md.
    `metadata` (the run record, record.RunRecord; a dict is validated into one) is called after the
    weights are written, so it can include the time that took. A ``steering.SteeringSpec`` is written
    beside them (``summon`` attaches it again), and `pca` (:func:`analysis.pca.run_pca`: the report's
    PCA panels) as ``pca.json``, and the edit plan (export/plan.py ``EditPlanFile``) as
    ``edit_plan.safetensors``. `weights` writes the weights (and config) into the directory instead of
    ``model.save_pretrained``: the streaming bake of the plan into a full-precision checkpoint
    (export/bake.py, for a quantized or offloaded run)."""

    def fill(tmp: Path) -> None:
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            weights(tmp)
        tokenizer.save_pretrained(tmp)
        record = metadata()
        record = record if isinstance(record, RunRecord) else RunRecord.model_validate(record)
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()},
                  str(tmp / "directions.safetensors"),
                  metadata={"method": str(record.directions.method)})
        (tmp / "obliteratus.json").write_text(record.to_json(), "utf-8")
        (tmp / "README.md").write_text(model_card(record.model_dump()), "utf-8")
        if steering is not None:
            write_steering_files(steering, tmp)
        if pca is not None:
            (tmp / "pca.json").write_text(json.dumps(pca), "utf-8")
        if plan is not None:
            plan.save(tmp / "edit_plan.safetensors")
        build_report(tmp)  # report.html + plots/ (panels need matplotlib; noted when missing)

    return write_atomically(Path(out), overwrite, fill)
