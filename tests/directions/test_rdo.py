"""RDO / refusal cones on a tiny random model: frozen weights, a decreasing objective, early
stopping, orthonormal cones, determinism, and hooks that match the weight edit."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, params_digest, random_unit, tiny_model, tiny_tokenizer
from obliteratus.batching import encode_prompts
from obliteratus.directions import get_direction_method
from obliteratus.directions.rdo import (
    RdoOptions,
    RdoTargets,
    _Problem,
    ablation_hooks,
    addition_hooks,
    fit_rdo,
    rdo_loss,
    rdo_targets,
)
from obliteratus.errors import ObliteratusError, PromptError
from obliteratus.evaluate.generate import generate
from obliteratus.excise.hook_form import ablated
from obliteratus.hook_points import hooked
from obliteratus.models import ArchitectureAdapter

D, LAYER = 32, 1
FAST = dict(effective_batch_size=8, batch_size=4, max_steps=6, lr=0.05)  # full batch: steps are deterministic


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    tok = tiny_tokenizer()
    harmful = encode_prompts(tok, PROMPTS[:4], templated=False)
    harmless = encode_prompts(tok, PROMPTS[1:], templated=False)
    mean_diff = 3.0 * random_unit(D, seed=5)[0]
    targets = rdo_targets(model, adapter, tok, harmful, harmless, LAYER, mean_diff, max_new_tokens=5, batch_size=4)
    return model, adapter, tok, harmful, harmless, targets, mean_diff


def fit(setup, init, **kw):
    model, adapter, _, harmful, harmless, targets, _ = setup
    k = kw.pop("k", None)
    return fit_rdo(model, adapter, harmful, harmless, targets, LAYER, init, RdoOptions(**{**FAST, **kw}), k=k)


def loss(setup, basis, **kw):
    model, adapter, _, harmful, harmless, targets, _ = setup
    return rdo_loss(model, adapter, harmful, harmless, targets, LAYER, basis, RdoOptions(**{**FAST, **kw}))


def test_targets_follow_the_paper(setup):
    model, adapter, tok, harmful, harmless, targets, mean_diff = setup
    assert targets.alpha == pytest.approx(3.0, rel=1e-5)
    with ablated(adapter, (mean_diff / mean_diff.norm())[None]):  # same map as the paper's hooks (untied llama)
        expected = generate(model, tok, harmful, 5, 4)
    assert targets.ablation == [[t for t in ids if t not in tok.all_special_ids] for ids in expected]
    plain = generate(model, tok, harmless, 4, 4)
    assert targets.retain == [[t for t in ids if t not in tok.all_special_ids] for ids in plain]
    assert all(len(t) <= 5 for t in targets.addition)
    assert all("." not in tok.decode(t) for t in targets.addition)


def test_paper_ablation_equals_weight_edit_hooks(setup):
    model, adapter, _, harmful, _, _, _ = setup
    r = 2.0 * random_unit(D, seed=9)[0]
    batch = next(harmful.batches(4))
    with hooked(adapter, ablation_hooks(adapter.n_layers, r)):
        ours = model(**batch.inputs()).logits
    with ablated(adapter, (r / r.norm())[None]):
        edit = model(**batch.inputs()).logits
    torch.testing.assert_close(ours, edit, atol=1e-4, rtol=1e-4)
    # addition adds exactly alpha * r_hat at resid_pre of the source layer
    seen = {}
    with hooked(adapter, addition_hooks(adapter.n_layers, LAYER, r, 5.0)), \
            hooked(adapter, [(f"layers.{LAYER}.resid_pre", lambda h: seen.setdefault("h", h.clone()))]):
        model(**batch.inputs())
    with hooked(adapter, [(f"layers.{LAYER}.resid_pre", lambda h: seen.setdefault("h0", h.clone()))]):
        model(**batch.inputs())
    torch.testing.assert_close(seen["h"] - seen["h0"], (5.0 * r / r.norm()).expand_as(seen["h"]), atol=1e-5, rtol=0)


def test_weights_untouched_and_no_grad_outside_direction(setup):
    model = setup[0]
    before = params_digest(model)
    probe = model.lm_head.weight
    probe.requires_grad_(True)  # a caller left a grad flag on: it is switched off for the fit and restored
    try:
        fit(setup, random_unit(D, seed=1), max_steps=2)
    finally:
        flags_restored = probe.requires_grad
        probe.requires_grad_(False)
    assert flags_restored
    assert params_digest(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_gradient_flows_only_into_the_direction(setup):
    model, adapter, _, harmful, harmless, targets, _ = setup
    problem = _Problem(model, adapter, harmful, harmless, targets, LAYER, RdoOptions(**FAST))
    basis = random_unit(D, seed=2).requires_grad_(True)
    problem.step_loss(basis, list(range(4)), torch.Generator().manual_seed(0), backward=True)
    assert basis.grad is not None and torch.isfinite(basis.grad).all() and basis.grad.norm() > 0
    assert all(p.grad is None for p in model.parameters())


def test_loss_decreases_from_init(setup):
    init = random_unit(D, seed=3)
    result = fit(setup, init)
    assert result.steps == 6 and not result.stopped_early
    assert loss(setup, result.basis) < loss(setup, init) - 1e-3
    assert min(result.history) < result.history[0]
    assert result.basis.dtype == torch.float32 and abs(float(result.basis.norm()) - 1) < 1e-5


def test_early_stopping_on_plateau(setup):
    init = random_unit(D, seed=4)
    flat = fit(setup, init, lr=0.0, patience=3, n_lr_reduce=0, max_steps=50)
    assert flat.stopped_early and flat.steps == 3 and len(flat.history) == 4
    assert len(set(flat.history)) == 1  # full batch, lr 0: the same loss every step
    torch.testing.assert_close(flat.basis, init)
    # each lr reduction buys another `patience` steps (paper: n_lr_reduce)
    assert fit(setup, init, lr=0.0, patience=2, n_lr_reduce=1, max_steps=50).steps == 4


def test_cone_is_orthonormal_and_deterministic(setup):
    init = random_unit(D, seed=6)  # one row: the cone grows 1 -> 2
    kw = dict(k=2, max_steps=2, n_samples=2, effective_batch_size=2, batch_size=2)
    a = fit(setup, init, **kw)
    assert a.basis.shape == (2, D) and a.steps == 2
    torch.testing.assert_close(a.basis.double() @ a.basis.double().T, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    b = fit(setup, init, **kw)
    assert torch.equal(a.basis, b.basis) and a.history == b.history
    c = fit(setup, init, **kw, seed=7)
    assert not torch.equal(a.basis, c.basis)


def test_registered_as_model_method_and_validates():
    method = get_direction_method("rdo")
    assert method.needs_model and method.options is RdoOptions
    with pytest.raises(ObliteratusError, match="fit_rdo"):
        method.fit(torch.zeros(2, D), torch.zeros(2, D), 1, RdoOptions())
    assert RdoOptions().lr == 1e-2 and RdoOptions().addition_weight == 0.2
    from obliteratus.errors import ConfigError

    with pytest.raises(ConfigError):
        method.parse_options({"ablation_weight": 0, "addition_weight": 0, "retain_weight": 0})
    with pytest.raises(ConfigError):
        method.parse_options({"learning_rate": 1.0})


def test_mismatched_targets_rejected(setup):
    model, adapter, _, harmful, harmless, targets, _ = setup
    bad = RdoTargets(targets.ablation[:-1], targets.addition, targets.retain, targets.alpha)
    with pytest.raises(PromptError):
        fit_rdo(model, adapter, harmful, harmless, bad, LAYER, random_unit(D), RdoOptions(**FAST))


def test_addition_target_cut_before_first_period():
    from obliteratus.directions.rdo import _before_period

    tok = tiny_tokenizer()
    ids = tok("Sure thing. More.", add_special_tokens=False)["input_ids"]
    assert _before_period(tok, ids) == tok("Sure thing", add_special_tokens=False)["input_ids"]
    assert _before_period(tok, ids[:3]) == ids[:3]


def test_recovers_a_direction_planted_in_the_model():
    """A tiny model whose harmful prompts (they start with the trigger) get alpha·u added to layer 0's
    MLP output. Targets are made by ablating and adding u itself, and RDO started 60° away from u
    must turn back toward it. (It settles near cos 0.85, not 1: the retain loss also asks the
    direction to spare the harmless activations, whose random u-component u itself does not.)"""
    from support.planted import TRAIN_HARMFUL, TRAIN_HARMLESS, planted

    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    tok = tiny_tokenizer()
    u = random_unit(D, seed=21)[0]
    harmful = encode_prompts(tok, TRAIN_HARMFUL, templated=False)
    harmless = encode_prompts(tok, TRAIN_HARMLESS, templated=False)
    digest = params_digest(model)
    with planted(adapter, tok, u, 8.0, layer=0):
        targets = rdo_targets(model, adapter, tok, harmful, harmless, LAYER, 8.0 * u, max_new_tokens=5, batch_size=5)
        other = random_unit(D, seed=22)[0]
        other = other - (other @ u) * u
        init = (0.5 * u + (3 ** 0.5 / 2) * other / other.norm())[None]  # cos(init, u) = 0.5
        options = RdoOptions(effective_batch_size=5, batch_size=5, epochs=40, lr=0.05, patience=5)
        result = fit_rdo(model, adapter, harmful, harmless, targets, LAYER, init, options)
    assert params_digest(model) == digest
    cos = float(result.basis[0] @ u)
    assert cos > 0.8, f"cos(RDO direction, planted u) = {cos:.3f} (started at 0.5)"


def test_the_start_is_the_papers_random_vector_or_the_difference_of_means():
    """rdo.py's --train_direction starts from torch.randn (the difference of means only makes the
    targets and alpha): init = "random" is a seeded random unit vector, nearly orthogonal to the
    mean difference in d dimensions; init = "diff_means" is the unit mean difference itself."""
    from obliteratus.directions.rdo import initial_basis

    md = 3.0 * random_unit(D, seed=5)[0]
    start = initial_basis(RdoOptions(), md)
    assert start.shape == (1, D) and float(start.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(start, initial_basis(RdoOptions(), md))  # seeded
    assert not torch.equal(start, initial_basis(RdoOptions(seed=43), md))
    assert abs(float(start[0] @ md)) / 3.0 < 0.9
    assert torch.allclose(initial_basis(RdoOptions(init="diff_means"), md)[0], md / 3.0, atol=1e-6)


def test_fit_info_reports_the_run(setup):
    from obliteratus.directions.rdo import fit_info

    _, _, _, _, _, _, md = setup
    result = fit(setup, (md / md.norm())[None], max_steps=3)
    info = fit_info(result, md)
    assert info["steps"] == result.steps == 3 and info["first_loss"] == result.history[0]
    assert info["best_loss"] == min(result.history) and len(info["abs_cos_to_diff_means"]) == 1
    assert 0.0 <= info["abs_cos_to_diff_means"][0] <= 1.0 + 1e-6
