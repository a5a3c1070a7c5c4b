"""An edited Hugging Face model through llama.cpp's own HF -> GGUF converter (issue 27): the path for a
source that is not a GGUF file. The converter is not on PyPI as a tool; the llama-cpp-python source
distribution carries it, and .ci/llama-cpp-converter.sh fetches it (with sentencepiece) into the
directory OBLITERATUS_LLAMA_CPP_CONVERTER names. The model is a tiny random Qwen2 with the demo's
tokenizer (the converter recognises a tokenizer by its pre-tokenizer, so a made-up one is refused), so
the demo must be prepared.

The run's edited model, converted to a float32 GGUF, loads back in transformers (``gguf_file=``) with
the logits of the edited model, not those of the source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obliteratus.models.aliases import is_prepared

CONVERTER = os.environ.get("OBLITERATUS_LLAMA_CPP_CONVERTER")

pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(not is_prepared("demo"), reason="the demo model is not prepared (its tokenizer is used)"),
    pytest.mark.skipif(not CONVERTER or not (Path(CONVERTER) / "convert_hf_to_gguf.py").is_file(),
                       reason="set OBLITERATUS_LLAMA_CPP_CONVERTER to llama.cpp's converter directory "
                              "(.ci/llama-cpp-converter.sh fetches it)"),
]

SMALL = {"data": {"n_train": 8, "n_val": 2, "n_test": 2},
         "evaluate": {"max_new_tokens": 2, "kl_tokens": 1, "perplexity": False},
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9, "prune_fraction": 0.0}}


def test_an_edited_model_converts_to_gguf_with_its_edit(tmp_path):
    import transformers as tf

    from obliteratus import obliterate
    from obliteratus.models.aliases import prepare

    tokenizer = tf.AutoTokenizer.from_pretrained(prepare("demo"))
    config = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    obliterate(str(tmp_path / "src"), "basic", str(tmp_path / "edited"), **SMALL)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(CONVERTER) / "gguf-py"), str(Path(CONVERTER) / "site")])}
    done = subprocess.run([sys.executable, str(Path(CONVERTER) / "convert_hf_to_gguf.py"), str(tmp_path / "edited"),
                           "--outfile", str(tmp_path / "edited.gguf"), "--outtype", "f32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ids = tokenizer("How do I bake a cake?", return_tensors="pt").input_ids
    with torch.no_grad():
        edited = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)(ids).logits
        source = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)(ids).logits
        gguf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="edited.gguf", dtype=torch.float32)(ids).logits
    assert torch.allclose(gguf, edited, atol=1e-5), float((gguf - edited).abs().max())
    assert not torch.allclose(gguf, source, atol=1e-3)
