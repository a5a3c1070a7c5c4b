"""A tiny image-text-to-text checkpoint with its processor, and per-tensor digests of a saved model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from conftest import BOS, EOS, PAD, VOCAB, reinit, tiny_tokenizer


def tiny_llava(where: Path) -> Path:
    """A tiny LLaVA (Llama text decoder, CLIP vision tower, projector) with its processor."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                       bos_token_id=BOS, max_position_embeddings=256)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    reinit(LlavaForConditionalGeneration(config)).save_pretrained(where)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", chat_template=tok.chat_template).save_pretrained(where)
    return where


def digests(path: Path) -> dict[str, str]:
    """sha256 of every tensor of `path`/model.safetensors, by name."""
    tensors = load_file(str(path / "model.safetensors"))
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}
