"""LoRA export: PEFT loading the adapter onto the unedited model reproduces the weight edit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from obliteratus.settings import ExciseSettings
from obliteratus.errors import EditError
from obliteratus.excise.apply import excise
from obliteratus.excise.plan import EditPlan
from obliteratus.excise.projection import project_out
from obliteratus.export import export_lora, lora_factors
from obliteratus.models.adapters import ArchitectureAdapter

from conftest import random_unit, tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7], [1, 2, 3, 4, 5, 6, 8]])


def edited_and_export(family: str, tmp_path, q, lam=1.0, embeddings=True, per_layer=None):
    """(weight-edited model, export report). Per-layer entries (writers the settings leave out) are
    applied to the reference by hand."""
    edited = tiny_model(family)
    adapter = ArchitectureAdapter(edited)
    base = tiny_model(family)
    out = export_lora(base, ArchitectureAdapter(base), q, lam, tmp_path / "lora", embeddings=embeddings,
                      per_layer=per_layer)
    excise(adapter, q, ExciseSettings(lam=lam, embeddings=embeddings))
    writers = {w.name: w for w in adapter.writers()}
    with torch.no_grad():
        for name, (basis, weight) in (per_layer or {}).items():
            w = writers[name]  # not selected by the settings, so still unedited here
            assert w.bias is None
            w.weight.copy_(project_out(w.weight, basis, weight, w.layout))
    return edited, out


def load_peft(family: str, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_model(family), str(path))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings  # every tensor in the file found its place
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapter_reproduces_the_weight_edit(family, tmp_path):
    q = random_unit(32, k=2, seed=1)
    edited, out = edited_and_export(family, tmp_path, q, lam=1.0)
    cfg = json.loads((out.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["rank_pattern"] == {}
    assert "model.embed_tokens" in cfg["target_modules"] and "model.layers.2.mlp.down_proj" in cfg["target_modules"]
    assert cfg["bias"] == "none"  # o_proj / down_proj have no bias (qwen2's bias is on q/k/v, not a writer)
    bare = tiny_model(family)(IDS).logits
    want = edited(IDS).logits
    assert (want - bare).abs().max() > 1e-2  # the edit matters
    peft_model = load_peft(family, out.path)
    torch.testing.assert_close(peft_model(IDS).logits, want, atol=2e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    for name, p in edited.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], p, atol=2e-6, rtol=1e-6, msg=name)


def test_gpt2_conv1d_biases_position_embedding_and_mixed_ranks(tmp_path):
    q = random_unit(32, k=1, seed=2)
    q2 = random_unit(32, k=2, seed=3)
    # wte is tied to lm_head (refused, see below); wpe gets its own rank-2 basis and λ = 2
    edited, out = edited_and_export("gpt2", tmp_path, q, lam=1.0, embeddings=False,
                                    per_layer={"embed.wpe": (q2, 2.0)})
    cfg = json.loads((out.path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["bias"] == "lora_only"
    assert cfg["r"] == 1 and cfg["rank_pattern"] == {r"transformer\.wpe": 2} == cfg["alpha_pattern"]
    assert len(out.biases) == 6  # c_proj of attention and MLP in 3 layers
    peft_model = load_peft("gpt2", out.path)
    torch.testing.assert_close(peft_model(IDS).logits, edited(IDS).logits, atol=2e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    for name, p in edited.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], p, atol=2e-6, rtol=1e-6, msg=name)


def test_key_names_match_peft_itself(tmp_path):
    q = random_unit(32, k=1, seed=2)
    base = tiny_model("gpt2")
    out = export_lora(base, ArchitectureAdapter(base), q, 1.0, tmp_path / "lora", embeddings=False,
                      per_layer={"embed.wpe": (random_unit(32, k=3, seed=4), 1.0)})
    ours = {k: tuple(v.shape) for k, v in load_file(str(out.path / "adapter_model.safetensors")).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(tiny_model("gpt2"), LoraConfig.from_pretrained(str(out.path)))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(reference).items()}
    assert ours == theirs


def test_gemma_tied_embedding_is_refused_and_the_rest_exports(tmp_path):
    q = random_unit(32, k=1, seed=5)
    base = tiny_model("gemma")
    with pytest.raises(EditError, match="tied to the lm_head"):
        export_lora(base, ArchitectureAdapter(base), q, 1.0, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    edited, out = edited_and_export("gemma", tmp_path, q, embeddings=False)
    peft_model = load_peft("gemma", out.path)
    torch.testing.assert_close(peft_model(IDS).logits, edited(IDS).logits, atol=2e-5, rtol=1e-5)


def test_edit_plan_per_layer_bases_strengths_oblique_read_and_lm_head(tmp_path):
    q = random_unit(32, k=2, seed=6)
    read = q + 0.1 * random_unit(32, k=2, seed=7)  # oblique: R != U
    plan = EditPlan(layer_bases={1: random_unit(32, k=2, seed=8)}, read=read, lam=1.5, lm_head_input=True,
                    strength={("attn", 0): 1.0, ("mlp", 0): 0.5, ("attn", 1): 2.0, ("mlp", 2): 1.0, ("embed", None): 1.0})
    edited = tiny_model("llama")
    excise(ArchitectureAdapter(edited), q, ExciseSettings(), plan=plan)
    base = tiny_model("llama")
    out = export_lora(base, ArchitectureAdapter(base), q, 1.0, tmp_path / "lora", plan=plan)
    assert "lm_head" in out.target_modules and "model.layers.1.mlp.down_proj" not in out.target_modules  # s = 0
    peft_model = load_peft("llama", out.path)
    torch.testing.assert_close(peft_model(IDS).logits, edited(IDS).logits, atol=2e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    for name, p in edited.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], p, atol=2e-6, rtol=1e-6, msg=name)


def test_refuses_norm_preserving_and_bad_input(tmp_path):
    base = tiny_model("llama")
    adapter = ArchitectureAdapter(base)
    q = random_unit(32, seed=0)
    with pytest.raises(EditError, match="full rank"):
        export_lora(base, adapter, q, 1.0, tmp_path / "a", norm_preserve=True)
    with pytest.raises(EditError, match="full rank"):
        export_lora(base, adapter, q, 1.0, tmp_path / "a", plan=EditPlan(norm_preserve=True))
    with pytest.raises(EditError, match="unknown writer 'layers.9.attn_out'"):
        export_lora(base, adapter, None, 1.0, tmp_path / "b", per_layer={"layers.9.attn_out": (q, 1.0)})
    with pytest.raises(EditError, match="width 31"):
        export_lora(base, adapter, torch.ones(1, 31), 1.0, tmp_path / "c")


def test_factors_multiply_to_the_projection_edit():
    gen = torch.Generator().manual_seed(0)
    q = random_unit(6, k=2, seed=9, dtype=torch.float64).float()
    for layout, shape in (("out_in", (6, 4)), ("in_out", (5, 6))):
        w = torch.randn(shape, generator=gen)
        a, b = lora_factors(w, q, 1.5, layout)
        delta = b @ a if layout == "out_in" else (b @ a).T
        torch.testing.assert_close(w + delta, project_out(w, q, 1.5, layout))


def test_fused_expert_tensors_are_refused_with_a_clear_error(tmp_path):
    from support.moe import moe_model

    model = moe_model("gpt_oss")
    adapter = ArchitectureAdapter(model)
    assert any(w.fused for w in adapter.writers())
    q = random_unit(adapter.d_model, seed=3)  # [1, d]
    with pytest.raises(EditError, match="routed expert"):
        export_lora(model, adapter, q, 1.0, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    export_lora(model, adapter, q, 1.0, tmp_path / "attn", mlp=False)  # attention and embeddings still export
    assert (tmp_path / "attn" / "adapter_model.safetensors").exists()
