"""Architecture discovery (models/discover.py): on every family of the hand-written table it finds
exactly what ArchitectureAdapter names, and on families the table lacks (a multimodal wrapper,
sandwich norms, MLA + shared experts, SSM and linear-attention hybrids) it finds writers whose
projection removes a direction from every layer's output (the exactness property)."""

from __future__ import annotations

import json
import runpy
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import REPO, VOCAB, family_params, params_digest, tiny_model
from obliteratus.errors import UnsupportedArchitectureError
from obliteratus.excise.apply import excise
from obliteratus.models import ArchitectureAdapter
from obliteratus.models.adapters import _get
from obliteratus.models.discover import (
    along_ratio,
    discover,
    off_direction,
    projection_bound,
    remove_along,
    resolve,
)
from obliteratus.settings import ExciseSettings
from support.moe import MOE, moe_model

EXACT = 1e-4  # the bound on |h·d| / ‖h‖ after the projection


def _table_model(family: str) -> nn.Module:
    return moe_model(family) if family in MOE else tiny_model(family)


def _randomise_norm_gains(model: nn.Module, seed: int = 0) -> None:
    """Non-uniform norm gains (HF initialises them uniform, which would hide what a post-writer norm
    does to the projection)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


# ---------------------------------------------------------------------------- the table's families


@pytest.mark.parametrize("family", family_params() + list(MOE))
def test_discovery_finds_what_the_table_names(family):
    model = _table_model(family)
    adapter = ArchitectureAdapter(model)
    found = discover(model)
    assert resolve(model, found.layers) is adapter.layers
    assert resolve(model, found.body) is adapter.body
    assert [resolve(model, p) for p in found.embeddings] == adapter.embeddings
    assert resolve(model, found.final_norm) is adapter.final_norm
    assert resolve(model, found.lm_head) is adapter.lm_head
    assert found.tied_lm_head == adapter.tied_lm_head
    assert found.post_writer_norm == adapter.spec.post_writer_norm
    assert found.moe_layers == adapter.moe_layers

    def key(w):
        return w.name, id(w.module), w.param, w.layout, w.kind, w.moe, w.fused, id(w.bias)

    assert [key(w) for w in found.writers] == [key(w) for w in adapter.writers()]
    for i in adapter.moe_layers:
        moe = found.moe[i]
        assert resolve(model, moe.block) is adapter.mlp_out(i)
        assert resolve(model, moe.experts) is adapter.experts(i)
        assert resolve(model, moe.router) is adapter.router(i)
        gate = adapter.shared_expert_gate(i)
        assert (moe.shared_expert_gate is None) == (gate is None)
        assert gate is None or resolve(model, moe.shared_expert_gate) is gate
    # the same row, as the table would hold it (paths resolve to the same modules)
    spec, table = found.arch_spec(), adapter.spec
    for field in ("body", "layers", "final_norm", "lm_head"):
        assert resolve(model, getattr(spec, field)) is _get(model, getattr(table, field))
    assert [resolve(model, p) for p in spec.embeddings] == [_get(model, p) for p in table.embeddings]
    layer = adapter.layers[0]
    assert _get(layer, spec.attn_out) is _get(layer, table.attn_out)
    assert spec.post_writer_norm == table.post_writer_norm and (spec.moe is None) == (table.moe is None)


@pytest.mark.parametrize("family", family_params() + list(MOE))
def test_projecting_the_found_writers_is_exact(family):
    model = _table_model(family)
    found = discover(model)
    assert projection_bound(model, found) <= EXACT  # unit norm gains: exact even with post-writer norms


@pytest.mark.parametrize("family", family_params("gemma2", "gemma3_text"))
def test_post_writer_norm_bound_is_measured(family, record_property):
    """Gemma 2/3 normalise each writer's output before the residual add: with non-uniform gains the
    projection leaves a little of the direction (measured 2e-2 on these tiny models), reported."""
    model = tiny_model(family)
    _randomise_norm_gains(model)
    found = discover(model)
    assert found.post_writer_norm and all(w.post_norm for w in found.writers if w.kind != "embed")
    bound = projection_bound(model, found)
    record_property("bound", bound)
    print(f"{family}: post-writer-norm bound {bound:.1e}")
    assert EXACT < bound < 0.2


def test_discovery_leaves_the_model_as_it_was():
    model = _table_model("qwen2_moe")
    model.train()
    before = params_digest(model)
    found = discover(model)
    projection_bound(model, found)
    assert params_digest(model) == before and model.training


# ---------------------------------------------------------------------------- families the table lacks


def _small(cls, **extra):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=256, pad_token_id=256, eos_token_id=257,
                bos_token_id=258)
    return cls(**{**base, **extra})


def _configs():
    import transformers as tf

    gemma3_text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=48, vocab_size=VOCAB, sliding_window=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return {
        # the multimodal wrapper Gemma 3 4B/12B/27B load as (model_type gemma3, not gemma3_text)
        "gemma3": (tf.Gemma3ForConditionalGeneration, lambda: tf.Gemma3Config(
            text_config=gemma3_text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)),
        "olmo2": (tf.AutoModelForCausalLM, lambda: _small(tf.Olmo2Config)),  # post-norms only
        "cohere2": (tf.AutoModelForCausalLM, lambda: _small(tf.Cohere2Config, head_dim=8, sliding_window=64,
                                                            layer_types=["sliding_attention", "full_attention"])),
        # MLA attention, a dense first layer, routed + shared experts
        "deepseek_v3": (tf.AutoModelForCausalLM, lambda: _small(
            tf.DeepseekV3Config, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, moe_intermediate_size=16, n_group=1, topk_group=1, first_k_dense_replace=1)),
        # attention and a Mamba-2 mixer side by side in every layer, then an MLP
        "falcon_h1": (tf.AutoModelForCausalLM, lambda: _small(
            tf.FalconH1Config, head_dim=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8,
            mamba_n_groups=1, mamba_chunk_size=16)),
        # Mamba-2 and attention layers, each with a MoE block and a shared MLP
        "granitemoehybrid": (tf.AutoModelForCausalLM, lambda: _small(
            tf.GraniteMoeHybridConfig, layer_types=["linear_attention", "full_attention"], num_local_experts=4,
            num_experts_per_tok=2, shared_intermediate_size=24, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8,
            mamba_n_groups=1, mamba_chunk_size=16)),
        # post-LN: every layer's output is a LayerNorm's (GPT-1)
        "openai-gpt": (tf.AutoModelForCausalLM, lambda: tf.OpenAIGPTConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        # BERT-style: a LayerNorm of the summed embeddings, then post-LN layers
        "bert-generation": (tf.AutoModelForCausalLM, lambda: tf.BertGenerationConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, is_decoder=True)),
        # layer 0 normalises the embeddings (pre_ln); the channel mix gates its value projection per channel
        "rwkv": (tf.AutoModelForCausalLM, lambda: tf.RwkvConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=48,
            context_length=64)),
        # gated DeltaNet linear attention + full attention, MoE with a gated shared expert
        "qwen3_next": (tf.AutoModelForCausalLM, lambda: _small(
            tf.Qwen3NextConfig, head_dim=8, layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    }


def _unlisted(model_type: str) -> nn.Module:
    auto, config = _configs()[model_type]
    torch.manual_seed(0)
    model = auto.from_config(config()) if hasattr(auto, "from_config") else auto(config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    _randomise_norm_gains(model)
    return model.float().eval().requires_grad_(False)


# kinds per layer (attn: a token mixer, mlp: a per-token writer, experts: routed experts), post-writer norm
UNLISTED = {
    "gemma3": (["attn+mlp"] * 2, True),
    "olmo2": (["attn+mlp"] * 2, True),
    "cohere2": (["attn+mlp"] * 2, False),  # attention and MLP in parallel from one norm
    "deepseek_v3": (["attn+mlp", "attn+mlp+experts"], False),
    "falcon_h1": (["attn+attn+mlp"] * 2, False),
    "granitemoehybrid": (["attn+mlp+experts"] * 2, False),
    "qwen3_next": (["attn+mlp+experts"] * 2, False),
    # the stream norms' shifts are bias-only writers ("bias"); the norms' gains make the bound
    "openai-gpt": (["attn+mlp+bias"] * 2, True),
    "bert-generation": (["attn+mlp+bias"] * 2, True),
    # the channel mix shifts tokens by one position: a token mixer too
    "rwkv": (["attn+attn+bias", "attn+attn"], True),
}


@pytest.mark.parametrize("model_type", list(UNLISTED))
def test_discovery_covers_families_the_table_lacks(model_type, record_property):
    model = _unlisted(model_type)
    assert model.config.model_type == model_type
    found = discover(model)
    adapter = ArchitectureAdapter(model)  # not in the table: the adapter falls back to discovery
    assert adapter.spec is None and adapter.discovery == found
    matrices = [w for w in found.writers if not w.bias_only]  # (bias-only writers: adapter.bias_writers())
    assert [w.name for w in adapter.writers()] == [w.name for w in matrices]
    assert [w.layout for w in adapter.writers()] == [w.layout for w in matrices]
    assert [w.name for w in adapter.bias_writers()] == [w.name for w in found.writers if w.bias_only]
    assert adapter.post_writer_norm == found.post_writer_norm and adapter.moe_layers == found.moe_layers
    kinds, post_norm = UNLISTED[model_type]
    assert list(found.layer_kinds) == kinds
    assert found.post_writer_norm == post_norm
    bound = projection_bound(model, found)
    record_property("bound", bound)
    print(f"{model_type}: bound {bound:.1e}")
    if post_norm:
        assert bound < 0.2  # reported: the norms' gains bring a little of the direction back
    else:
        assert bound <= EXACT
    for w in found.writers:  # every writer is a matrix (or a fused [E, ., .] tensor) with its residual axis
        if w.bias_only:
            assert w.weight.shape == (32,)
            continue
        assert w.weight.ndim == (3 if w.fused else 2)
        assert w.weight.shape[w.residual_axis] == 32


def test_multimodal_wrapper_edits_the_text_decoder_only():
    model = _unlisted("gemma3")
    found = discover(model)
    assert found.body == "model.language_model" and found.layers == "model.language_model.layers"
    assert found.embeddings == ("model.language_model.embed_tokens",) and found.tied_lm_head
    assert all(w.path.startswith("model.language_model.") for w in found.writers)
    assert not any("vision" in w.path or "projector" in w.path for w in found.writers)
    # the adapter edits the text decoder only: the vision tower and the projector stay byte-identical
    outside = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("model.language_model.")}
    assert any("vision" in n for n in outside)
    q = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    excise(ArchitectureAdapter(model), q / q.norm(), ExciseSettings())
    for n, p in model.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), n


def test_an_undiscoverable_model_type_is_one_clear_error():
    """XLNet's attention writes through a bare [d, heads, head_dim] parameter into a post-LN norm: no
    writer has a projectable residual side; the adapter says so, names the module and lists the
    table's families."""
    import transformers as tf

    config = tf.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchitectureAdapter(tf.AutoModelForCausalLM.from_config(config).eval())
    message = str(err.value)
    assert "'xlnet'" in message and "transformer.layer.0.rel_attn.layer_norm" in message and "Llama" in message


