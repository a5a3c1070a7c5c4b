"""The pipeline on a CUDA device: every direction method, every preset and baseline, the hook-scored
trials and the steering saved with a model. Skipped where no GPU is visible, i.e. always in CI and in
a plain `make test` (conftest.py hides GPUs from the suite unless OBLITERATUS_TEST_CUDA=1, so the
CPU suite's exact float32 tolerances hold on a GPU machine too). Run it on a GPU with

    OBLITERATUS_TEST_CUDA=1 python -m pytest tests/test_cuda.py

Every other test checks the same math on the CPU; these check that nothing falls off the device
(a constant built on the CPU and mixed with the model's activations, say)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (OBLITERATUS_TEST_CUDA=1)")

from obliteratus.settings import resolve_settings  # noqa: E402
from obliteratus.pipeline import obliterate  # noqa: E402
from obliteratus.presets import preset_names  # noqa: E402

from conftest import merge, params_digest, save_tiny, tiny_model  # noqa: E402
from support.multimodal import digests, tiny_llava  # noqa: E402
from support.presets import RDO_FAST as PRESET_RDO_FAST, SMALL as PRESET_SMALL, STUDY_FAST  # noqa: E402

CUDA32 = {"model": {"device": "cuda", "dtype": "float32"}}
SMALL = {"data": {"n_train": 12, "n_val": 4, "n_test": 4},
         "evaluate": {"max_new_tokens": 4, "kl_tokens": 2, "perplexity": False},
         "layers": {"method": "fixed", "layer": 2}}
RDO_FAST = {"rdo": {"max_steps": 2, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("src"), "llama")


def writers(model):
    return [w for layer in model.model.layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]


@pytest.mark.parametrize("method", ["diff_means", "svd", "whitened_svd", "wasserstein", "cot_aware", "sae", "leace",
                                    "jailbreak", "rdo", "cone"])
def test_every_direction_method_runs_and_is_excised_on_cuda(tiny_dir, method):
    k = 2 if method in ("svd", "whitened_svd", "wasserstein", "sae") else 1
    directions = {"method": method, "n_directions": k, **(RDO_FAST if method == "rdo" else {})}
    if method == "cone":
        directions.pop("n_directions")
    r = obliterate(str(tiny_dir), "basic", overrides=merge(SMALL, CUDA32, {"directions": directions}))
    assert next(r.loaded.model.parameters()).device.type == "cuda"
    q = r.directions.basis.double()
    torch.testing.assert_close(q @ q.T, torch.eye(len(q), dtype=torch.float64), atol=1e-5, rtol=0)
    for w in writers(r.loaded.model):
        assert (q.to(w.device) @ w.double()).abs().max() < 1e-4
    assert 0.0 <= r.after.metrics["refusal"] <= 1.0


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_and_baseline_runs_on_cuda(moe_dir, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a study preset's SQLite study: obliteratus-runs/<study name>
    overrides = merge(PRESET_SMALL, PRESET_RDO_FAST if name == "rdo" else {}, CUDA32,
                      {"optimize": {"study": STUDY_FAST}})  # read by the study presets (optimized, heretic) only
    run = obliterate(str(moe_dir), name, overrides=overrides)
    assert next(run.loaded.model.parameters()).device.type == "cuda"
    if run.study is not None:  # the optimizer study chose the edit
        assert run.study.chosen is not None
    assert 0.0 <= run.metrics["after"]["refusal"] <= 1.0


def test_auto_dtype_on_cuda_is_bfloat16_and_the_edit_still_removes_the_direction(tiny_dir):
    r = obliterate(str(tiny_dir), "basic", overrides=merge(SMALL, {"model": {"device": "cuda"}}))
    assert next(r.loaded.model.parameters()).dtype == torch.bfloat16
    q = r.directions.basis.float().cuda()
    for w in writers(r.loaded.model):  # the float32 edit, rounded once to bf16 (8 significant bits)
        assert (q @ w.float()).abs().max() < 2e-2 * w.float().abs().max()


def test_steering_saved_with_a_model_is_reapplied_on_cuda(tiny_dir, tmp_path):
    from obliteratus.models.load import summon

    out = tmp_path / "run"
    r = obliterate(str(tiny_dir), "basic", output=str(out), overrides=merge(SMALL, CUDA32, {"excise": {"mode": "hooks"}}))
    loaded = summon(str(out), resolve_settings(None, CUDA32).model)
    assert loaded.steering is not None and loaded.steering.attached
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    with torch.no_grad():
        saved, live = loaded.model(input_ids=ids).logits, r.loaded.model(input_ids=ids).logits
    torch.testing.assert_close(saved, live, atol=1e-5, rtol=1e-5)
    bare = tiny_model("llama").cuda()(input_ids=ids).logits
    assert (saved - bare).abs().max() > 1e-3


def test_trials_on_cuda_leave_the_model_bit_identical_and_their_hooks_equal_the_bake():
    import optuna
    from optuna.trial import TrialState

    from obliteratus.models import ArchitectureAdapter
    from obliteratus.excise import excise
    from obliteratus.optimize.options import StudyOptions
    from obliteratus.optimize.trial import scaled_plan, trial_hooks

    from support.optimize import L, make_objective, params

    model = tiny_model("llama").cuda()
    before = params_digest(model)
    objective = make_objective(model, StudyOptions(n_startup_trials=2, refusal_tokens=4, prune=False))
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True))
    study.optimize(objective, n_trials=3)
    assert params_digest(model) == before
    assert all(t.state == TrialState.COMPLETE for t in study.trials) and max(t.values[1] for t in study.trials) > 1e-4
    q, plan = scaled_plan(params("per_layer"), objective.mean_diffs, L, objective.excise.lam, 1.0)
    with trial_hooks(objective.adapter, q, plan, objective.excise):
        hooked = objective.scorer.kl()
    baked = copy.deepcopy(model)
    excise(ArchitectureAdapter(baked), q, objective.excise, plan)
    assert objective.scorer.__class__(baked, *[getattr(objective.scorer, f) for f in
                                               ("tokenizer", "harmful", "harmless", "base", "tokens", "batch_size",
                                                "chunks")]).kl() == pytest.approx(hooked, rel=1e-3)


OPEN_LAYERS = {"layers": {"method": "auto", "kl_threshold": 1e9, "induce_threshold": -1e9, "prune_fraction": 0.0}}


def test_a_multimodal_wrapper_on_cuda_edits_only_its_text_decoder(tmp_path):
    source = tiny_llava(tmp_path / "llava")
    run = obliterate(str(source), "basic", output=str(tmp_path / "out"), overrides=merge(SMALL, CUDA32, OPEN_LAYERS))
    assert next(run.loaded.model.parameters()).device.type == "cuda" and run.loaded.processor is not None
    before, after = digests(source), digests(tmp_path / "out")
    text = [k for k in before if k.startswith(("language_model.", "model.language_model.", "lm_head."))]
    assert [k for k in before if k not in text and before[k] != after[k]] == []
    assert any(before[k] != after[k] for k in text)


@pytest.mark.parametrize("model_type", ["granitemoehybrid", "falcon_h1"])
def test_a_hybrid_family_on_cuda_removes_the_direction_from_every_layer(model_type, tmp_path):
    from obliteratus.models import ArchitectureAdapter
    from obliteratus.models.discover import along_ratio
    from obliteratus.models.load import Loaded

    from conftest import tiny_tokenizer
    from support.decoder_types import SMALL as COVERAGE_SMALL, _inputs, _layer_outputs, tiny

    model = tiny("causal-lm", model_type).cuda()
    loaded = Loaded(model, tiny_tokenizer(), ArchitectureAdapter(model), f"tiny-{model_type}", str(tmp_path))
    run = obliterate(loaded, "basic", **merge(COVERAGE_SMALL, {"probe": {"share_prefix": False},
                                                               "evaluate": {"share_prefix": False}}))
    q = run.directions.basis[0].float().cuda()
    root, inputs = _inputs(loaded.adapter)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    assert max(along_ratio(h, q) for h in _layer_outputs(loaded.adapter, root, inputs)) < 1e-4
