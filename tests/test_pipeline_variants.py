"""The whole pipeline with every layer method, direction method and excision variant switched on
through settings, on a tiny random Llama: each run must do what its settings say to the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from obliteratus.settings import resolve_settings
from obliteratus.directions import direction_methods
from obliteratus.excise import excise_variants
from obliteratus.errors import ConfigError
from obliteratus.pipeline import moved_cosine, obliterate
from obliteratus.select import layer_selectors

from conftest import merge, save_tiny, tiny_model

SMALL = {"data": {"n_train": 12, "n_val": 4, "n_test": 4}, "evaluate": {"max_new_tokens": 4, "kl_tokens": 2,
                                                                        "ppl_window": 32, "perplexity": False}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("src"), "llama")


def run(tiny_dir, *overrides, preset="basic", output=None):
    return obliterate(str(tiny_dir), preset, output=None if output is None else str(output),
                      overrides=merge(SMALL, {"layers": {"method": "fixed", "layer": 2}}, *overrides))


def original():
    return tiny_model("llama")


def writer_weights(model):
    return [(i, layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach())
            for i, layer in enumerate(model.model.layers)]


# Built from the registry: a newly registered method runs here. Those with their own pipeline test
# (they need options that keep them fast, or choose their own k) are named with it.
OWN_TEST = {"rdo": "test_rdo_direction_through_the_pipeline", "cone": "test_cone_method_through_the_pipeline"}


@pytest.mark.parametrize("method", [name for name in direction_methods() if name not in OWN_TEST])
def test_every_direction_method_is_excised(tiny_dir, method):
    k = 1 if direction_methods()[method].max_directions == 1 or method == "cot_aware" else 2
    r = run(tiny_dir, {"directions": {"method": method, "n_directions": k}})
    q = r.directions.basis
    assert q.shape == (k, 32) and r.directions.method == method
    for _, o, down in writer_weights(r.loaded.model):
        assert (q @ o).abs().max() < 1e-4 and (q @ down).abs().max() < 1e-4


def test_sae_fit_is_recorded_in_the_metadata(tiny_dir):
    """The SAE's early stopping is visible in obliteratus.json: epochs, held-out losses, chosen features."""
    import json

    sae = {"max_epochs": 40, "patience": 3, "expansion": 2}
    r = run(tiny_dir, {"directions": {"method": "sae", "n_directions": 2, "sae": sae}})
    fit = json.loads(json.dumps(r.metadata("basic")["directions"]["fit"]))["sae"]  # JSON-serialisable
    assert 1 <= fit["epochs"] <= 40 and len(fit["held_out_loss"]) == fit["epochs"]
    assert fit["stopped_early"] == (fit["epochs"] < 40)
    assert fit["best_held_out_loss"] == min(fit["held_out_loss"])
    assert len(fit["features"]) == 2 and all(d != 0 for d in fit["cohens_d"])
    assert abs(fit["cohens_d"][0]) >= abs(fit["cohens_d"][1])  # ranked by |effect size|