def _stream_norm_bound(model, found, with_shifts: bool) -> float:
    writers = found.writers if with_shifts else tuple(w for w in found.writers if not w.bias_only)
    return projection_bound(model, replace(found, writers=writers))


def test_post_ln_layers_are_found_at_the_norms_input():
    """GPT-1: n = ln_1(x + attn(x)), out = ln_2(n + mlp(n)). The writers are attn.c_proj (behind ln_1)
    and mlp.c_proj (behind ln_2), the norms' shifts are bias-only writers, and the edit is reported as
    not exact. Projecting the shifts too is what keeps the bound small."""
    model = _unlisted("openai-gpt")
    found = discover(model)
    layer0 = [(w.path, w.param, w.post_norm, w.bias_only) for w in found.layer_writers(0)]
    assert layer0 == [("transformer.h.0.attn.c_proj", "weight", "transformer.h.0.ln_1", False),
                      ("transformer.h.0.mlp.c_proj", "weight", "transformer.h.0.ln_2", False),
                      ("transformer.h.0.ln_1", "bias", None, True), ("transformer.h.0.ln_2", "bias", None, True)]
    assert any("not exact" in n for n in found.notes)
    with_shifts, without = _stream_norm_bound(model, found, True), _stream_norm_bound(model, found, False)
    assert 1e-4 < with_shifts < 0.2 and with_shifts < without


