"""GGUF out: an edit plan (export/plan.py) applied to a GGUF file, for llama.cpp, Ollama and LM
Studio. Only the tensors the plan edits are rewritten; every other tensor keeps its bytes, and every
metadata key (tokenizer, chat template, hyperparameters) is copied as it was.

An edited tensor is dequantized with the ``gguf`` package (what transformers does when it loads a
GGUF, so the values are those the plan was made on when the run loaded the same file), edited by
``edit_tensor`` in float32, and quantized again: in its own type where the ``gguf`` package can
encode it (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), else as Q8_0 (F16 when a row is not a
whole number of Q8_0 blocks). The K-quants of a Q4_K_M file (Q4_K, Q6_K, ...) cannot be encoded by
the ``gguf`` package, so those tensors become Q8_0: the file grows a little, and the re-quantization
error is reported per tensor (relative RMS of the re-quantized tensor against the edited one).

Names: the plan names tensors as transformers does; ``gguf.get_tensor_name_map`` for the file's
architecture gives their GGUF names (``model.layers.3.self_attn.o_proj.weight`` ->
``blk.3.attn_output.weight``). Every op must find its tensor, with the plan's shape, before
anything is written; the output is written beside its path and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import EditError, ModelNotFoundError, ObliteratusError
from ..excise.projection import all_finite
from ..save import check_output_file, write_file_atomically
from .plan import EditPlanFile, PlannedOp


@dataclass
class GGUFBake:
    output: Path
    edited: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # name -> (old type, new type, rel. RMS)

    def summary(self) -> str:
        changed = {n: v for n, v in self.edited.items() if v[0] != v[1]}
        worst = max((v[2] for v in self.edited.values()), default=0.0)
        kinds = sorted({f"{old} -> {new}" for old, new, _ in changed.values()})
        return (f"{len(self.edited)} tensors edited ({len(changed)} re-quantized in another type: "
                f"{', '.join(kinds) or 'none'}); largest re-quantization error {worst:.2e} (relative RMS)")


def _gguf():
    try:
        import gguf
    except ImportError as err:  # the gguf extra
        raise ObliteratusError("the GGUF bake needs the gguf package: pip install 'obliteratus[gguf]'") from err
    return gguf


def _encodable(gguf) -> set:
    t = gguf.GGMLQuantizationType
    return {t.F32, t.F16, t.BF16, t.Q8_0, t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1}


def _target_type(gguf, qtype, cols: int):
    t = gguf.GGMLQuantizationType
    if qtype in _encodable(gguf):
        return qtype
    return t.Q8_0 if cols % gguf.GGML_QUANT_SIZES[t.Q8_0][0] == 0 else t.F16


def _field_value(reader, name: str):
    f = reader.fields.get(name)
    return None if f is None else f.contents()


def gguf_names(gguf, reader, plan: EditPlanFile) -> dict[str, list[PlannedOp]]:
    """GGUF tensor name -> the plan's ops on it, in order; every op must find its tensor."""
    arch = _field_value(reader, "general.architecture")
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise EditError(f"the GGUF's architecture {arch!r} is not one the gguf package knows")
    blocks = _field_value(reader, f"{arch}.block_count") or 0
    tmap = gguf.get_tensor_name_map(by_name[arch], int(blocks))
    tensors = {t.name: t for t in reader.tensors}
    out: dict[str, list[PlannedOp]] = {}
    lacking = []
    for op in plan.ops:
        names = [n for n in (tmap.get_name(h, try_suffixes=(".weight", ".bias")) for h in op.names) if n in tensors]
        if not names:
            lacking.append(" / ".join(op.names))
            continue
        for name in dict.fromkeys(names):
            t = tensors[name]
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists the innermost axis first
            if shape != op.shape:
                raise EditError(f"{name}: the plan edits a {list(op.shape)} tensor, the GGUF's is {list(shape)}")
            out.setdefault(name, []).append(op)
    if lacking:
        raise EditError(f"the GGUF ({arch}) has no tensor for {', '.join(lacking[:5])}"
                        f"{f' and {len(lacking) - 5} more' if len(lacking) > 5 else ''}")
    return out


def bake_gguf(plan: EditPlanFile, source: str | os.PathLike, output: str | os.PathLike) -> GGUFBake:
    """Write `source` (a .gguf file) to `output` with the plan's tensors edited (module docstring)."""
    gguf = _gguf()
    src = Path(source).expanduser().resolve()
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file {src} not found")
    out = check_output_file(output, sources=(str(src),), inputs=(str(src),),
                            what="a GGUF this command wrote")
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError) as err:
        raise ObliteratusError(f"{src} is not a readable GGUF file: {err}") from err
    edits = gguf_names(gguf, reader, plan)
    arch = _field_value(reader, "general.architecture")
    report = GGUFBake(out)
    targets = {}
    for t in reader.tensors:
        if t.name in edits:
            cols = int(t.shape[0])
            targets[t.name] = _target_type(gguf, t.tensor_type, cols)

    def edited(t) -> np.ndarray:
        # (a copy: the reader's arrays are read-only views of the file)
        w = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True))
        for op in edits[t.name]:
            w = plan.apply_op(op, w)
        if not all_finite(w):
            raise EditError(f"the plan's edit of {t.name} is not finite; nothing was written")
        new = w.numpy()
        target = targets[t.name]
        data = gguf.quantize(new, target)
        back = gguf.dequantize(data, target)
        err = float(np.sqrt(np.mean((back - new) ** 2)) / max(np.sqrt(np.mean(new ** 2)), 1e-12))
        report.edited[t.name] = (t.tensor_type.name, target.name, err)
        return data

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        for f in reader.fields.values():
            if f.name == "general.architecture" or f.name.startswith("GGUF."):
                continue  # (the writer adds these itself)
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            if t.name in targets:
                target = targets[t.name]
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))
                if target in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if target == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(t.name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(shape, target)
                    writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), target)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(edited(t) if t.name in targets else t.data, tensor_endianess=reader.endianess)
        writer.close()

    write_file_atomically(out, write)
    return report
