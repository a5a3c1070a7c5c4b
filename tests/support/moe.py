"""Tiny random mixture-of-experts LMs of every supported MoE family (2 layers, d = 32, 4 experts, top 2)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import VOCAB

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
D, E, TOPK = 32, 4, 2


def moe_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=256, pad_token_id=256, eos_token_id=257,
                  bos_token_id=258, num_experts_per_tok=TOPK)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=E, head_dim=8, sliding_window=None, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=24, **common)
    if family == "qwen3_moe":  # 3 layers, the last one dense: mixed MoE/dense models are handled
        return tf.Qwen3MoeConfig(num_experts=E, moe_intermediate_size=16, head_dim=8, mlp_only_layers=[2],
                                 **{**common, "num_hidden_layers": 3})
    if family == "gpt_oss":
        return tf.GptOssConfig(num_local_experts=E, head_dim=8, sliding_window=64, **common)
    raise ValueError(family)


def moe_model(family: str, seed: int = 0, config=None) -> nn.Module:
    """Tiny random MoE LM: every weight (fused experts and routers included) ~ N(0, 0.2²), biases ~ N(0, 0.1²).
    `config` replaces ``moe_config(family)``."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config or moe_config(family)).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            std = 0.1 if "bias" in name or "sinks" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.eval().requires_grad_(False)
    assert model.config.model_type == family
    return model