def test_an_embedding_norm_before_post_ln_layers():
    """BERT-style decoders sum word and position embeddings, then normalise: both tables are found at
    the norm's input, and the norm's shift is a bias-only writer."""
    found = discover(_unlisted("bert-generation"))
    embed = [(w.path, w.param, w.post_norm, w.bias_only) for w in found.writers if w.kind == "embed"]
    norm = "bert.embeddings.LayerNorm"
    assert embed == [("bert.embeddings.word_embeddings", "weight", norm, False),
                     ("bert.embeddings.position_embeddings", "weight", norm, False), (norm, "bias", norm, True)]


def test_a_writer_gated_per_channel():
    """RWKV's channel mix returns sigmoid(receptance(x)) * value(k): value is the writer, with the
    channel mix as its post-writer "norm"; layer 0's pre_ln normalises the embeddings."""
    found = discover(_unlisted("rwkv"))
    layer0 = {w.path: (w.post_norm, w.bias_only) for w in found.layer_writers(0)}
    assert layer0 == {"rwkv.blocks.0.attention.output": (None, False),
                      "rwkv.blocks.0.feed_forward.value": ("rwkv.blocks.0.feed_forward", False),
                      "rwkv.blocks.0.pre_ln": (None, True)}
    (embed,) = [w for w in found.writers if w.kind == "embed"]
    assert embed.post_norm == "rwkv.blocks.0.pre_ln"


