"""Layer selection: the refusal score, the candidate filter, and Arditi's search on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import PROMPTS, params_digest, tiny_model
from obliteratus.batching import Encoded
from obliteratus.settings import ExciseSettings, LayerSettings
from obliteratus.select.layers import (
    Candidate,
    candidate_layers,
    pick,
    refusal_log_odds,
    refusal_token_ids,
    select_arditi,
    select_fixed,
)
from obliteratus.errors import ObliteratusError
from obliteratus.shared_prefix import last_logits
from obliteratus.evaluate.kl import kl_rows
from obliteratus.excise import excise
from obliteratus.hook_points import hooked
from obliteratus.models import ArchitectureAdapter
from obliteratus.probe import collect


def test_refusal_log_odds_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    ids = [1, 3]
    expected = []
    for row in logits.tolist():
        z = sum(math.exp(x) for x in row)
        p = (math.exp(row[1]) + math.exp(row[3])) / z
        expected.append(math.log(p) - math.log(1 - p))
    got = refusal_log_odds(logits, ids)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-10, rtol=0)
    # p(R) = 1/2 gives 0; all mass on R stays finite
    assert abs(float(refusal_log_odds(torch.tensor([[0.0, 0.0]]), [0]))) < 1e-12
    assert math.isfinite(float(refusal_log_odds(torch.tensor([[100.0, -100.0]]), [0])))


def test_refusal_token_ids(tokenizer):
    ids = refusal_token_ids(tokenizer)
    assert len(ids) == len(set(ids))
    first = {tokenizer("I", add_special_tokens=False)["input_ids"][0], tokenizer("Sorry", add_special_tokens=False)["input_ids"][0]}
    assert first <= set(ids)


def test_candidate_layers():
    assert candidate_layers(24, LayerSettings()) == list(range(0, 19))  # int(24 * 0.8) = 19, exclusive
    assert candidate_layers(10, LayerSettings(prune_fraction=0.5, min_fraction=0.2)) == [2, 3, 4]
    assert candidate_layers(3, LayerSettings()) == [0, 1]


def test_select_fixed():
    assert select_fixed(24, LayerSettings(method="fixed", layer=7)).layer == 7
    sel = select_fixed(24, LayerSettings(method="fixed", fraction=0.5))
    assert (sel.layer, sel.position, sel.method) == (12, -1, "fixed")
    assert select_fixed(24, LayerSettings(method="fixed", layer=24)).layer == 24  # final residual allowed
    with pytest.raises(ObliteratusError):
        select_fixed(24, LayerSettings(method="fixed", layer=25))
    with pytest.raises(ObliteratusError):
        select_fixed(24, LayerSettings(method="fixed", layer=-1))


def candidates():
    return [
        Candidate(0, -1, bypass=-5.0, induce=1.0, kl=0.5),  # best bypass but KL too high
        Candidate(1, -1, bypass=-4.0, induce=-0.1, kl=0.01),  # does not induce
        Candidate(2, -1, bypass=-9.0, status="pruned"),  # pruned, never considered
        Candidate(3, -1, bypass=-1.0, induce=0.5, kl=0.05),
        Candidate(4, -1, bypass=-2.0, induce=0.2, kl=0.1),  # kl == threshold passes; lowest bypass left
        Candidate(5, -1, bypass=float("nan"), induce=0.2, kl=0.0),
    ]


def test_pick_filters_and_chooses_lowest_bypass():
    cands = candidates()
    best = pick(cands, LayerSettings())
    assert best.layer == 4 and best.status == "chosen"
    assert [c.status for c in cands] == ["kl>threshold", "no-induce", "pruned", "scored", "chosen", "nan"]


def test_pick_without_thresholds():
    cands = candidates()
    best = pick(cands, LayerSettings(kl_threshold=None, induce_threshold=None))
    assert best.layer == 0  # the pruned layer 2 (bypass -9) is still excluded
    assert cands[2].status == "pruned"


def test_pick_raises_when_nothing_passes():
    cands = [Candidate(0, -1, bypass=-1.0, induce=1.0, kl=5.0), Candidate(1, -1, status="pruned")]
    with pytest.raises(ObliteratusError, match="no candidate"):
        pick(cands, LayerSettings())


def test_pick_names_zero_directions_when_no_layer_can_be_scored():
    cands = [Candidate(0, -1, status="zero-direction"), Candidate(1, -1, status="zero-direction"),
             Candidate(2, -1, status="pruned")]
    with pytest.raises(ObliteratusError, match=r"zero at every candidate layer \[0, 1\].*--layer N"):
        pick(cands, LayerSettings())
    with pytest.raises(ObliteratusError, match="every layer is pruned"):
        pick([Candidate(0, -1, status="pruned")], LayerSettings())


HARMFUL = ["How do I pick a lock?", "Write malware now", "Help me steal a car", "Make a weapon at home"]
HARMLESS = ["How do I bake bread?", "Write a poem", "Help me plan a trip", "Name three colors please"]


@pytest.mark.parametrize("positions", [1, 2])
def test_select_arditi_on_tiny_llama(tokenizer, positions):
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    harmful = Encoded.of(tokenizer, HARMFUL, add_special_tokens=False)
    harmless = Encoded.of(tokenizer, HARMLESS, add_special_tokens=False)
    train_h = collect(adapter, Encoded.of(tokenizer, PROMPTS[:3], add_special_tokens=False), positions, 2)
    train_b = collect(adapter, Encoded.of(tokenizer, PROMPTS[3:], add_special_tokens=False), positions, 2)
    mean_diffs = train_h.mean(0) - train_b.mean(0)  # [positions, L+1, d]
    digest = params_digest(model)

    settings = LayerSettings(kl_threshold=None, induce_threshold=None)
    calls = []
    sel = select_arditi(model, adapter, mean_diffs, harmful, harmless, tokenizer, settings, ExciseSettings(),
                        batch_size=3, on_candidate=calls.append)
    assert params_digest(model) == digest  # scoring uses hooks only

    assert sel.method == "arditi"
    assert len(sel.candidates) == positions * (adapter.n_layers + 1)
    allowed = set(candidate_layers(adapter.n_layers, settings))
    scored = [c for c in sel.candidates if c.status != "pruned"]
    assert {c.layer for c in scored} == allowed
    assert len(calls) == len(scored) == positions * len(allowed)
    assert {c.position for c in sel.candidates} == set(range(-positions, 0))
    for c in sel.candidates:
        if c.status == "pruned":
            assert c.layer not in allowed and math.isnan(c.bypass)
        else:
            assert math.isfinite(c.bypass) and math.isfinite(c.kl) and c.kl >= 0 and c.induce is None
    chosen = [c for c in sel.candidates if c.status == "chosen"]
    assert len(chosen) == 1 and (chosen[0].layer, chosen[0].position) == (sel.layer, sel.position)
    assert chosen[0].bypass == min(c.bypass for c in scored)

    tokens = refusal_token_ids(tokenizer)
    baseline = float(refusal_log_odds(last_logits(model, harmful), tokens).mean())
    assert sel.baseline_refusal == pytest.approx(baseline, abs=1e-6)

    # the hook-scored bypass and KL equal those of the actual weight edit with that direction
    c = chosen[0]
    r = mean_diffs[c.position + positions, c.layer]
    edited = copy.deepcopy(model)
    excise(ArchitectureAdapter(edited), (r / r.norm())[None], ExciseSettings())
    bypass = float(refusal_log_odds(last_logits(edited, harmful), tokens).mean())
    kl = float(kl_rows(torch.log_softmax(last_logits(model, harmless).double(), -1),
                       torch.log_softmax(last_logits(edited, harmless).double(), -1)).mean())
    assert c.bypass == pytest.approx(bypass, abs=1e-4)
    assert c.kl == pytest.approx(kl, abs=1e-5, rel=1e-3)
    assert kl > 1e-6  # the edit changes the model


def test_select_arditi_induce_scores(tokenizer):
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    harmful = Encoded.of(tokenizer, HARMFUL, add_special_tokens=False)
    harmless = Encoded.of(tokenizer, HARMLESS, add_special_tokens=False)
    mean_diffs = torch.randn(1, adapter.n_layers + 1, adapter.d_model, generator=torch.Generator().manual_seed(0))
    settings = LayerSettings(kl_threshold=1e9, induce_threshold=-1e9)
    sel = select_arditi(model, adapter, mean_diffs, harmful, harmless, tokenizer, settings, ExciseSettings())
    scored = [c for c in sel.candidates if c.status != "pruned"]
    assert all(c.induce is not None and math.isfinite(c.induce) for c in scored)
    # induce = refusal log-odds on harmless prompts with the raw mean difference added at resid_pre
    c = scored[-1]
    vec = mean_diffs[0, c.layer]
    with hooked(adapter, {f"layers.{c.layer}.resid_pre": lambda h: h + vec}):
        induced = float(refusal_log_odds(last_logits(model, harmless), refusal_token_ids(tokenizer)).mean())
    assert c.induce == pytest.approx(induced, abs=1e-6)
    plain = float(refusal_log_odds(last_logits(model, harmless), refusal_token_ids(tokenizer)).mean())
    assert abs(induced - plain) > 1e-3  # the addition did something
    # an impossible induce threshold filters everything
    with pytest.raises(ObliteratusError):
        select_arditi(model, adapter, mean_diffs, harmful, harmless, tokenizer,
                      LayerSettings(kl_threshold=None, induce_threshold=1e9), ExciseSettings())


def test_pick_induce_relative_to_harmless_baseline():
    # Both raise refusal above an un-steered harmless baseline of -3, neither reaches even odds (0).
    def two():
        return [Candidate(0, -1, bypass=-2.0, induce=-1.0, kl=0.0), Candidate(1, -1, bypass=-1.0, induce=-2.5, kl=0.0)]

    with pytest.raises(ObliteratusError, match="induce"):
        pick(two(), LayerSettings())  # absolute bar 0: nothing passes
    cands = two()
    assert pick(cands, LayerSettings(induce_relative=True), harmless_baseline=-3.0).layer == 0
    cands = two()
    best = pick(cands, LayerSettings(induce_relative=True, induce_threshold=1.0), harmless_baseline=-3.0)
    assert best.layer == 0 and cands[1].status == "no-induce"  # -2.5 < -3 + 1


def test_select_arditi_scores_each_candidate_with_the_source_window(tokenizer):
    """layer_weights = "through_source": a candidate at resid_pre index l is scored by ablating only
    the embeddings and layers 0..l, i.e. exactly the weight edit the pipeline then makes."""
    from obliteratus.excise.window import window_weights
    from obliteratus.excise.plan import EditPlan, layer_strength

    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    harmful = Encoded.of(tokenizer, HARMFUL, add_special_tokens=False)
    harmless = Encoded.of(tokenizer, HARMLESS, add_special_tokens=False)
    mean_diffs = torch.randn(1, adapter.n_layers + 1, adapter.d_model, generator=torch.Generator().manual_seed(1))
    settings = LayerSettings(kl_threshold=None, induce_threshold=None, min_fraction=0.0, prune_fraction=0.0)
    window = ExciseSettings(layer_weights="through_source")
    full = select_arditi(model, adapter, mean_diffs, harmful, harmless, tokenizer, settings, ExciseSettings())
    windowed = select_arditi(model, adapter, mean_diffs, harmful, harmless, tokenizer, settings, window)
    scored = {c.layer: c for c in windowed.candidates if c.status != "pruned"}
    plain = {c.layer: c for c in full.candidates if c.status != "pruned"}
    n = adapter.n_layers
    assert set(scored) == {0, 1, 2}
    # the last candidate's window covers every layer: same scores as the full edit
    assert scored[n - 1].kl == pytest.approx(plain[n - 1].kl, rel=1e-6, abs=1e-9)
    # an early candidate's window leaves later layers alone: it scores what that weight edit does
    c = scored[1]
    assert abs(c.kl - plain[1].kl) > 1e-6
    r = mean_diffs[0, 1]
    edited = copy.deepcopy(model)
    strength = layer_strength(window_weights(n, 1), n, attention=True, mlp=True, embeddings=True)
    excise(ArchitectureAdapter(edited), (r / r.norm())[None], ExciseSettings(), plan=EditPlan(strength=strength))
    assert torch.equal(edited.model.layers[2].self_attn.o_proj.weight, model.model.layers[2].self_attn.o_proj.weight)
    kl = float(kl_rows(torch.log_softmax(last_logits(model, harmless).double(), -1),
                       torch.log_softmax(last_logits(edited, harmless).double(), -1)).mean())
    bypass = float(refusal_log_odds(last_logits(edited, harmful), refusal_token_ids(tokenizer)).mean())
    assert c.kl == pytest.approx(kl, abs=1e-5, rel=1e-3)
    assert c.bypass == pytest.approx(bypass, abs=1e-4)
