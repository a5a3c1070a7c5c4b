"""The edit plan and the streaming bake (issue 27): a plan replayed shard by shard on a sharded
safetensors checkpoint gives exactly the tensors of the in-memory edit, every tensor it does not
edit keeps its bytes, the source is never written, and what does not fit is refused before any
output exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import tiny_model, tiny_tokenizer
from obliteratus.errors import EditError, ModelNotFoundError, OutputExistsError
from obliteratus.excise.apply import excise
from obliteratus.excise.plan import EditPlan
from obliteratus.export.bake import bake, read_header, shards_of
from obliteratus.export.plan import PLAN_FILE, apply_plan, load_plan, plan_of
from obliteratus.models import ArchitectureAdapter
from obliteratus.settings import ExciseSettings
from support.checkpoints import checkpoint_tensors
from support.cli import FAST, assert_one_error, run_cli, tree_hash as digest


def _checkpoint(family: str, path: Path, dtype=torch.float32) -> Path:
    """A tiny model saved in several shards (and its tokenizer)."""
    tiny_model(family).to(dtype).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _unit(d: int, seed: int, k: int = 1) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0].T
    return q.contiguous()


# (family, dtype, settings, plan): norm preservation, Conv1D writers with biases and a tied embedding
# (GPT-2), two directions with a per-writer strength table and an oblique read, bfloat16 storage
CASES = {
    "llama-norm-preserving": ("llama", torch.float32, ExciseSettings(norm_preserve=True), None),
    "gpt2-biases-tied": ("gpt2", torch.float32, ExciseSettings(biases=True), None),
    "qwen2-k2-kernel-oblique": ("qwen2", torch.float32, ExciseSettings(), "kernel"),
    "llama-bf16": ("llama", torch.bfloat16, ExciseSettings(), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_streamed_bake_is_the_in_memory_edit(case, tmp_path):
    family, dtype, settings, extra = CASES[case]
    src = _checkpoint(family, tmp_path / "src", dtype)
    assert len(shards_of(src)) >= 3
    before = digest(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    adapter = ArchitectureAdapter(model)
    plan = None
    k = 2 if extra else 1
    q = _unit(adapter.d_model, 0, k)
    if extra == "kernel":
        strength = {(kind, i): 0.5 + 0.25 * i for kind in ("attn", "mlp") for i in range(adapter.n_layers)}
        strength[("embed", None)] = 1.0
        plan = EditPlan(strength=strength, read=q + 0.1 * _unit(adapter.d_model, 1, k))
    report = excise(adapter, q, settings, plan)
    saved = plan_of(model, report.ops, model.config.model_type, str(src))
    saved.save(tmp_path / PLAN_FILE)
    loaded = load_plan(tmp_path / PLAN_FILE)
    assert loaded.metadata() == saved.metadata()

    result = bake(loaded, src, tmp_path / "out")
    assert digest(src) == before  # the source is only read
    edited, source, baked = model.state_dict(), checkpoint_tensors(src), checkpoint_tensors(tmp_path / "out")
    assert set(baked) == set(source)
    names = {n for op in loaded.ops for n in op.names} & set(source)
    assert set(result.edited) == names and names
    for name, t in baked.items():
        assert t.dtype == source[name].dtype
        if name in names:
            assert torch.equal(t, edited[name]), name  # bit-identical to the in-memory edit
            assert not torch.equal(t, source[name]), name
        else:
            assert _raw(t) == _raw(source[name]), name  # byte for byte
    for shard in shards_of(src):  # same headers: same names, dtypes, shapes and offsets
        assert read_header(shard)[0] == read_header(tmp_path / "out" / shard.name)[0]
    for other in ("config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"):
        assert (tmp_path / "out" / other).read_bytes() == (src / other).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, edited[name]), name


def test_apply_plan_replays_the_edit_in_memory(tmp_path):
    src = _checkpoint("llama", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    adapter = ArchitectureAdapter(model)
    q = _unit(adapter.d_model, 0)
    first = excise(adapter, q, ExciseSettings())
    second = excise(adapter, _unit(adapter.d_model, 3), ExciseSettings(norm_preserve=True))  # a second pass
    plan = plan_of(model, [*first.ops, *second.ops], "llama", str(src))
    copy = AutoModelForCausalLM.from_pretrained(src)
    edited = apply_plan(copy, plan)
    assert edited and set(edited) == {n for op in plan.ops for n in op.names}
    for name, t in copy.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name


def test_apply_plan_at_a_strength_from_an_unedited_source(tmp_path):
    """strength scales every op's λ·s: the plan at strength 0.5 is excise at lam 0.5; read from an
    unedited source, the same copy can be set to any strength again (nothing compounds)."""
    src = _checkpoint("llama", tmp_path / "src")
    original = AutoModelForCausalLM.from_pretrained(src)
    q = _unit(32, 0)
    full = AutoModelForCausalLM.from_pretrained(src)
    plan = plan_of(full, excise(ArchitectureAdapter(full), q, ExciseSettings()).ops, "llama", str(src))
    half = AutoModelForCausalLM.from_pretrained(src)
    excise(ArchitectureAdapter(half), q, ExciseSettings(lam=0.5))
    preview = AutoModelForCausalLM.from_pretrained(src)
    for strength, want in ((0.5, half), (1.0, full), (0.0, original), (0.5, half)):
        apply_plan(preview, plan, strength, source=original)
        for name, t in preview.state_dict().items():
            torch.testing.assert_close(t, want.state_dict()[name], rtol=0, atol=1e-6, msg=f"{strength} {name}")
    for name, t in original.state_dict().items():  # the source is only read
        assert torch.equal(t, AutoModelForCausalLM.from_pretrained(src).state_dict()[name]), name
    with pytest.raises(EditError, match="not a finite number"):
        apply_plan(preview, plan, float("nan"), source=original)


def test_what_does_not_fit_is_refused_before_writing(tmp_path):
    src = _checkpoint("llama", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    plan = plan_of(model, excise(ArchitectureAdapter(model), _unit(32, 0), ExciseSettings()).ops, "llama", str(src))
    other = _checkpoint("qwen2", tmp_path / "qwen2")
    with pytest.raises(EditError, match="'llama' model.*'qwen2' checkpoint"):
        bake(plan, other, tmp_path / "out")
    renamed = tmp_path / "renamed"  # a checkpoint that stores the tensors under other names
    _checkpoint("llama", renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    index["weight_map"] = {f"x.{k}": v for k, v in index["weight_map"].items()}
    for shard in shards_of(renamed):
        with safe_open(str(shard), framework="pt") as f:
            tensors = {f"x.{k}": f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EditError, match="has no tensor"):
        bake(plan, renamed, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        bake(plan, src, tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        bake(plan, tmp_path / "nowhere", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_a_non_finite_edit_stops_the_bake_with_no_output(tmp_path):
    """An edit that overflows float16 is found while the shard streams (reader thread ahead, writer
    behind): one clear error, both threads stopped, no output, the source unchanged."""
    from dataclasses import replace

    src = _checkpoint("llama", tmp_path / "src", torch.float16)
    before = digest(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    plan = plan_of(model, excise(ArchitectureAdapter(model), _unit(32, 0), ExciseSettings()).ops, "llama", str(src))
    last = plan.ops[-1]
    plan.ops[-1] = replace(last, lam=1e30)  # (load_plan refuses a non-finite lam; this one is finite, its edit not)
    with pytest.raises(EditError, match="not finite"):
        bake(plan, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")) and digest(src) == before


def test_a_run_writes_its_plan_and_bake_reproduces_it(tmp_path, capsys, monkeypatch):
    """obliterate --output writes edit_plan.safetensors; `obliteratus bake` of the run's plan into the
    source checkpoint gives the saved model's tensors."""
    src = _checkpoint("llama", tmp_path / "src")
    run = tmp_path / "run"
    code, _, err = run_cli(["obliterate", str(src), "--output", str(run), "--layer", "1", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert (run / PLAN_FILE).is_file()
    code, out, err = run_cli(["bake", str(run), "--model", str(src), "--output", str(tmp_path / "baked")],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "baked" in out
    saved = AutoModelForCausalLM.from_pretrained(run).state_dict()
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked").state_dict()
    for name, t in saved.items():
        assert torch.equal(t, baked[name]), name
    code, _, err = run_cli(["bake", str(tmp_path / "src"), "--model", str(src), "--output", str(tmp_path / "x")],
                           capsys, monkeypatch)
    assert_one_error(code, err, "no edit plan")