def test_hybrid_layers_are_found_per_layer():
    """Falcon-H1 writes from attention and a Mamba-2 mixer in every layer; Granite 4's two layer types
    differ in their token mixer. Neither is one table row."""
    falcon = discover(_unlisted("falcon_h1"))
    mixers = [w.path.split(".", 3)[-1] for w in falcon.layer_writers(0) if w.kind == "attn"]
    assert len(mixers) == 2 and len(set(mixers)) == 2
    granite = discover(_unlisted("granitemoehybrid"))
    first, second = ([w.path.split(".", 3)[-1] for w in granite.layer_writers(i) if w.kind == "attn"] for i in (0, 1))
    assert first != second
    with pytest.raises(UnsupportedArchitectureError, match="differ"):
        granite.arch_spec()


# ---------------------------------------------------------------------------- writers outside the plain form


def _coverage_model(model_type: str) -> nn.Module:
    """benchmarks/coverage.py's tiny random model of `model_type` (its config shrinker and init)."""
    import importlib.util

    import transformers as tf

    name = "obliteratus_benchmark_coverage"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "coverage.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    coverage = sys.modules[name]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(coverage.tiny_config(model_type))
    return coverage.reinit(model.float(), 0).eval().requires_grad_(False)


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


# model type -> the bias-only writers: (name, path, parameter)
BIASES = {
    # a bias after the attention experts (MoA, run through its reduce(), not a forward) and after the MoE experts
    "jetmoe": [(f"layers.{i}.{k}_bias", f"model.layers.{i}.{p}", "bias") for i in range(2)
               for k, p in (("attn", "self_attention.experts"), ("mlp", "mlp"))],
    # the attention returns dense_bias beside its output; the layer adds it (last layer only)
    "gpt_neox_japanese": [("layers.1.attn_bias", "gpt_neox_japanese.layers.1.attention", "dense_bias")],
}


