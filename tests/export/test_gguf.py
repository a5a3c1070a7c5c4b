"""GGUF out (issue 27): an edit plan applied to a GGUF file rewrites only the edited tensors, keeps
every other tensor's bytes and every metadata key, keeps an edited tensor's type where the gguf
package can encode it, and says how far re-quantization moved it. (The round trip on the demo
model's Q4_K_M file, through transformers and the gguf reader: benchmarks/gguf_roundtrip.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from obliteratus.errors import EditError, OutputExistsError
from obliteratus.excise.projection import edit_tensor
from obliteratus.export.plan import EditPlanFile, PlannedOp

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
D, VOCAB, FF = 32, 64, 64

# GGUF name, transformers name, shape, type, edited
TENSORS = [
    ("token_embd.weight", "model.embed_tokens.weight", (VOCAB, D), Q.Q8_0, "in_out"),
    ("blk.0.attn_q.weight", None, (D, D), Q.F16, None),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", (D, D), Q.F32, "out_in"),
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", (D, FF), Q.Q4_0, "out_in"),
    ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", (D, FF), Q.Q5_1, "out_in"),
    ("output_norm.weight", None, (D,), Q.F32, None),
]


def _write(path: Path) -> None:
    gen = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_name("tiny")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    for name, _, shape, qtype, _ in TENSORS:
        data = gen.standard_normal(shape).astype(np.float32) * 0.1
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(data, qtype), raw_shape=gguf.quant_shape_to_byte_shape(shape, qtype),
                         raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _plan(**over) -> EditPlanFile:
    q = torch.nn.functional.normalize(torch.randn(1, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    ops = [PlannedOp((hf,), shape, "basis.0", None, 1.0, layout) for _, hf, shape, _, layout in TENSORS if hf]
    return EditPlanFile(ops, {"basis.0": q}, {"model_type": "qwen2", **over})


def test_the_gguf_bake_rewrites_only_the_edited_tensors(tmp_path):
    from obliteratus.export.gguf import bake_gguf

    src, out = tmp_path / "m.gguf", tmp_path / "edited.gguf"
    _write(src)
    before = src.read_bytes()
    plan = _plan()
    report = bake_gguf(plan, src, out)
    assert src.read_bytes() == before
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert [f for f in a.fields if not f.startswith("GGUF.")] == [f for f in b.fields if not f.startswith("GGUF.")]
    for name, f in a.fields.items():
        if not name.startswith("GGUF."):
            assert b.fields[name].contents() == f.contents(), name
    q = plan.bases["basis.0"]
    new = {t.name: t for t in b.tensors}
    for t in a.tensors:
        _, hf, shape, qtype, layout = next(row for row in TENSORS if row[0] == t.name)
        u = new[t.name]
        assert u.tensor_type == t.tensor_type  # every type here is one the gguf package encodes
        if layout is None:
            assert u.data.tobytes() == t.data.tobytes(), t.name
            continue
        want = edit_tensor(torch.from_numpy(np.array(gguf.dequantize(t.data, qtype), copy=True)), q, None, 1.0,
                           layout).numpy()
        got = np.array(gguf.dequantize(u.data, qtype), copy=True)
        assert np.array_equal(gguf.quantize(want, qtype), u.data) if qtype != Q.F32 else np.array_equal(want, got)
        old, kept, err = report.edited[t.name]
        assert old == kept == qtype.name and (err == 0.0 if qtype == Q.F32 else 0 < err < 0.2)
        # the direction is gone up to the re-quantization error
        along = torch.from_numpy(got) @ q.T if layout == "in_out" else q @ torch.from_numpy(got)
        assert float(along.abs().max()) <= (1e-6 if qtype == Q.F32 else 0.2 * float(np.abs(got).max()))
    assert "4 tensors edited" in report.summary()


def test_the_gguf_bake_refuses_what_does_not_fit(tmp_path):
    from obliteratus.export.gguf import bake_gguf

    src = tmp_path / "m.gguf"
    _write(src)
    wrong = _plan()
    wrong.ops[0] = PlannedOp(("model.embed_tokens.weight",), (VOCAB + 1, D), "basis.0", None, 1.0, "in_out")
    with pytest.raises(EditError, match="token_embd.weight"):
        bake_gguf(wrong, src, tmp_path / "o.gguf")
    missing = _plan()
    missing.ops.append(PlannedOp(("model.layers.5.mlp.down_proj.weight",), (D, FF), "basis.0", None, 1.0, "out_in"))
    with pytest.raises(EditError, match="no tensor for"):
        bake_gguf(missing, src, tmp_path / "o.gguf")
    (tmp_path / "o.gguf").write_text("mine")
    with pytest.raises(OutputExistsError):
        bake_gguf(_plan(), src, tmp_path / "o.gguf")
    assert (tmp_path / "o.gguf").read_text() == "mine"


def test_obliterate_gguf_writes_the_runs_plan_into_its_source(tmp_path, capsys):
    """The --gguf step of `obliterate`: the run's plan baked into its source GGUF; a run without a plan
    (a variant that edits by its own rule) is one clear error naming why."""
    from types import SimpleNamespace

    from obliteratus.commands.obliterate import write_gguf
    from obliteratus.errors import ConfigError

    src = tmp_path / "m.gguf"
    _write(src)
    run = SimpleNamespace(edit_plan=_plan, edit=SimpleNamespace(ops_missing=None))
    write_gguf(run, str(src), tmp_path / "edited.gguf")
    assert "4 tensors edited" in capsys.readouterr().out
    assert len(gguf.GGUFReader(str(tmp_path / "edited.gguf")).tensors) == len(TENSORS)
    none = SimpleNamespace(edit_plan=lambda: None, edit=SimpleNamespace(ops_missing="excise.method = 'heads' edits"))
    with pytest.raises(ConfigError, match="'heads'"):
        write_gguf(none, str(src), tmp_path / "other.gguf")
