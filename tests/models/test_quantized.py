"""Models bigger than the machine (issue 27): bitsandbytes 4-bit and 8-bit loads and accelerate's
disk offload, on the CPU (bitsandbytes >= 0.45 has a CPU backend).

* packed weights are never edited as bytes: dequantizing and quantizing an unedited weight again
  gives the same bytes, and the edit of a packed weight is exactly quantize(edit(dequantize(W)));
* the edit removes the direction up to the re-quantization error;
* a quantized or offloaded run bakes its edit plan into the full-precision source: the output is
  bit-identical to the in-memory edit of the full-precision model, the source is not written;
* a run on held weights scores its edit with hooks (the exact edit the bake makes) where the edit has
  a hook form; a quantized load makes a norm-preserving edit on the weights (dequantize -> quantize),
  an offloaded one refuses it clearly, as it refuses variants that edit by their own rule;
* the plan holds the source's tensor hashes and the bake refuses another model's tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import _COMMON, merge, reinit, tiny_tokenizer
from obliteratus import obliterate
from obliteratus.errors import ConfigError, EditError
from obliteratus.excise.apply import excise
from obliteratus.export.bake import bake, shards_of
from obliteratus.export.plan import PLAN_FILE, apply_plan, load_plan
from obliteratus.models import ArchitectureAdapter
from obliteratus.models.quantized import (bitsandbytes, float_weight, is_packed, logical_shape, store_weight,
                                          track_modules)
from obliteratus.settings import ExciseSettings
from support.checkpoints import checkpoint_tensors
from support.cli import tree_hash

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the quant extra) is not installed")

# a random model has no refusal direction to pass Arditi's filters: open them (as tests/test_coverage.py)
SMALL = {"data": {"n_train": 8, "n_val": 2, "n_test": 2},
         "evaluate": {"max_new_tokens": 2, "kl_tokens": 1, "perplexity": False},
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9, "prune_fraction": 0.0}}


def _llama(seed: int = 0):
    """A tiny Llama whose matrices bitsandbytes' CPU kernels take (inputs a multiple of its 64-block)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **_COMMON)
    return reinit(tf.LlamaForCausalLM(config), seed).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    _llama().save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    assert len(shards_of(path)) >= 2
    return path


def _load(source: Path, kind: str):
    from transformers import AutoModelForCausalLM

    from obliteratus.models.quantized import quantization_config

    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization_config(kind, torch.float32),
                                                 device_map="cpu")
    track_modules(model)
    return model.eval()


def _unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_bitsandbytes_is_imported_without_the_hub_kernel():
    bitsandbytes()
    assert sys.modules.get("kernels", "absent") is not None  # the block is lifted after the import


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_an_unedited_weight_quantizes_back_to_its_bytes(source, kind):
    model = _load(source, kind)
    model(torch.tensor([[1, 2, 3]]))  # the first forward repacks (4-bit, AVX512-BF16 CPUs) or moves scales (8-bit)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        param = model.get_parameter(name)
        assert is_packed(param)
        value = float_weight(param)
        assert tuple(value.shape) == logical_shape(param) == tuple(_llama().get_parameter(name).shape)
        before = param.data.clone()
        store_weight(param, value)
        assert torch.equal(param.data, before), f"{name}: dequantize -> quantize changed the bytes"
        assert torch.equal(float_weight(param), value)


@pytest.mark.parametrize("kind,bound", [("nf4", 0.25), ("int8", 0.02)])
def test_the_edit_of_a_packed_weight_is_quantize_of_the_float_edit(source, kind, bound):
    model = _load(source, kind)
    model(torch.tensor([[1, 2, 3]]))
    adapter = ArchitectureAdapter(model)
    q = _unit(adapter.d_model)
    name = "model.layers.1.self_attn.o_proj.weight"
    param = model.get_parameter(name)
    old = float_weight(param).float()
    want = old - q.T @ (q @ old)  # the float edit of the dequantized weight
    report = excise(adapter, q, ExciseSettings())
    assert "layers.1.attn_out.weight" in report.edited and report.ops[0].names
    got = float_weight(param).float()
    # exactly what quantizing the float edit gives (the same function, the same settings)
    ref = _load(source, kind).get_parameter(name)
    store_weight(ref, want)
    assert torch.equal(float_weight(ref), float_weight(param))
    # the direction is gone up to the re-quantization error, and the rest is kept
    assert float((q @ got).norm() / (q @ old).norm()) < bound
    assert torch.allclose(got, want, atol=float(old.abs().max()) * (0.2 if kind == "nf4" else 0.02))
    # every edited tensor was a writer, the embeddings' float weights exactly
    embed = model.get_input_embeddings().weight
    assert not is_packed(embed) and float((embed.float() @ q.T).abs().max()) < 1e-5