@pytest.mark.parametrize("model_type", list(BIASES))
def test_a_bias_added_outside_a_module_is_a_writer(model_type):
    """A vector parameter added to the residual stream by code (no module returns it added) is found by
    perturbing it, edited like a bias, and held edited by the hook form: the edit is exact."""
    from obliteratus.excise.hook_form import ablated

    model = _coverage_model(model_type)
    found = discover(model)
    biases = [(w.name, w.path, w.param) for w in found.writers if w.bias_only]
    assert biases == BIASES[model_type]
    assert all(w.weight.ndim == 1 and w.layout == "in_out" for w in found.writers if w.bias_only)
    assert all(k.endswith("+bias") for i, k in enumerate(found.layer_kinds) if any(b[0].startswith(f"layers.{i}.")
                                                                                   for b in biases))
    with pytest.raises(UnsupportedArchitectureError, match="outside a module"):
        found.arch_spec()
    assert projection_bound(model, found) <= EXACT
    adapter = ArchitectureAdapter(model)
    assert [w.name for w in adapter.bias_writers()] == [b[0] for b in biases]
    assert not any(w.bias_only for w in adapter.writers())
    assert [w.name for w in adapter.bias_writers(attention=False)] == [b[0] for b in biases if "mlp" in b[0]]
    d = adapter.d_model
    q = torch.randn(1, d, generator=torch.Generator().manual_seed(2))
    q = q / q.norm()
    before = {w.name: w.weight.detach().clone() for w in adapter.bias_writers()}
    with ablated(adapter, q):
        hooked = _logits(model)
    assert all(torch.equal(w.weight, before[w.name]) for w in adapter.bias_writers())  # put back on exit
    report = excise(adapter, q, ExciseSettings())
    assert {f"{b[0]}.{b[2]}" for b in biases} <= set(report.edited)
    for w in adapter.bias_writers():
        assert float((w.weight.detach() @ q[0]).abs()) < 1e-6 and not torch.equal(w.weight, before[w.name])
    weights = _logits(model)
    assert float((weights - hooked).abs().max() / weights.abs().max()) < 1e-4


def test_bias_only_writers_are_kept_with_biases_off():
    model = _coverage_model("gpt_neox_japanese")
    adapter = ArchitectureAdapter(model)
    (writer,) = adapter.bias_writers()
    before = writer.weight.detach().clone()
    q = torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(2))
    report = excise(adapter, q / q.norm(), ExciseSettings(biases=False))
    assert torch.equal(writer.weight, before) and "layers.1.attn_bias.dense_bias" not in report.edited


def test_hooks_mode_and_lora_refuse_bias_only_writers(tmp_path):
    """No module output carries a bias-only writer, so neither a hook nor a LoRA adapter can hold its
    edit: both refuse with the writer named, and accept biases = false (which leaves it alone)."""
    from obliteratus.errors import ConfigError, EditError
    from obliteratus.export.lora import export_lora
    from obliteratus.steering import ablation_points

    model = _coverage_model("gpt_neox_japanese")
    adapter = ArchitectureAdapter(model)
    flags = dict(attention=True, mlp=True, experts=True, embeddings=False, lm_head=False)
    with pytest.raises(ConfigError, match="layers.1.attn_bias"):
        ablation_points(adapter, **flags, biases=True)
    q = torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(2))
    q = q / q.norm()
    with pytest.raises(EditError, match="layers.1.attn_bias"):
        export_lora(model, adapter, q, output_dir=tmp_path / "lora", embeddings=False)
    assert not (tmp_path / "lora").exists()
    assert not any(w.bias_only for w in adapter.writers())


def test_writers_found_at_a_norms_input():
    """A.X K1 sums its routed and shared experts in code and normalises the sum: no module returns the
    norm's input, so the writers are found where they reach it (the norm is a post-writer norm)."""
    model = _coverage_model("axk1")
    found = discover(model)
    moe = found.moe[1]
    assert moe is not None and moe.block == "model.layers.1.mlp" and moe.router == "model.layers.1.mlp.gate"
    mlp = [(w.name, w.path, w.post_norm) for w in found.layer_writers(1) if w.kind == "mlp"]
    assert mlp == [("layers.1.experts", "model.layers.1.mlp.experts", "model.layers.1.mlp.post_mlp_layernorm"),
                   ("layers.1.shared_expert", "model.layers.1.mlp.shared_experts.down_proj",
                    "model.layers.1.mlp.post_mlp_layernorm")]
    assert found.post_writer_norm and EXACT < projection_bound(model, found) < 0.2  # the norm's gains


