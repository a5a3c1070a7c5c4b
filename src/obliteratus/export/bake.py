"""The streaming bake: an edit plan (export/plan.py) applied to a safetensors checkpoint one shard
at a time, without loading the model, so a checkpoint larger than RAM can be edited.

Each output shard gets the source shard's header as it is (an edit keeps every tensor's dtype and
shape, so the offsets do not move), then its tensors in file order: a tensor the plan edits is read
alone, edited by the same function as the in-memory edit (``edit_tensor``: bit-identical, large
tensors in slices) and written; every other tensor is copied byte for byte in 64 MiB pieces. Writes
run in a background thread at most two pieces behind, so reading and editing the next tensor overlap
them. Peak memory is a few copies of the largest *edited* tensor (the source, its edit, up to two
writes in flight) plus the edit's float32 slices and the imports (benchmarks/bake_stream.py
measures it), never a shard. Every other file of the checkpoint directory (config,
tokenizer, index, processor, ...) is copied byte for byte. The output is written to a temporary
directory beside it and renamed when complete (save.write_atomically); the source is only read.

Before anything is written, every op of the plan must find its tensor in the checkpoint (by one of
its state-dict names) with the plan's shape, and the checkpoint's ``model_type`` must be the plan's.
A checkpoint that stores a tensor under another name than the loaded model (transformers' weight
conversions: per-expert MoE tensors fused at load) is refused with the names it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EditError, ModelNotFoundError, ObliteratusError
from ..save import MARKER, OWNER, check_output, write_atomically
from ..excise.projection import all_finite
from .plan import EditPlanFile, PlannedOp

INDEX = "model.safetensors.index.json"
PIECE = 64 << 20  # bytes copied at a time
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class BakeReport:
    output: Path
    edited: list[str] = field(default_factory=list)  # checkpoint tensor names
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def shards_of(source: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    if (source / INDEX).is_file():
        weight_map = json.loads((source / INDEX).read_text("utf-8")).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise ModelNotFoundError(f"{source / INDEX} names shards that are not there: {', '.join(missing)}")
        return [source / n for n in names]
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    raise ModelNotFoundError(f"{source} has no model.safetensors or {INDEX}: the bake reads safetensors "
                             "checkpoints only (a .bin checkpoint: load and save it with transformers first)")


def read_header(path: Path) -> tuple[bytes, dict, int]:
    """(the raw length + header bytes, the parsed header, where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ObliteratusError(f"{path} is not a safetensors file (shorter than its header length)")
        n = int.from_bytes(head, "little")
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ObliteratusError(f"{path} is not a safetensors file (its header length is past its end)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ObliteratusError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
    return head + raw, header, 8 + n


def _matches(plan: EditPlanFile, headers: dict[Path, dict]) -> dict[str, list[PlannedOp]]:
    """Checkpoint tensor name -> the plan's ops on it, in order; every op must find its tensor."""
    where = {name: info for h in headers.values() for name, info in h.items() if name != "__metadata__"}
    out: dict[str, list[PlannedOp]] = {}
    lacking = []
    for op in plan.ops:
        present = [n for n in op.names if n in where]
        if not present:
            lacking.append(" / ".join(op.names))
            continue
        for name in present:
            info = where[name]
            if tuple(info["shape"]) != op.shape:
                raise EditError(f"{name}: the plan edits a {list(op.shape)} tensor, the checkpoint's is "
                                f"{info['shape']}: another model size")
            if info["dtype"] not in DTYPES:
                raise EditError(f"{name} is stored as {info['dtype']}: the bake edits floating-point tensors only")
            out.setdefault(name, []).append(op)
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise EditError(f"the checkpoint has no tensor {shown}: it stores the weights under other names than the "
                        "model the plan was made on (another architecture, or a format transformers converts at load, "
                        "such as per-expert MoE tensors); load it, apply the plan in memory and save instead")
    return out


class _Writer:
    """Writes in a background thread, in order, at most `depth` pieces behind: the next tensor is
    read and edited while the last one is written (file I/O releases the GIL)."""

    def __init__(self, out, depth: int = 2):
        self.out, self.depth = out, depth
        self.pool = ThreadPoolExecutor(max_workers=1)  # one worker: the writes keep their order
        self.pending: deque = deque()

    def write(self, data) -> None:
        self.pending.append(self.pool.submit(self.out.write, data))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _copy_range(src, dst: _Writer, start: int, length: int) -> None:
    src.seek(start)
    while length:
        piece = src.read(min(PIECE, length))
        if not piece:
            raise ObliteratusError("a safetensors file ended before its last tensor")
        dst.write(piece)
        length -= len(piece)


def bake_shard(src: Path, dst: Path, plan: EditPlanFile, edits: dict[str, list[PlannedOp]],
               head: tuple[bytes, dict, int] | None = None, digests: dict[str, str] | None = None) -> list[str]:
    """Write `src` to `dst` with the tensors named in `edits` edited; returns their names. `head` is
    ``read_header(src)`` when the caller has read it already; `digests` (name -> sha256 of the stored
    bytes, the plan's :attr:`~EditPlanFile.digests`) are checked on each edited tensor as it is read."""
    raw, header, start = head or read_header(src)
    entries = sorted(((name, info) for name, info in header.items() if name != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    done = []
    with open(src, "rb") as f, open(dst, "wb") as file:
        out = _Writer(file)
        try:
            _bake_entries(f, out, raw, start, entries, plan, edits, src, done, digests or {})
        finally:
            out.close()
    return done


def _bake_entries(f, out: _Writer, raw: bytes, start: int, entries, plan: EditPlanFile,
                  edits: dict[str, list[PlannedOp]], src: Path, done: list[str], digests: dict[str, str]) -> None:
    out.write(raw)
    pos = 0
    for name, info in entries:
        begin, end = info["data_offsets"]
        if begin > pos:  # (padding between tensors, if a writer left any: kept as it is)
            _copy_range(f, out, start + pos, begin - pos)
        if name not in edits:
            _copy_range(f, out, start + begin, end - begin)
        else:
            # read into a tensor torch allocated (aligned as the loaded model's tensors are: BLAS may
            # round differently on a misaligned buffer)
            w = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            raw_w = w.view(-1).view(torch.uint8).numpy()
            f.seek(start + begin)
            if raw_w.nbytes != end - begin or f.readinto(memoryview(raw_w)) != raw_w.nbytes:
                raise ObliteratusError(f"{src}: {name} is cut short")
            if name in digests and hashlib.sha256(memoryview(raw_w)).hexdigest() != digests[name]:
                raise EditError(f"{src}: {name} is not the tensor the plan was made on (its sha256 differs): another "
                                "model or revision; pass --skip-hash-check only if it is the same model stored "
                                "differently")
            for op in edits[name]:
                w = plan.apply_op(op, w)
            if not all_finite(w):
                raise EditError(f"the plan's edit of {name} is not finite; nothing was written")
            out.write(w.contiguous().view(-1).view(torch.uint8).numpy())  # (the array keeps w alive)
            del w, raw_w
            done.append(name)
        pos = end
    size = os.fstat(f.fileno()).st_size
    if start + pos < size:
        _copy_range(f, out, start + pos, size - start - pos)


def bake(plan: EditPlanFile, source: str | os.PathLike, output: str | os.PathLike,
         overwrite: bool = False, check_hashes: bool = True) -> BakeReport:
    """Apply `plan` to the safetensors checkpoint in directory `source`, writing the edited checkpoint
    (with every other file of the directory) to `output`, atomically. The source is only read. With
    `check_hashes`, every edited tensor whose sha256 the plan holds must have it."""
    prepared = prepare_bake(plan, source)
    out = check_output(output, overwrite, source=str(prepared.source))
    write_atomically(out, overwrite, lambda tmp: prepared.fill(tmp, check_hashes))
    prepared.report.output = out
    return prepared.report


@dataclass
class PreparedBake:
    """A bake whose checks passed (:func:`prepare_bake`); :meth:`fill` writes it into a directory."""

    plan: EditPlanFile
    source: Path
    shards: list[Path]
    heads: dict[Path, tuple[bytes, dict, int]]
    edits: dict[str, list[PlannedOp]]
    report: BakeReport

    def fill(self, tmp: Path, check_hashes: bool = True) -> None:
        """Write the edited checkpoint and every other file of the source directory into `tmp`."""
        t0 = time.perf_counter()
        src, report, edits = self.source, self.report, self.edits
        digests = self.plan.digests if check_hashes else {}
        shard_set = set(self.shards)
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.name in (MARKER, OWNER) or path.is_dir():
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path in shard_set:
                names = {n for n in self.heads[path][1] if n in edits}
                report.edited += bake_shard(path, target, self.plan, {n: edits[n] for n in names}, self.heads[path],
                                            digests)
            else:
                shutil.copy2(path, target)
            report.bytes_written += target.stat().st_size
        (tmp / "obliteratus_bake.json").write_text(json.dumps({
            "source": str(src), "plan_model": self.plan.model, "edited": sorted(report.edited),
            "ops": len(self.plan.ops), "hashes_checked": bool(digests)}, indent=2) + "\n", "utf-8")
        report.edited.sort()
        report.seconds += time.perf_counter() - t0


def prepare_bake(plan: EditPlanFile, source: str | os.PathLike) -> PreparedBake:
    """Check that `plan` applies to the checkpoint in directory `source` (names, shapes, dtypes, model
    type) without writing anything."""
    t0 = time.perf_counter()
    src = Path(source).expanduser().resolve()
    if not src.is_dir():
        raise ModelNotFoundError(f"{src} is not a checkpoint directory" + (
            " (a GGUF file: export/gguf.py bakes those)" if src.suffix == ".gguf" else ""))
    shards = shards_of(src)
    config = src / "config.json"
    config = json.loads(config.read_text("utf-8")) if config.is_file() else {}
    model_type = config.get("model_type")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise EditError(f"{src} is a {method} checkpoint: its weights are stored quantized; bake the plan into the "
                        "full-precision checkpoint it was made from")
    want = plan.model.get("model_type")
    if want and model_type and want != model_type:
        raise EditError(f"the plan was made on a {want!r} model; {src} is a {model_type!r} checkpoint")
    heads = {s: read_header(s) for s in shards}
    edits = _matches(plan, {s: head[1] for s, head in heads.items()})
    return PreparedBake(plan, src, shards, heads, edits, BakeReport(src, shards=len(shards),
                                                                    seconds=time.perf_counter() - t0))


def source_digests(plan: EditPlanFile, source: str | os.PathLike) -> dict[str, str]:
    """sha256 of the stored bytes of every tensor `plan` edits in the safetensors checkpoint `source`
    (the plan's identity check, :attr:`EditPlanFile.digests`); {} when `source` is not one."""
    src = Path(source).expanduser()
    try:
        shards = shards_of(src) if src.is_dir() else []
    except ModelNotFoundError:
        return {}
    wanted = {name for op in plan.ops for name in op.names}
    out = {}
    for shard in shards:
        _, header, start = read_header(shard)
        with open(shard, "rb") as f:
            for name, info in header.items():
                if name in wanted and name != "__metadata__":
                    begin, end = info["data_offsets"]
                    f.seek(start + begin)
                    digest, left = hashlib.sha256(), end - begin
                    while left:
                        piece = f.read(min(PIECE, left))
                        if not piece:
                            raise ObliteratusError(f"{shard}: {name} is cut short")
                        digest.update(piece)
                        left -= len(piece)
                    out[name] = digest.hexdigest()
    return out
