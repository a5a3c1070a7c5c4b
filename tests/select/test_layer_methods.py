"""Layer-selection catalogue beside Arditi's: knee of the strength curve, COSMIC, and heretic's
fractional-layer interpolation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import params_digest, random_unit, tiny_model
from obliteratus.batching import Encoded
from obliteratus.settings import ExciseSettings, LayerSettings
from obliteratus.select.cosmic import (
    CosmicCandidate,
    concept_cosine,
    evaluation_layers,
    layer_cosines,
    mean_unit,
    pick_cosmic,
    select_cosmic,
)
from obliteratus.select.interpolate import direction_at, from_heretic_index
from obliteratus.select.knee import kneedle, layer_strength, mean_norms, select_knee
from obliteratus.errors import ObliteratusError
from obliteratus.excise.hook_form import ablated
from obliteratus.hook_points import hooked
from obliteratus.models import ArchitectureAdapter
from obliteratus.probe import collect
from support.planted import HARMFUL, HARMLESS, TRAIN_HARMFUL, TRAIN_HARMLESS, planted

# --- knee -------------------------------------------------------------------------------------


def curve_rows(strength: list[float], norms: list[float] | None = None, d: int = 16, seed: int = 0) -> torch.Tensor:
    """[L+1, d] mean differences with ‖row l‖ = strength[l]·norms[l] in random directions."""
    units = random_unit(d, len(strength), seed, torch.float64)
    scale = torch.tensor(strength, dtype=torch.float64)
    if norms is not None:
        scale = scale * torch.tensor(norms, dtype=torch.float64)
    return units * scale[:, None]


# rises with slope 1 to layer 6, then slope 0.1 to its peak at 12, then falls back to 0
KNEE_CURVE = [float(x) for x in range(7)] + [6 + 0.1 * i for i in range(1, 7)] + [4.0, 2.0, 0.0]


def test_kneedle_finds_the_corner_of_a_piecewise_linear_rise():
    x = torch.arange(13, dtype=torch.float64)
    k, distance = kneedle(x, torch.tensor(KNEE_CURVE[:13], dtype=torch.float64))
    assert k == 6
    # D_6 = ŷ − x̂ = 6/6.6 − 6/12, by hand
    assert float(distance[6]) == pytest.approx(6 / 6.6 - 0.5, abs=1e-12)
    assert float(distance[0]) == 0.0 and float(distance[-1]) == pytest.approx(0.0, abs=1e-12)


def test_select_knee_cuts_at_peak_and_marks_statuses():
    sel = select_knee(curve_rows(KNEE_CURVE), None)
    assert (sel.layer, sel.position, sel.method) == (6, -1, "knee")
    statuses = [c.status for c in sel.candidates]
    assert statuses[6] == "chosen" and statuses[13:] == ["after-peak"] * 3
    assert all(s == "scored" for i, s in enumerate(statuses[:13]) if i != 6)
    assert [c.strength for c in sel.candidates] == pytest.approx(KNEE_CURVE)
    # without the cut, the chord from layer 0 to the last layer (both 0) would put the knee at the peak
    ys = torch.tensor(KNEE_CURVE, dtype=torch.float64)
    chord = (ys - torch.arange(16.0, dtype=torch.float64) / 15 * ys[-1])
    assert int(chord.argmax()) == 12


def test_select_knee_normalises_by_activation_norm():
    # relative strength has its knee at 6; norms grow 1.5x per layer, so the raw ‖Δμ‖ is convex
    rel = KNEE_CURVE[:13]
    norms = [1.5 ** i for i in range(13)]
    rows = curve_rows(rel, norms)
    assert select_knee(rows, torch.tensor(norms)).layer == 6
    assert select_knee(rows, None).layer == 12  # raw curve: no knee before its peak (the last layer)
    torch.testing.assert_close(layer_strength(rows, torch.tensor(norms)), torch.tensor(rel, dtype=torch.float64))


def test_select_knee_straight_rise_and_candidate_layers():
    sel = select_knee(curve_rows([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), None)
    assert sel.layer == 5  # a straight rise never flattens: the knee is the peak
    # ... also when rounding leaves D a few ulps above 0 somewhere (it did on a CUDA machine's torch build)
    x = torch.arange(6, dtype=torch.float64)
    bumped = x.clone()
    bumped[3] += 1e-14
    assert kneedle(x, x)[0] == 5 and kneedle(x, bumped)[0] == 5
    bent = x.clone()
    bent[3] += 1e-3
    assert kneedle(x, bent)[0] == 3
    sel = select_knee(curve_rows(KNEE_CURVE), None, layers=range(2, 10))
    assert sel.layer == 6
    assert [c.status for c in sel.candidates[:2]] == ["pruned", "pruned"]
    assert all(c.status == "pruned" for c in sel.candidates[10:])
    sel = select_knee(curve_rows(KNEE_CURVE), None, layers=range(8, 12))
    assert sel.layer == 11  # inside the flat part the rise is straight again
    with pytest.raises(ObliteratusError):
        select_knee(curve_rows(KNEE_CURVE), None, layers=[20])
    with pytest.raises(ObliteratusError):
        select_knee(curve_rows(KNEE_CURVE)[None], None)
    with pytest.raises(ObliteratusError, match="positive"):
        select_knee(curve_rows(KNEE_CURVE), torch.zeros(16))


def test_mean_norms():
    g = torch.Generator().manual_seed(1)
    h, b = torch.randn(3, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    expected = [sum(float(x[i, l].double().norm()) for x in (h, b) for i in range(x.shape[0])) / 5 for l in range(4)]
    assert mean_norms(h, b).tolist() == pytest.approx(expected, rel=1e-12)


# --- interpolation ----------------------------------------------------------------------------


def test_direction_at_integer_index_is_that_layers_unit_direction():
    rows = curve_rows([1.0, 2.0, 3.0, 4.0, 5.0]).float()
    for j in range(5):
        expected = (rows[j].double() / rows[j].double().norm()).float()
        assert torch.equal(direction_at(rows, float(j)), expected)
        assert torch.equal(direction_at(rows, j), expected)
    unit = rows / rows.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(direction_at(unit, 2.0), direction_at(rows, 2.0), atol=1e-7, rtol=0)


def test_direction_at_blends_normalised_rows():
    e = torch.eye(4, dtype=torch.float64)
    rows = torch.stack([2 * e[0], 5 * e[1], -3 * e[2]])  # raw norms differ; heretic normalises first
    torch.testing.assert_close(direction_at(rows, 0.5), ((e[0] + e[1]) / math.sqrt(2)).float())
    got = direction_at(rows, 1.25)
    want = 0.75 * e[1] - 0.25 * e[2]
    torch.testing.assert_close(got, (want / want.norm()).float())
    assert got.dtype == torch.float32 and float(got.norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(direction_at(rows, 2.0), -e[2].float())  # upper end reads no row past L


def test_direction_at_matches_heretic_indexing():
    # heretic: per-layer directions over HF hidden_states (0 = embeddings); index k is shifted by one,
    # then modf gives (weight, floor); lerp the two normalised rows and normalise.
    rows = curve_rows([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], seed=3)
    unit = rows / rows.norm(dim=-1, keepdim=True)
    for k in (0.0, 0.3, 1.5, 3.99):
        weight, whole = math.modf(k + 1)
        ref = torch.lerp(unit[int(whole)], unit[int(whole) + 1], weight)
        ref = ref / ref.norm()
        torch.testing.assert_close(direction_at(rows, from_heretic_index(k)), ref.float(), atol=1e-6, rtol=0)


def test_direction_at_rejects_bad_indices():
    rows = curve_rows([1.0, 2.0, 3.0])
    for bad in (-0.01, 2.0001, float("nan"), float("inf")):
        with pytest.raises(ObliteratusError, match="outside the layer axis 0..2"):
            direction_at(rows, bad)
    with pytest.raises(ObliteratusError, match="opposite"):
        direction_at(torch.stack([rows[0], -rows[0]]), 0.5)
    with pytest.raises(ObliteratusError, match="zero"):
        direction_at(torch.zeros(3, 4), 1.0)


# --- COSMIC: pure scoring ---------------------------------------------------------------------


def test_evaluation_layers_rank_lowest_cosine_and_skip_embeddings():
    L, d = 20, 8
    g = torch.Generator().manual_seed(0)
    harmless = torch.randn(L + 1, d, generator=g, dtype=torch.float64)
    angles = torch.linspace(0.05, 0.5, L + 1, dtype=torch.float64)
    angles[0], angles[13], angles[7] = 3.0, 2.0, 1.5  # axis 0 is least similar but is the embedding
    other = random_unit(d, 1, 5, torch.float64)[0]
    perp = other - (other @ harmless.T)[:, None] * harmless / (harmless.norm(dim=-1, keepdim=True) ** 2)
    perp = perp / perp.norm(dim=-1, keepdim=True)
    along = harmless / harmless.norm(dim=-1, keepdim=True)
    harmful = (torch.cos(angles)[:, None] * along + torch.sin(angles)[:, None] * perp) * 3  # at angle θ_l
    torch.testing.assert_close(layer_cosines(harmful, harmless), torch.cos(angles))
    assert evaluation_layers(harmful, harmless, 0.1) == [13, 7]  # ⌊0.1·20⌋ = 2 layers
    assert evaluation_layers(harmful, harmless, 0.25) == [13, 7, 20, 19, 18]
    assert evaluation_layers(harmful[:4], harmless[:4], 0.1) == [3]  # tiny model: at least one layer


def test_concept_cosine_scores_the_true_direction_highest():
    """harmful = harmless + 8u (+ noise): ablating u from harmful makes it look harmless; adding the
    mean difference to harmless makes it look harmful; a wrong direction does neither."""
    n, m, d = 64, 2, 16
    g = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=g, dtype=torch.float64) * 2
    u, w = random_unit(d, 2, 7, torch.float64)
    harmless = base + 0.3 * torch.randn(n, m, d, generator=g, dtype=torch.float64)
    harmful = base + 8 * u + 0.3 * torch.randn(n, m, d, generator=g, dtype=torch.float64)
    ref_harmless, ref_harmful = mean_unit(harmless), mean_unit(harmful)
    mu = harmful.mean((0, 1))
    torch.testing.assert_close(ref_harmful, mu / mu.norm())
    mb = harmless.mean((0, 1))
    assert concept_cosine(harmless, ref_harmful) == pytest.approx(float(mb @ ref_harmful / mb.norm()), abs=1e-12)

    def score(r):
        q = r / r.norm()
        ablate = harmful - (harmful @ q)[..., None] * q
        return concept_cosine(ablate, ref_harmless) + concept_cosine(harmless + r, ref_harmful)

    diff = harmful.mean((0, 1)) - harmless.mean((0, 1))
    true, wrong = score(diff), score(8 * w)
    assert true > 1.95 and true > wrong + 0.2
    before = concept_cosine(harmful, ref_harmless) + concept_cosine(harmless, ref_harmful)
    assert true > before + 0.2


def test_pick_cosmic():
    def cands():
        return [CosmicCandidate(0, -1, kl=0.5, score=1.9), CosmicCandidate(1, -1, kl=0.05, score=1.2),
                CosmicCandidate(2, -1, kl=0.1, score=1.5), CosmicCandidate(3, -1, score=2.0, status="pruned"),
                CosmicCandidate(4, -1, kl=0.0, score=float("nan"))]
    cs = cands()
    assert pick_cosmic(cs, 0.1).layer == 2
    assert [c.status for c in cs] == ["kl>threshold", "scored", "chosen", "pruned", "nan"]
    assert pick_cosmic(cands(), None).layer == 0
    with pytest.raises(ObliteratusError, match="cosmic"):
        pick_cosmic(cands(), 0.01)


# --- COSMIC on a tiny model with a planted refusal direction ----------------------------------

def test_select_cosmic_finds_planted_direction_not_largest_difference(tokenizer):
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    u = random_unit(adapter.d_model, 1, 11)[0]
    enc = lambda texts: Encoded.of(tokenizer, texts, add_special_tokens=False)  # noqa: E731
    val_h, val_b = enc(HARMFUL), enc(HARMLESS)
    digest = params_digest(model)
    with planted(adapter, tokenizer, u, 30.0, layer=1):
        train_h = collect(adapter, enc(TRAIN_HARMFUL), 1, 8)
        train_b = collect(adapter, enc(TRAIN_HARMLESS), 1, 8)
        mean_diffs = train_h.double().mean(0) - train_b.double().mean(0)  # [1, L+1, d]
        assert float(torch.cosine_similarity(mean_diffs[0, 2], u.double(), dim=0)) > 0.9
        # decoy: the largest mean difference of all, at axis 1, in a direction the model ignores
        mean_diffs[0, 1] = 3 * mean_diffs[0, 2].norm() * random_unit(adapter.d_model, 1, 12, torch.float64)[0]
        assert int(mean_diffs[0].norm(dim=-1).argmax()) == 1
        settings = LayerSettings(prune_fraction=0.0, kl_threshold=None)
        calls = []
        sel = select_cosmic(model, adapter, mean_diffs.float(), val_h, val_b, settings, ExciseSettings(),
                            eval_layers=[3], batch_size=3, progress=calls.append)

        assert params_digest(model) == digest
        assert (sel.layer, sel.position, sel.method, sel.eval_layers) == (2, -1, "cosmic", [3])
        scored = {c.layer: c for c in sel.candidates if c.status != "pruned"}
        assert sorted(scored) == [0, 1, 2] and len(calls) == 3
        # axis 0 is the embedding of the shared last token: no direction at all
        assert scored.pop(0).status == "zero-direction" and float(mean_diffs[0, 0].norm()) == 0.0
        assert sel.candidates[3].status == "pruned"  # axis L: nothing to steer
        best = scored[2]
        assert best.status == "chosen" and all(best.score > c.score + 0.1 for c in scored.values() if c is not best)
        assert best.ablation_cos > sel.base_cos + 0.3 and best.actadd_cos > sel.base_cos + 0.3

        # the ablation score equals cos(mean of the ablated harmful final residual, harmless reference),
        # recomputed through the probe instead of select_cosmic's own plumbing
        q = (mean_diffs[0, 2] / mean_diffs[0, 2].norm()).float()[None]
        ref_b = mean_unit(collect(adapter, val_b, 1, 8)[:, :, 3])
        with ablated(adapter, q):
            abl = collect(adapter, val_h, 1, 8)[:, :, 3]  # [n, 1, d]
        assert best.ablation_cos == pytest.approx(concept_cosine(abl, ref_b), abs=1e-6)
        ref_h = mean_unit(collect(adapter, val_h, 1, 8)[:, :, 3])
        with hooked(adapter, {"layers.2.resid_pre": lambda h: h + mean_diffs[0, 2].float()}):
            add = collect(adapter, val_b, 1, 8)[:, :, 3]
        assert best.actadd_cos == pytest.approx(concept_cosine(add, ref_h), abs=1e-6)


def test_select_cosmic_default_eval_layers_and_kl(tokenizer):
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    u = random_unit(adapter.d_model, 1, 11)[0]
    enc = lambda texts: Encoded.of(tokenizer, texts, add_special_tokens=False)  # noqa: E731
    with planted(adapter, tokenizer, u, 30.0, layer=0):
        h, b = collect(adapter, enc(HARMFUL), 2, 8), collect(adapter, enc(HARMLESS), 2, 8)
        mean_diffs = (h.double().mean(0) - b.double().mean(0)).float()  # [2, L+1, d]
        expected_eval = evaluation_layers(h[:, -1].double().mean(0), b[:, -1].double().mean(0), 0.1)
        sel = select_cosmic(model, adapter, mean_diffs, enc(HARMFUL), enc(HARMLESS), LayerSettings(kl_threshold=1e9),
                            ExciseSettings(), batch_size=4)
    assert sel.eval_layers == expected_eval and len(expected_eval) == 1
    assert {c.position for c in sel.candidates} == {-2, -1}
    assert [(c.layer, c.position) for c in sel.candidates if c.status == "zero-direction"] == [(0, -2), (0, -1)]
    assert {c.layer for c in sel.candidates if c.status != "pruned"} == {0, 1}  # int(3 · 0.8) = 2, exclusive
    scored = [c for c in sel.candidates if c.status not in ("pruned", "zero-direction")]
    assert [(c.layer, c.position) for c in scored] == [(1, -2), (1, -1)]
    assert all(c.kl >= 0 and math.isfinite(c.score) for c in scored)
    assert sum(c.status == "chosen" for c in sel.candidates) == 1
    with pytest.raises(ObliteratusError, match="positions"):
        select_cosmic(model, adapter, mean_diffs[0], enc(HARMFUL), enc(HARMLESS), LayerSettings(), ExciseSettings())


def test_select_cosmic_scores_each_candidate_with_the_source_window(tokenizer):
    """layer_weights = "through_source": COSMIC's ablation (and its KL) edits only the embeddings and
    layers 0..candidate, as the pipeline's edit then does; a window covering every layer scores alike."""
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    enc = lambda texts: Encoded.of(tokenizer, texts, add_special_tokens=False)  # noqa: E731
    mean_diffs = torch.randn(1, adapter.n_layers + 1, adapter.d_model, generator=torch.Generator().manual_seed(3))
    settings = LayerSettings(kl_threshold=1e9, min_fraction=0.0, prune_fraction=0.0)
    args = (model, adapter, mean_diffs, enc(HARMFUL), enc(HARMLESS), settings)
    full = {c.layer: c for c in select_cosmic(*args, ExciseSettings(), batch_size=4).candidates if c.status != "pruned"}
    window = {c.layer: c for c in select_cosmic(*args, ExciseSettings(layer_weights="through_source"),
                                                batch_size=4).candidates if c.status != "pruned"}
    last = adapter.n_layers - 1  # its window is every layer
    assert window[last].kl == pytest.approx(full[last].kl, rel=1e-6, abs=1e-9)
    assert window[last].ablation_cos == pytest.approx(full[last].ablation_cos, abs=1e-6)
    assert abs(window[1].kl - full[1].kl) > 1e-6  # layer 2 left alone changes what the ablation does
