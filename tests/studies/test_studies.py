"""Ablation studies: each hook does exactly what it says, GQA head groups match HF's repeat_kv,
weights are untouched, and the runner writes its table."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from obliteratus.settings import resolve_settings
from obliteratus.errors import ConfigError
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.load import Loaded
from obliteratus.pipeline import prepare_prompts
from obliteratus.studies import Ablation, load_study, prune_heads, run_study, skip_layers, zero_embed_dims, zero_ffn
from obliteratus.studies.heads import kv_group, query_heads, zero_heads
from obliteratus.studies.runner import StudyConfig

import hashlib

from conftest import REPO, save_tiny, tiny_model, tiny_tokenizer


def params_digest(model) -> str:
    """sha256 over every parameter and buffer (0-dim buffers too, e.g. Gemma's embed_scale)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7]])
EXAMPLES = REPO / "examples" / "studies"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def capture(adapter, name):
    """Forward hooks registered after the ablation's: record the layer's input and (final) output."""
    seen = {}
    layer = adapter.layers[int(name)]

    def hook(module, args, kwargs, output):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["out"] = (output[0] if isinstance(output, tuple) else output).clone()

    return seen, layer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_skipped_layer_outputs_its_input_and_hooks_go_away(family):
    model = tiny_model(family)
    adapter = ArchitectureAdapter(model)
    base, digest = logits(model), params_digest(model)
    with skip_layers(adapter, [1]):
        seen, handle = capture(adapter, "1")
        ablated = logits(model)
        handle.remove()
    assert torch.equal(seen["out"], seen["in"])
    assert not torch.allclose(ablated, base, atol=1e-4)
    assert torch.equal(logits(model), base) and params_digest(model) == digest


def test_skipping_every_layer_leaves_embed_norm_head():
    model = tiny_model("llama")
    with skip_layers(ArchitectureAdapter(model), [0, 1, 2]):
        got = logits(model)
    want = model.lm_head(model.model.norm(model.model.embed_tokens(IDS)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _zero_cols(model, family, layer, heads):
    """Reference: a copy whose o_proj weight has the heads' input columns (rows for Conv1D) zeroed."""
    ref = copy.deepcopy(model)
    a = ArchitectureAdapter(ref)
    hd = getattr(ref.config, "head_dim", None) or ref.config.hidden_size // ref.config.num_attention_heads
    w = a.attn_out(layer).weight
    with torch.no_grad():
        for h in heads:
            if family == "gpt2":
                w[h * hd:(h + 1) * hd, :] = 0  # Conv1D [in, out]
            else:
                w[:, h * hd:(h + 1) * hd] = 0  # Linear [out, in]
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_head_pruning_equals_zeroing_o_proj_input_columns(family):
    model = tiny_model(family)
    digest = params_digest(model)
    with prune_heads(ArchitectureAdapter(model), [1], [1, 3]):
        got = logits(model)
    torch.testing.assert_close(got, logits(_zero_cols(model, family, 1, [1, 3])), rtol=1e-5, atol=1e-5)
    assert params_digest(model) == digest


def test_gqa_kv_head_prunes_its_query_group_and_never_k_v():
    model = tiny_model("llama")  # 4 query heads share 2 k/v heads
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    adapter = ArchitectureAdapter(model)
    kv_before = [p.clone() for p in (model.model.layers[2].self_attn.k_proj.weight,
                                     model.model.layers[2].self_attn.v_proj.weight)]
    with prune_heads(adapter, [2], [], kv_heads=[1]):
        got = logits(model)
    torch.testing.assert_close(got, logits(_zero_cols(model, "llama", 2, [2, 3])), rtol=1e-5, atol=1e-5)
    # one query head of the group is not the whole group: k/v head 1 still serves query head 3
    with prune_heads(adapter, [2], [2]):
        one = logits(model)
    assert not torch.allclose(one, got, atol=1e-4)
    assert torch.equal(kv_before[0], model.model.layers[2].self_attn.k_proj.weight)
    assert torch.equal(kv_before[1], model.model.layers[2].self_attn.v_proj.weight)


def test_kv_group_matches_transformers_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv

    n_heads, n_kv = 8, 2
    kv = torch.arange(n_kv, dtype=torch.float32).view(1, n_kv, 1, 1).expand(1, n_kv, 3, 4)  # value = kv index
    used = repeat_kv(kv, n_heads // n_kv)[0, :, 0, 0]  # [H]: the k/v head each query head reads
    for k in range(n_kv):
        assert kv_group(k, n_heads, n_kv) == [h for h in range(n_heads) if used[h] == k]
    assert query_heads([0], [1], n_heads, n_kv) == [0, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        kv_group(2, n_heads, n_kv)
    x = torch.randn(2, 3, 8 * 4, dtype=torch.float64)
    y = zero_heads(x, [1, 6], 8).view(2, 3, 8, 4)
    kept = [0, 2, 3, 4, 5, 7]
    assert (y[:, :, [1, 6]] == 0).all() and torch.equal(y[:, :, kept], x.view(2, 3, 8, 4)[:, :, kept])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ffn_ablation_equals_zeroed_down_projection(family):
    model = tiny_model(family)
    digest = params_digest(model)
    with zero_ffn(ArchitectureAdapter(model), [0, 2]):
        got = logits(model)
    ref = copy.deepcopy(model)
    a = ArchitectureAdapter(ref)
    with torch.no_grad():
        for i in (0, 2):
            a.mlp_out(i).weight.zero_()
            if getattr(a.mlp_out(i), "bias", None) is not None:
                a.mlp_out(i).bias.zero_()
    torch.testing.assert_close(got, logits(ref), rtol=1e-5, atol=1e-5)
    assert params_digest(model) == digest


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embed_dims_zeroed_at_layer_0_input(family):
    model = tiny_model(family)
    adapter = ArchitectureAdapter(model)
    seen0, handle = capture(adapter, "0")
    logits(model)
    dims = [0, 5, 31]
    with zero_embed_dims(adapter, dims):
        seen, h2 = capture(adapter, "0")
        logits(model)
        h2.remove()
    handle.remove()
    keep = [i for i in range(32) if i not in dims]
    assert (seen["in"][..., dims] == 0).all()
    assert torch.equal(seen["in"][..., keep], seen0["in"][..., keep])
    with pytest.raises(ConfigError, match="outside"):
        with zero_embed_dims(adapter, [32]):
            pass


def test_ablation_schema_rejects_typos_and_wrong_fields():
    with pytest.raises(ValueError, match="extra"):
        Ablation.model_validate({"kind": "layer", "layer": [1]})
    with pytest.raises(ValueError, match="takes"):
        Ablation(kind="ffn", layers=[1], dims=[2])
    with pytest.raises(ValueError, match="needs"):
        Ablation(kind="heads", layers=[1])
    sweep = Ablation(kind="layer", layers="all", each=True).expand(3)
    assert [a.layers for a in sweep] == [[0], [1], [2]]
    with pytest.raises(ConfigError, match="outside"):
        Ablation(kind="ffn", layers=[3]).expand(3)


def test_example_configs_validate_and_bad_yaml_lists_every_error(tmp_path):
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files
    for f in files:
        load_study(f)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nmetircs: [log_odds]\nablations:\n  - {kind: nope}\n")
    with pytest.raises(ConfigError) as err:
        load_study(bad)
    assert "metircs" in str(err.value) and "ablations.0" in str(err.value)


def _loaded(family="llama"):
    model = tiny_model(family)
    return Loaded(model, tiny_tokenizer(), ArchitectureAdapter(model), "tiny", "tiny")


SMALL = {"data": {"n_train": 2, "n_val": 1, "n_test": 4}, "evaluate": {"max_new_tokens": 3, "kl_tokens": 3}}


def test_runner_rows_match_weight_edited_copies_and_leave_weights_alone(tmp_path, monkeypatch):
    from obliteratus.select.layers import refusal_log_odds, refusal_token_ids
    from obliteratus.shared_prefix import last_logits
    from obliteratus.studies import runner
    from obliteratus.studies.save import write_study

    built = []  # the evaluator (base outputs, encoded prompts) is built once per study, not per ablation
    init = runner.Evaluator.__init__
    monkeypatch.setattr(runner.Evaluator, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])

    loaded = _loaded()
    settings = resolve_settings(None, SMALL)
    prompts = prepare_prompts(loaded.tokenizer, settings)
    config = StudyConfig(model="tiny", metrics=["log_odds", "generate"], ablations=[
        Ablation(kind="ffn", layers=[1]), Ablation(kind="heads", layers=[0], kv_heads=[0]),
        Ablation(kind="layer", layers="all", each=True), Ablation(kind="embed_dims", dims=[1, 2])])
    digest = params_digest(loaded.model)
    result = run_study(loaded, prompts, settings, config)
    assert params_digest(loaded.model) == digest
    labels = [r.label for r in result.rows]
    assert labels[0] == "(none)" and len(labels) == 1 + 2 + 3 + 1 and len(built) == 1
    base = result.rows[0].metrics
    assert base["kl_last"] == pytest.approx(0, abs=1e-9) and base["kl_mean"] == pytest.approx(0, abs=1e-6)
    # the ffn row equals a copy with layer 1's down projection zeroed
    ref = copy.deepcopy(loaded.model)
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight.zero_()
    want = float(refusal_log_odds(last_logits(ref, prompts.encoded["harmful.test"]),
                                  refusal_token_ids(loaded.tokenizer)).mean())
    assert result.rows[1].metrics["log_odds_harmful"] == pytest.approx(want, abs=1e-5)
    assert result.rows[1].metrics["kl_last"] > 1e-6
    out = write_study(result, tmp_path / "s", False, "model: tiny\n")
    table = (out / "study.md").read_text()
    assert "| ffn L1 |" in table and "log_odds_harmful" in table and table.count("\n|") == 2 + len(labels)
    data = json.loads((out / "study.json").read_text())
    assert [r["label"] for r in data["rows"]] == labels


def test_study_command_end_to_end(tmp_path):
    from obliteratus.commands.study import study

    src = save_tiny(tmp_path, "qwen2")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: t\nmodel: {src}\nsettings: {json.dumps(SMALL)}\nmetrics: [log_odds, perplexity]\n"
                   "ablations:\n  - {kind: heads, layers: [0, 1], heads: [0]}\n")
    study(cfg, tmp_path / "out", False)
    data = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["(none)", "heads L0,1 q0"]
    assert data["rows"][1]["metrics"]["perplexity"] != data["rows"][0]["metrics"]["perplexity"]