def test_rdo_direction_through_the_pipeline(tiny_dir):
    r = run(tiny_dir, {"directions": {"method": "rdo", "rdo": {"max_steps": 2, "target_tokens": 3, "batch_size": 4,
                                                               "effective_batch_size": 4}}})
    q = r.directions.basis
    assert torch.allclose(q.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert (q @ r.loaded.model.model.layers[0].mlp.down_proj.weight).abs().max() < 1e-4
    fit = r.metadata("basic")["directions"]["fit"]["rdo"]  # what the optimisation did, in obliteratus.json
    assert fit["steps"] == 2 and len(fit["abs_cos_to_diff_means"]) == 1


@pytest.mark.parametrize("init", ["random", "diff_means"])
def test_rdo_starts_where_directions_rdo_init_says(tiny_dir, init):
    """With lr 0 the fitted direction is its start: the paper's seeded random vector, or the unit
    difference of means at the source layer."""
    from obliteratus.directions.rdo import RdoOptions, initial_basis

    fast = {"max_steps": 1, "lr": 0.0, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4, "init": init}
    r = run(tiny_dir, {"directions": {"method": "rdo", "rdo": fast}})
    expected = initial_basis(RdoOptions(init=init), r.directions.mean_diff)
    assert torch.allclose(r.directions.basis, expected, atol=1e-6)
    cos = r.metadata("basic")["directions"]["fit"]["rdo"]["abs_cos_to_diff_means"][0]
    assert (cos > 1 - 1e-5) if init == "diff_means" else (cos < 0.9)


@pytest.mark.parametrize("method", layer_selectors())
def test_every_layer_method_chooses_a_layer(tiny_dir, method):
    r = obliterate(str(tiny_dir), "basic", overrides=merge(SMALL, {"layers": {"method": method, "kl_threshold": None,
                                                                              "induce_threshold": None}}))
    assert r.selection.method == method and 0 <= r.selection.layer <= 3
    if method == "fixed":
        assert r.selection.layer == int(0.6 * 3)


def test_contrast_behaviour_falls_back_on_a_random_model(tiny_dir):
    r = run(tiny_dir, {"directions": {"contrast": "behaviour", "min_group": 20}})
    assert r.directions.contrast["kind"] == "behaviour" and r.directions.contrast["fallback"]


def test_fractional_index_interpolates_between_layers(tiny_dir):
    r = run(tiny_dir, {"directions": {"index": 1.5}})
    assert r.selection.method == "index" and r.directions.contrast["index"] == 1.5
    q = r.directions.basis
    assert (q @ r.loaded.model.model.layers[0].self_attn.o_proj.weight).abs().max() < 1e-4


def test_per_layer_scope_uses_each_layers_own_direction(tiny_dir):
    r = run(tiny_dir, {"directions": {"scope": "per_layer"}})
    bases = r.directions.layer_bases
    assert sorted(bases) == [0, 1, 2]
    for i, o, down in writer_weights(r.loaded.model):
        assert (bases[i] @ o).abs().max() < 1e-4 and (bases[i] @ down).abs().max() < 1e-4
    assert not torch.allclose(bases[0], bases[2])


def test_biprojection_orthogonalises_against_each_layers_harmless_mean(tiny_dir):
    from obliteratus.models import ArchitectureAdapter
    from obliteratus.probe import collect

    r = run(tiny_dir, {"directions": {"project_harmless": True, "biproject": True}})
    d, bases = r.directions, r.directions.layer_bases
    unedited = ArchitectureAdapter(original())
    harmless = collect(unedited, r.prompts.encoded["harmless.train"]).double().mean(0)[-1]  # [L+1, d]
    raw = d.mean_diff.double() / d.mean_diff.double().norm()
    for i, o, down in writer_weights(r.loaded.model):
        b = bases[i].double()[0]
        assert abs(float(b @ harmless[i + 1])) < 1e-4 * float(harmless[i + 1].norm())  # ⟂ this layer's harmless mean
        mu = harmless[i + 1] / harmless[i + 1].norm()
        expect = raw - (raw @ mu) * mu
        torch.testing.assert_close(b, expect / expect.norm(), atol=1e-5, rtol=1e-5)  # the source direction, projected
        assert (bases[i] @ o).abs().max() < 1e-4 and (bases[i] @ down).abs().max() < 1e-4
    assert abs(float(d.basis.double()[0] @ harmless[d.layer])) < 1e-4 * float(harmless[d.layer].norm())
    with pytest.raises(ConfigError, match="biproject"):
        run(tiny_dir, {"directions": {"biproject": True}})


def test_kernels_weight_layers_and_skip_far_ones(tiny_dir):
    kernel = {"max_weight": 1.0, "max_weight_position": 2.0, "min_weight": 0.5, "min_weight_distance": 1.0}
    r = run(tiny_dir, {"excise": {"kernel_attn": kernel, "kernel_mlp": kernel, "embeddings": False}})
    q = r.directions.basis
    base = writer_weights(original())
    for (i, o, down), (_, o0, d0) in zip(writer_weights(r.loaded.model), base):
        if i == 0:  # distance 2 > 1: untouched
            assert torch.equal(o, o0) and torch.equal(down, d0)
        elif i == 1:  # weight 0.5: half the component left
            torch.testing.assert_close(q @ o, 0.5 * (q @ o0), atol=1e-5, rtol=1e-4)
        else:
            assert (q @ o).abs().max() < 1e-4
    assert r.edit.writer_weights["layers.1.attn_out"] == 0.5


def test_householder_keeps_norms_and_moves_the_component(tiny_dir):
    r = run(tiny_dir, {"excise": {"method": "householder", "biases": False}})
    d = r.directions.basis[0]
    for (_, o, _), (_, o0, _) in zip(writer_weights(r.loaded.model), writer_weights(original())):
        torch.testing.assert_close(o.norm(dim=0), o0.norm(dim=0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d @ o, -(d @ o0), atol=1e-5, rtol=1e-4)  # target −d: reflected


def test_head_surgery_changes_only_the_chosen_heads(tiny_dir):
    r = run(tiny_dir, {"excise": {"method": "heads", "heads": {"n_heads": 2}}})
    changed = 0
    for (_, o, down), (_, o0, d0) in zip(writer_weights(r.loaded.model), writer_weights(original())):
        assert torch.equal(down, d0)
        for h in range(4):
            cols = slice(8 * h, 8 * h + 8)
            if not torch.equal(o[:, cols], o0[:, cols]):
                changed += 1
                assert (r.directions.basis @ o[:, cols]).abs().max() < 1e-4
    assert changed == 2


def test_leace_edit_reads_along_the_oblique_direction(tiny_dir):
    r = run(tiny_dir, {"directions": {"method": "leace"}, "excise": {"method": "leace"}})
    read = r.directions.read
    assert read is not None
    torch.testing.assert_close(read @ r.directions.basis.T, torch.ones(1, 1), atol=1e-4, rtol=1e-4)
    for _, o, down in writer_weights(r.loaded.model):
        scale = o.abs().max()
        assert (read @ o).abs().max() < 1e-4 * max(1.0, float(read.norm() * scale))


def test_neuron_masking_zeroes_columns_scored_before_the_projection(tiny_dir):
    r = run(tiny_dir, {"excise": {"neurons": {"count": 3, "per_layer": True}}})
    for _, _, down in writer_weights(r.loaded.model):
        assert int((down.abs().sum(0) == 0).sum()) == 3


@pytest.mark.parametrize("method", [name for name, v in excise_variants().items() if not v.neurons])
def test_neuron_masking_with_another_edit_method_is_refused(method):
    with pytest.raises(ConfigError, match="neurons"):  # at settings time, before any model is loaded
        resolve_settings(None, {"excise": {"method": method, "neurons": {"count": 3, "per_layer": True}}})


def test_lm_head_option_edits_the_untied_head(tiny_dir):
    r = run(tiny_dir, {"excise": {"lm_head": True}})
    head = r.loaded.model.lm_head.weight.detach()
    assert (head @ r.directions.basis.T).abs().max() < 1e-4
    assert r.edit.lm_head_input_edited


def test_multi_pass_refinement_logs_each_pass(tiny_dir):
    r = run(tiny_dir, {"excise": {"passes": 3, "refine_cos": 1.0}})  # a cosine of 1 is never reached: 3 passes
    passes = r.edit.details["passes"]
    assert [p["pass"] for p in passes] == [1, 2, 3] and not any("stopped" in p for p in passes)
    assert all("cos_to_removed" in p and 0 < p["moved_cos"] < 1 for p in passes[1:])


def test_multi_pass_refinement_stops_once_the_direction_stops_moving(tiny_dir):
    r = run(tiny_dir, {"excise": {"passes": 3, "refine_cos": 0.01}})  # any leftover turns it by less than this
    passes = r.edit.details["passes"]
    assert len(passes) == 2 and "stopped" in passes[1] and passes[1]["moved_cos"] >= 0.01


def test_moved_cosine_is_the_turn_of_the_accumulated_direction():
    total = torch.tensor([3.0, 0.0, 0.0])
    assert moved_cosine(total, torch.tensor([0.0, 4.0, 0.0])) == pytest.approx(3 / 5)  # (3,4,0) vs (3,0,0)
    assert moved_cosine(total, torch.tensor([0.0, 0.03, 0.0])) > 0.99  # a small leftover barely turns it
    assert moved_cosine(total, torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)  # same direction: no turn


def test_hook_mode_leaves_weights_and_saves_steering(tiny_dir, tmp_path):
    out = tmp_path / "run"
    r = run(tiny_dir, {"excise": {"mode": "hooks"}}, output=out)
    for (_, o, down), (_, o0, d0) in zip(writer_weights(r.loaded.model), writer_weights(original())):
        assert torch.equal(o, o0) and torch.equal(down, d0)
    assert (out / "steering.json").is_file()
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["edit"]["variant"] == "hooks"
    from obliteratus.models.load import summon

    loaded = summon(str(out))
    assert loaded.steering is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        saved = loaded.model(input_ids=ids).logits
        live = r.loaded.model(input_ids=ids).logits
    torch.testing.assert_close(saved, live, atol=1e-5, rtol=1e-5)


def test_bad_combinations_are_config_errors():
    from obliteratus.errors import ConfigError

    with pytest.raises(ConfigError):
        resolve_settings(None, {"excise": {"mode": "hooks", "norm_preserve": True}})
    with pytest.raises(ConfigError):
        resolve_settings(None, {"directions": {"svd": {"nope": 1}}})


def test_kernel_grid_picks_an_admissible_trial_without_touching_weights(tiny_dir):
    from obliteratus.optimize.grid import Trial, choose

    trials = [Trial(None, 1.0, 0.5), Trial({"a": 1}, 1.2, 0.1), Trial({"a": 2}, 2.0, 0.01), Trial({"a": 3}, 0.5, 0.3)]
    best = choose(trials, tolerance=0.25)
    assert best.kernel == {"a": 1} and [t.admissible for t in trials] == [True, True, False, True]
    grid = {"max_weight": [1.0], "position": [0.5, 1.0], "distance": [0.5], "min_ratio": [0.0], "tolerance": 10.0}
    r = run(tiny_dir, {"optimize": {"enabled": True, "search": "grid", **grid}})
    assert len(r.search["trials"]) == 3
    assert r.settings.excise.kernel_attn is not None or r.search["best"]["kernel"] is None
    best = r.search["best"]
    assert best["kl"] == min(t["kl"] for t in r.search["trials"] if t["admissible"])


@pytest.mark.parametrize("kind", ["spectral", "informed"])
def test_layer_weights_scale_each_layers_edit(tiny_dir, kind):
    r = run(tiny_dir, {"excise": {"layer_weights": kind, "embeddings": False}})
    w = r.directions.layer_weights
    assert set(w) == {0, 1, 2} and max(w.values()) <= 1.0 + 1e-6
    q = r.directions.basis
    for (i, o, _), (_, o0, _) in zip(writer_weights(r.loaded.model), writer_weights(original())):
        torch.testing.assert_close(q @ o, (1.0 - w[i]) * (q @ o0), atol=1e-5, rtol=1e-4)


def test_through_source_window_edits_only_the_layers_up_to_the_source(tiny_dir):
    r = run(tiny_dir, {"excise": {"layer_weights": "through_source"}, "layers": {"layer": 1}})
    assert r.directions.layer == 1 and r.directions.layer_weights == {0: 1.0, 1: 1.0, 2: 0.0}
    q = r.directions.basis
    for (i, o, down), (_, o0, down0) in zip(writer_weights(r.loaded.model), writer_weights(original())):
        if i <= 1:
            assert (q @ o).abs().max() < 1e-4 and (q @ down).abs().max() < 1e-4
        else:
            assert torch.equal(o, o0) and torch.equal(down, down0)
    emb = r.loaded.model.model.embed_tokens.weight
    assert (emb @ q.T).abs().max() < 1e-4


def test_cone_method_through_the_pipeline(tiny_dir):
    r = run(tiny_dir, {"directions": {"method": "cone", "n_directions": 3}})
    q = r.directions.basis
    assert r.directions.method == "cone" and 1 <= q.shape[0] <= 3
    for _, o, down in writer_weights(r.loaded.model):
        assert (q @ o).abs().max() < 1e-4 and (q @ down).abs().max() < 1e-4


def test_hook_mode_refuses_to_keep_biases_it_would_project(tmp_path):
    gpt2 = save_tiny(tmp_path / "src", "gpt2")  # GPT-2's writers have biases
    with pytest.raises(ConfigError, match="biases"):
        run(gpt2, {"excise": {"mode": "hooks", "biases": False}})


def test_leace_edit_refuses_a_direction_method_it_would_replace():
    with pytest.raises(ConfigError, match="leace"):
        resolve_settings(None, {"excise": {"method": "leace"}, "directions": {"method": "svd", "n_directions": 2}})
    resolve_settings(None, {"excise": {"method": "leace"}})  # with diff_means (the default) it is fine


@pytest.mark.parametrize("name", ["failspy", "arditi", "gabliteration", "rdo", "sumandora"])
def test_baselines_edit_only_the_residual_writers_their_originals_edit(tiny_dir, name):
    """The original OBLITERATUS's baselines also edited q/k/v, up/gate and the lm_head. Ours touch
    only o_proj, down_proj and (where the original does) the token embedding; hook-mode baselines none."""
    fast = {"directions": {"rdo": {"max_steps": 1, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4}}}
    r = run(tiny_dir, fast if name == "rdo" else {}, preset=name)
    before = dict(original().named_parameters())
    changed = {n for n, p in r.loaded.model.named_parameters() if not torch.equal(p.detach(), before[n].detach())}
    writers = {f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.o_proj", "mlp.down_proj")}
    ex = r.settings.excise
    if ex.mode == "hooks":
        assert changed == set()
        return
    assert changed - writers <= {"model.embed_tokens.weight"}, sorted(changed - writers)
    assert ("model.embed_tokens.weight" in changed) == ex.embeddings
    assert changed & writers
