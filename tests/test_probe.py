"""PROBE: residual activations at the last k positions of every layer."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, tiny_model
from obliteratus.batching import Encoded
from obliteratus.errors import ActivationError
from obliteratus.models import ArchitectureAdapter
from obliteratus.probe import ActivationCache, collect



def encode(tokenizer, texts=PROMPTS) -> Encoded:
    return Encoded.of(tokenizer, texts, add_special_tokens=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", [1, 2])
def test_collect_shape_and_dtype(tokenizer, family, positions):
    adapter = ArchitectureAdapter(tiny_model(family))
    acts = collect(adapter, encode(tokenizer), positions=positions, batch_size=2)
    assert acts.shape == (len(PROMPTS), positions, 4, 32)
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"
    assert torch.isfinite(acts).all()
    assert acts.std() > 0.05  # not a constant


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time(tokenizer, family):
    lengths = sorted(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert lengths[-1] > 10 * lengths[0]  # very different lengths: lots of left padding
    adapter = ArchitectureAdapter(tiny_model(family))
    enc = encode(tokenizer)
    batched = collect(adapter, enc, positions=2, batch_size=3)
    single = torch.cat([collect(adapter, encode(tokenizer, [p]), positions=2, batch_size=1) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_rows_follow_input_order(tokenizer):
    adapter = ArchitectureAdapter(tiny_model("llama"))
    forward = collect(adapter, encode(tokenizer), batch_size=2)
    backward = collect(adapter, encode(tokenizer, PROMPTS[::-1]), batch_size=2)
    torch.testing.assert_close(forward, backward.flip(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_matches_hidden_states(tokenizer, family):
    model = tiny_model(family)
    adapter = ArchitectureAdapter(model)
    text = PROMPTS[2]
    acts = collect(adapter, encode(tokenizer, [text]), positions=3, batch_size=1)[0]  # [3, L+1, d]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    L = adapter.n_layers
    assert len(hidden) == L + 1
    for j in range(L):  # j = 0 is the embedding output; j is resid_pre of layer j
        torch.testing.assert_close(acts[:, j], hidden[j][0, -3:], atol=1e-5, rtol=1e-5)
    # the last slot is the final residual before the final norm (HF's last hidden state is after it)
    with torch.no_grad():
        torch.testing.assert_close(adapter.final_norm(acts[:, L]), hidden[L][0, -3:], atol=1e-5, rtol=1e-5)


def test_positions_longer_than_shortest_prompt(tokenizer):
    adapter = ArchitectureAdapter(tiny_model("llama"))
    shortest = min(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    collect(adapter, encode(tokenizer), positions=shortest, batch_size=4)
    with pytest.raises(ActivationError, match="positions"):
        collect(adapter, encode(tokenizer), positions=shortest + 1, batch_size=4)


def test_activation_cache_validation():
    good = torch.randn(4, 2, 5, 8)
    cache = ActivationCache(good, torch.randn(3, 2, 5, 8))
    assert (cache.n_positions, cache.n_layers) == (2, 4)
    h, b = cache.at(layer=3, position=-1)
    torch.testing.assert_close(h, good[:, -1, 3])
    assert b.shape == (3, 8)

    bad = good.clone()
    bad[2, 1, 4, 0] = float("nan")
    with pytest.raises(ActivationError, match="prompt 2"):
        ActivationCache(bad, good)
    inf = good.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(ActivationError):
        ActivationCache(good, inf)
    with pytest.raises(ActivationError):
        ActivationCache(good[0], good[0])  # wrong rank
    with pytest.raises(ActivationError):
        ActivationCache(good, torch.randn(4, 2, 6, 8))  # shapes differ