def test_parameters_handed_to_a_module_as_arguments():
    """DBRX hands each expert the slice of its parameters as forward arguments: re-run on its recorded
    arguments the module ignores its own parameters, so the writer is found in the model's forward."""
    model = _coverage_model("dbrx")
    found = discover(model)
    (w,) = [w for w in found.layer_writers(0) if w.kind == "mlp"]
    assert (w.path, w.param, w.layout) == ("transformer.blocks.0.ffn.experts.mlp", "w2", "in_out")
    assert any("not treated as mixture-of-experts" in n for n in found.notes)
    assert projection_bound(model, found) <= EXACT


def test_a_fixed_position_table_is_named():
    """XGLM adds a sinusoidal table kept in a non-persistent buffer: no saved edit can change it."""
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.embed_positions\.weights.*non-persistent"):
        discover(_coverage_model("xglm"))


# ---------------------------------------------------------------------------- errors and helpers


def test_an_unprojectable_writer_is_named():
    """A fixed rotation after layer 1's attention (neither a per-token scalar nor a per-channel gain):
    no parameter's residual side can be projected, and the error says which module is the problem."""
    model = tiny_model("llama")
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0]
    model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: (out[0] @ rotation, *out[1:]))
    with pytest.raises(UnsupportedArchitectureError, match=r"layer 1: model\.layers\.1\.self_attn"):
        discover(model)


def test_a_per_channel_gain_after_a_writer_is_a_measured_bound():
    """A per-channel scale after layer 1's attention: o_proj is still the writer, with the attention as
    its post-writer "norm" (a gated writer): found, said to be inexact, and the bound is measured."""
    model = tiny_model("llama")
    gain = torch.linspace(0.5, 1.5, 32)
    model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: (out[0] * gain, *out[1:]))
    found = discover(model)
    (attn,) = [w for w in found.layer_writers(1) if w.kind == "attn"]
    assert (attn.path, attn.post_norm) == ("model.layers.1.self_attn.o_proj", "model.layers.1.self_attn")
    assert any("gated per channel" in n for n in found.notes)
    assert 1e-4 < projection_bound(model, found) < 0.5


def test_off_direction_and_along_ratio():
    u = torch.tensor([1.0, 0.0, 0.0])
    change = torch.tensor([[2.0, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    assert off_direction(change, u) == (0.0, pytest.approx(float(change.norm())))
    assert off_direction(torch.zeros(2, 3), u) == (0.0, 0.0)
    assert off_direction(torch.tensor([[1.0, 1.0, 0.0]]), u)[0] == pytest.approx(2 ** -0.5)
    h = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 0.0]])
    assert along_ratio(h, u) == pytest.approx(0.6)
    w = torch.randn(2, 5, 3)  # fused [E, n, d]: the residual axis is the last one
    assert along_ratio(remove_along(w, u, -1), u) < 1e-6
    w = torch.randn(2, 3, 5)  # [E, d, in]: the residual axis is -2
    assert (remove_along(w, u, -2)[:, 0]).abs().max() < 1e-6


def test_coverage_benchmark_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "coverage.json"
    monkeypatch.setattr(sys, "argv", ["coverage.py", "--types", "llama,olmo2,bart", "--json", str(out)])
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    runpy.run_path(str(REPO / "benchmarks" / "coverage.py"), run_name="__main__")
    rows = {r["model_type"]: r for r in json.loads(out.read_text())}
    assert rows["llama"]["table"] == "yes" and rows["llama"]["discovered"] == "yes"
    assert rows["llama"]["bound"] <= EXACT
    assert rows["olmo2"]["discovered"] == "yes" and rows["olmo2"]["kinds"].endswith("post-norm")
    assert rows["bart"]["instantiated"] == "skip" and rows["bart"]["why"] == "encoder-decoder"
    assert "causal-lm: 3 types, 1 skipped" in capsys.readouterr().out
