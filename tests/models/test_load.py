"""SUMMON's choice of model class, before any weight is read, and the multimodal round trip: an
image-text-to-text checkpoint loads with its own class and processor, only its text decoder is
edited, and the saved result reloads with ``AutoModelForImageTextToText``, its vision tower and
projector byte-identical to the input's and its processor files beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, BertConfig, CLIPConfig,
                          Gemma3Config, Llama4Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, OPTConfig, OPTForCausalLM, T5Config, XLNetConfig, XLNetLMHeadModel)

from conftest import BOS, EOS, PAD, VOCAB, merge, reinit, tiny_tokenizer
from obliteratus import obliterate
from obliteratus.errors import UnsupportedArchitectureError
from obliteratus.models.load import model_class, summon
from support.cli import FAST, assert_one_error, run_cli
from support.multimodal import digests, tiny_llava

SMALL = {"data": {"n_train": 8, "n_val": 2, "n_test": 2},
         "evaluate": {"max_new_tokens": 2, "kl_tokens": 1, "perplexity": False},
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9, "prune_fraction": 0.0}}


@pytest.mark.parametrize("config,auto", [
    (LlamaConfig(), AutoModelForCausalLM),
    (Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]), AutoModelForImageTextToText),
    # Llama 4 has both classes: the checkpoint's own decides (a causal LM would drop the vision tower)
    (Llama4Config(architectures=["Llama4ForConditionalGeneration"]), AutoModelForImageTextToText),
    (Llama4Config(architectures=["Llama4ForCausalLM"]), AutoModelForCausalLM),
    (LlavaConfig(), AutoModelForImageTextToText),
    (OPTConfig(), AutoModelForCausalLM),  # outside the adapter's table: discovery decides after loading
])
def test_the_class_is_the_checkpoints_own(config, auto):
    assert model_class(config) is auto


@pytest.mark.parametrize("config,needle", [
    (T5Config(), "encoder-decoder"),
    (BertConfig(), "encoder-only"),
    (CLIPConfig(), "no causal-LM or image-text-to-text class"),
])
def test_what_is_not_a_decoder_is_refused_before_loading(config, needle):
    with pytest.raises(UnsupportedArchitectureError, match=needle):
        model_class(config)


def test_remote_code_is_named_not_used():
    config = LlamaConfig()
    config.model_type = "brand_new"
    config.auto_map = {"AutoModelForCausalLM": "modeling_new.NewForCausalLM"}
    with pytest.raises(UnsupportedArchitectureError, match="trust_remote_code=true"):
        model_class(config)
    assert model_class(config, trust_remote_code=True) is AutoModelForCausalLM


def test_a_family_outside_the_table_runs_from_the_cli(tmp_path, capsys, monkeypatch):
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS,
                    bos_token_id=BOS)
    torch.manual_seed(0)
    reinit(OPTForCausalLM(cfg)).save_pretrained(tmp_path / "opt")
    tiny_tokenizer().save_pretrained(tmp_path / "opt")
    out = tmp_path / "out"
    code, _, err = run_cli(["obliterate", str(tmp_path / "opt"), "--output", str(out), "--layer", "1", *FAST],
                           capsys, monkeypatch)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "opt"


def test_a_decoder_discovery_cannot_edit_exactly_is_one_error(tmp_path, capsys, monkeypatch):
    # XLNet's attention writes through a bare [d, heads, head_dim] parameter before a post-LN norm: no
    # writer discovery can project
    cfg = XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
    XLNetLMHeadModel(cfg).save_pretrained(tmp_path / "xlnet")
    tiny_tokenizer().save_pretrained(tmp_path / "xlnet")
    code, _, err = run_cli(["obliterate", str(tmp_path / "xlnet"), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "unsupported architecture 'xlnet'")
    assert "Llama" in err and "GPT-NeoX" in err  # the table's families are named


def test_an_encoder_decoder_is_refused_before_its_weights_load(tmp_path, capsys, monkeypatch):
    (tmp_path / "t5").mkdir()
    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=VOCAB).save_pretrained(tmp_path / "t5")
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "t5" / "model.safetensors"))  # never read
    code, _, err = run_cli(["obliterate", str(tmp_path / "t5"), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "encoder-decoder")


def test_a_multimodal_model_keeps_its_vision_tower_and_processor(tmp_path):
    source = tiny_llava(tmp_path / "llava")
    before = digests(source)
    loaded = summon(str(source))
    assert type(loaded.model) is LlavaForConditionalGeneration and loaded.processor is not None
    names = {id(m): n for n, m in loaded.model.named_modules()}
    assert all(names[id(w.module)].startswith("model.language_model.") for w in loaded.adapter.writers(embeddings=False))
    run = obliterate(loaded, "basic", output=tmp_path / "out", **merge(SMALL))
    out = Path(run.output)
    after = digests(out)
    assert before.keys() == after.keys()
    # transformers saves LLaVA in its original key layout (language_model.model..., language_model.lm_head)
    text = [k for k in before if k.startswith(("language_model.", "model.language_model.", "lm_head."))]
    other = [k for k in before if k not in text]
    assert any("vision_tower" in k for k in other) and any("multi_modal_projector" in k for k in other)
    assert [k for k in other if before[k] != after[k]] == []  # vision tower and projector byte-identical
    assert any(before[k] != after[k] for k in text)  # and the text decoder edited
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded) is LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor) is LlavaProcessor and processor.tokenizer.chat_template == loaded.tokenizer.chat_template
    # the saved model is the edited one: the same logits on a text-only input
    ids = torch.tensor([[BOS, 72, 105, 33]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)