def _full_precision_edit(source: Path, plan_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    apply_plan(model, load_plan(plan_dir))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_settings,norm_preserve", [
    ({"quantization": "nf4"}, False),
    ({"quantization": "nf4"}, True),  # no hook form: made on the weights through dequantize -> quantize
    ({"quantization": "int8"}, False),
    ({"max_memory": {"cpu": "100KB"}}, False),  # everything past 100 KB offloaded to disk
], ids=["nf4", "nf4-norm-preserving", "int8", "offload"])
def test_a_run_on_a_quantized_or_offloaded_load_bakes_the_full_precision_source(source, tmp_path, model_settings,
                                                                               norm_preserve):
    before = tree_hash(source)
    if "max_memory" in model_settings:
        model_settings = {**model_settings, "offload_dir": str(tmp_path / "offload")}
    run = obliterate(str(source), "basic", str(tmp_path / "out"),
                     **merge(SMALL, {"model": model_settings, "excise": {"norm_preserve": norm_preserve}}))
    assert tree_hash(source) == before, "the source checkpoint was written"
    assert set(run.metrics) == {"before", "after"}
    plan = load_plan(tmp_path / "out" / PLAN_FILE)
    assert set(plan.digests) == {n for op in plan.ops for n in op.names}, "every edited tensor has its hash"
    # the output is the full-precision checkpoint with the plan applied, bit for bit
    want, got = _full_precision_edit(source, tmp_path / "out"), checkpoint_tensors(tmp_path / "out")
    assert set(got) >= {n for op in plan.ops for n in op.names}
    for name, value in got.items():
        assert torch.equal(value, want[name]), name
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text("utf-8")
    # scored as hooks (the exact edit) where it has a hook form, else edited through dequantize -> quantize
    assert run.edit.details.get("applied_as", "weights").startswith("weights" if norm_preserve else "hooks")
    assert run.edit.norm_preserve == norm_preserve and all(op.norm_preserve == norm_preserve for op in plan.ops
                                                           if op.layout != "vector")
    if "max_memory" in model_settings:
        assert any(p.device.type == "meta" for p in run.loaded.model.parameters())


