"""The behaviour contrast: grouping harmful prompts by the model's own refusal decision."""

from __future__ import annotations

import pytest
import torch

from obliteratus.batching import Encoded
from obliteratus.directions.contrast import final_logits, split_by_refusal
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.probe import collect
from conftest import tiny_model

PROMPTS = ["hello there", "a much longer prompt than the first one", "mid size prompt", "x"]


def test_split_groups_harmful_prompts_by_log_odds():
    harmful = torch.arange(6.0)[:, None].repeat(1, 3)  # row i is all i
    harmless = torch.full((4, 3), -1.0)
    log_odds = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.2])
    c = split_by_refusal(harmful, harmless, log_odds, threshold=0.0, min_group=3)
    assert c.kind == "behaviour" and not c.fallback
    assert c.positive[:, 0].tolist() == [0.0, 2.0, 4.0]
    assert c.negative[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert c.info()["n_refused"] == 3 and c.info()["n_positive"] == 3


def test_split_threshold_moves_the_boundary():
    harmful, harmless = torch.arange(6.0)[:, None], torch.zeros(2, 1)
    log_odds = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.2])
    c = split_by_refusal(harmful, harmless, log_odds, threshold=0.75, min_group=2)
    assert c.positive[:, 0].tolist() == [0.0, 4.0]


def test_split_falls_back_to_harmless_when_nearly_everything_is_refused():
    harmful, harmless = torch.arange(6.0)[:, None], torch.full((4, 1), -1.0)
    log_odds = torch.tensor([2.0, 1.0, 0.5, 3.0, 1.0, -0.2])  # one answered prompt < min_group
    c = split_by_refusal(harmful, harmless, log_odds, min_group=2)
    assert c.fallback and torch.equal(c.negative, harmless)
    assert c.positive[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # the refused ones
    c = split_by_refusal(harmful, harmless, -log_odds.abs(), min_group=2)  # nothing refused
    assert c.fallback and torch.equal(c.positive, harmful)


def test_split_rejects_misshaped_scores():
    with pytest.raises(ValueError):
        split_by_refusal(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(2))


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_final_logits_from_the_cache_equal_the_models_last_logits(tokenizer, family):
    model = tiny_model(family)
    if family == "gemma2":
        model.config.final_logit_softcapping = 5.0
    adapter = ArchitectureAdapter(model)
    enc = Encoded.of(tokenizer, PROMPTS, add_special_tokens=False)
    acts = collect(adapter, enc, positions=1)  # [n, 1, L+1, d]
    ours = final_logits(adapter, acts[:, -1, -1])
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            ref = model(input_ids=ids).logits[0, -1].float()
            torch.testing.assert_close(ours[i], ref, atol=1e-4, rtol=1e-4)


def test_filter_keeps_refused_harmful_and_unrefused_harmless():
    from obliteratus.directions.contrast import filter_by_refusal

    harmful, harmless = torch.arange(4.0)[:, None], torch.arange(10.0, 14.0)[:, None]
    c = filter_by_refusal(harmful, harmless, torch.tensor([1.0, -1.0, 2.0, 3.0]), torch.tensor([-1.0, 2.0, -3.0, -0.5]),
                          min_group=2)
    assert c.kind == "filtered" and not c.fallback
    assert c.positive[:, 0].tolist() == [0.0, 2.0, 3.0] and c.negative[:, 0].tolist() == [10.0, 12.0, 13.0]
    c = filter_by_refusal(harmful, harmless, torch.tensor([1.0, -1.0, -2.0, -3.0]), torch.zeros(4) - 1, min_group=2)
    assert c.fallback and torch.equal(c.positive, harmful)


def test_generate_labels_come_from_the_judged_answers(monkeypatch, tokenizer):
    from types import SimpleNamespace

    from obliteratus.settings import resolve_settings
    from obliteratus.directions import driver
    from obliteratus.probe import ActivationCache

    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    enc = Encoded.of(tokenizer, PROMPTS, add_special_tokens=False)
    acts = collect(adapter, enc, positions=1)
    cache = ActivationCache(acts, acts.flip(0))
    verdicts = [True, False, True, False]
    monkeypatch.setattr(driver, "judge", lambda *a, **k: SimpleNamespace(refused=verdicts))
    settings = resolve_settings(None, {"directions": {"contrast": "behaviour", "min_group": 2}})
    c = driver.contrast_groups(adapter, tokenizer, cache, settings, {"harmful": enc, "harmless": enc})
    assert c.labels == "generate" and not c.fallback
    assert torch.equal(c.positive, acts[[0, 2]]) and torch.equal(c.negative, acts[[1, 3]])


def test_filtered_generate_labels_judge_both_sides(monkeypatch, tokenizer):
    """basic's contrast: harmful prompts whose answers refuse vs harmless prompts whose answers do not,
    each side judged from its own generated answers."""
    from types import SimpleNamespace

    from obliteratus.settings import resolve_settings
    from obliteratus.directions import driver
    from obliteratus.presets import load_preset
    from obliteratus.probe import ActivationCache

    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    enc = Encoded.of(tokenizer, PROMPTS, add_special_tokens=False)
    acts = collect(adapter, enc, positions=1)
    harmless_acts = acts.flip(0)
    cache = ActivationCache(acts, harmless_acts)
    calls = iter([[True, False, True, True], [False, True, False, False]])  # harmful, then harmless answers
    monkeypatch.setattr(driver, "judge", lambda *a, **k: SimpleNamespace(refused=next(calls)))
    settings = resolve_settings(load_preset("basic"), {"directions": {"min_group": 2}})
    assert settings.directions.contrast == "filtered" and settings.directions.label == "generate"
    c = driver.contrast_groups(adapter, tokenizer, cache, settings, {"harmful": enc, "harmless": enc})
    assert c.kind == "filtered" and c.labels == "generate" and not c.fallback
    assert torch.equal(c.positive, acts[[0, 2, 3]]) and torch.equal(c.negative, harmless_acts[[0, 2, 3]])