def test_offloaded_weights_score_the_edit_exactly_as_hooks(source, tmp_path):
    """VERIFY after on an offloaded load (hooks) sees the logits of the baked full-precision edit."""
    from transformers import AutoModelForCausalLM

    run = obliterate(str(source), "basic", str(tmp_path / "out"),
                     **merge(SMALL, {"model": {"max_memory": {"cpu": "100KB"}, "offload_dir": str(tmp_path / "o")}}))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        hooked = run.loaded.model(ids).logits
        baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids).logits
    assert torch.allclose(hooked, baked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"model": {"max_memory": {"cpu": "100KB"}}, "excise": {"norm_preserve": True}}, "no hook form"),
    ({"model": {"quantization": "nf4"}, "excise": {"method": "householder"}}, "only the projection edit"),
], ids=["offload-norm-preserving", "nf4-householder"])
def test_edits_that_cannot_be_made_on_held_weights_are_refused(source, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        obliterate(str(source), "basic", str(tmp_path / "out"), **merge(SMALL, overrides))
    assert not (tmp_path / "out").exists()


def test_bake_from_needs_an_output_and_a_checkpoint(source, tmp_path):
    with pytest.raises(ConfigError, match="--output"):
        obliterate(str(source), "basic", bake_from=str(source), **SMALL)
    with pytest.raises(Exception, match="no model.safetensors"):
        obliterate(str(source), "basic", str(tmp_path / "out"), bake_from=str(tmp_path), **SMALL)
    with pytest.raises(ConfigError, match="not a local checkpoint directory"):
        obliterate("org/model", "basic", str(tmp_path / "out"), **merge(SMALL, {"model": {"quantization": "nf4"}}))


def test_bake_from_bakes_another_copy_and_the_hashes_catch_another_model(source, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    run = obliterate(str(source), "basic", str(tmp_path / "out"), bake_from=str(copy),
                     **merge(SMALL, {"model": {"quantization": "nf4"}}))
    assert (tmp_path / "out" / "obliteratus_bake.json").is_file()
    assert run.bake_source() == str(copy)
    # another model with the same names and shapes: the bake refuses it by the hashes, nothing written
    other = tmp_path / "other"
    _llama(seed=1).save_pretrained(other, max_shard_size="100KB")
    with pytest.raises(EditError, match="sha256"):
        bake(load_plan(tmp_path / "out"), other, tmp_path / "baked")
    assert not (tmp_path / "baked").exists()
    done = bake(load_plan(tmp_path / "out"), other, tmp_path / "baked", check_hashes=False)
    assert done.edited


def test_gguf_sources_are_not_quantized_again(tmp_path):
    from obliteratus.models.load import placement
    from obliteratus.models.options import ModelSettings

    with pytest.raises(ConfigError, match="GGUF"):
        placement(ModelSettings(quantization="nf4"), "cpu", torch.float32, "model.gguf")
    with pytest.raises(ConfigError, match="max_memory too"):
        placement(ModelSettings(offload_dir=str(tmp_path)), "cpu", torch.float32, None)
    with pytest.raises(ValueError, match="GiB"):
        ModelSettings(max_memory={"cpu": "lots"})
    assert ModelSettings(max_memory={"0": "20GiB", "cpu": "64GiB"}).device_max_memory() == {0: "20GiB", "cpu": "64GiB"}


def test_hook_mode_on_a_quantized_load_saves_the_source_weights_and_the_hooks(source, tmp_path):
    obliterate(str(source), "basic", str(tmp_path / "out"),
               **merge(SMALL, {"model": {"quantization": "nf4"}, "excise": {"mode": "hooks"}}))
    assert (tmp_path / "out" / "steering.json").is_file()
    src, out = checkpoint_tensors(source), checkpoint_tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)


def test_lora_from_a_quantized_load_is_refused_before_it_is_written(source, tmp_path):
    with pytest.raises(ConfigError, match="--lora"):
        obliterate(str(source), "basic", str(tmp_path / "out"), lora=str(tmp_path / "lora"),
                   **merge(SMALL, {"model": {"quantization": "nf4"}}))
    assert not (tmp_path / "lora").exists() and not (tmp_path / "out").exists()


def test_the_optimizer_study_runs_its_trials_on_a_4bit_load_and_bakes_the_pick(source, tmp_path):
    """Trials are hooks on the nf4 weights; the chosen trial's edit is scored as hooks too and baked
    into the full-precision source, bit-identical to replaying the saved plan there."""
    pytest.importorskip("optuna")
    sizes = merge(SMALL, {"model": {"quantization": "nf4"}})
    study = {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 2, "confirm_prompts": 0, "confirm_during": False}
    run = obliterate(str(source), "optimized", str(tmp_path / "out"), overrides=sizes, study=study,
                     run_dir=str(tmp_path / "st"))
    assert run.study is not None and run.edit.details["applied_as"].startswith("hooks (quantized (nf4)")
    want, got = _full_precision_edit(source, tmp_path / "out"), checkpoint_tensors(tmp_path / "out")
    assert all(torch.equal(value, want[name]) for name, value in got.items())


def test_outputs_and_offload_folders_never_overlap_the_checkpoints_read(source, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    before = tree_hash(copy)
    with pytest.raises(Exception, match="source|not an obliteratus output"):
        obliterate(str(source), "basic", str(copy), overwrite=True, bake_from=str(copy), **SMALL)
    with pytest.raises(Exception, match="overlaps"):
        obliterate(str(source), "basic", str(copy / "out"), bake_from=str(copy), **SMALL)
    with pytest.raises(ConfigError, match="offload_dir"):
        obliterate(str(copy), "basic", str(tmp_path / "out"),
                   **merge(SMALL, {"model": {"max_memory": {"cpu": "100KB"}, "offload_dir": str(copy / "off")}}))
    assert tree_hash(copy) == before and not (tmp_path / "out").exists()


def test_inputs_go_where_the_input_embedding_runs():
    from obliteratus.models.placement import input_device

    model = _llama()
    assert input_device(model) == torch.device("cpu")
    assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")  # no get_input_embeddings: first parameter

    class Custom(torch.nn.Module):  # custom code whose get_input_embeddings is not implemented
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def get_input_embeddings(self):
            raise NotImplementedError

    assert input_device(Custom()) == torch.device("cpu")
