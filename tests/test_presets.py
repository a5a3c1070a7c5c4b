"""Every preset and baseline runs end to end on a tiny random MoE model, and no option a preset sets
is a silent no-op: each one is read by the code during the run (a spy on the settings models), and
each one, put back to its default, changes the outcome of the run (a second run compared with the
first: weights, directions, layer selection, metrics, the chosen trial)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from pydantic import BaseModel

from obliteratus.settings import resolve_settings
from obliteratus.pipeline import obliterate, uses_study
from obliteratus.presets import load_preset, preset_names

from conftest import merge, tiny_tokenizer
from support.moe import moe_config, moe_model
from support.presets import RDO_FAST, SMALL, STUDY_FAST

PRESETS = preset_names()
META = {"description", "kind", "source"}
# Sizes a preset sets that this test overrides to stay fast (their effect is covered elsewhere).
OVERRIDDEN = {("data", "n_train"), ("data", "n_val"), ("data", "n_test"), ("layers", "kl_threshold"),
              ("layers", "induce_threshold"), ("optimize", "study", "n_trials"),
              ("optimize", "study", "n_startup_trials")}


def test_the_catalogue_is_complete():
    presets = {"basic", "advanced", "aggressive", "spectral_cascade", "informed", "surgical", "inverted", "optimized",
               "nuclear"}
    baselines = {"failspy", "arditi", "gabliteration", "heretic", "rdo", "sumandora"}
    assert set(PRESETS) == presets | baselines
    for name in PRESETS:
        data = load_preset(name)
        assert data.get("description"), name
        assert data.get("kind", "preset") == ("baseline" if name in baselines else "preset")
        if name in baselines:
            assert data.get("source"), f"{name}: a baseline cites where its defaults come from"
        resolve_settings(data)  # valid


def leaves(table: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += leaves(value, prefix + (key,))
        elif not (not prefix and key in META):
            out.append(prefix + (key,))
    return out


@pytest.fixture
def spy(monkeypatch):
    """Record (model class, field) for every settings field read while the spy is on."""
    reads: set[tuple[str, str]] = set()
    original = BaseModel.__getattribute__

    def getattribute(self, name):
        cls = original(self, "__class__")
        if cls.__module__.startswith("obliteratus") and name in cls.model_fields:
            reads.add((cls.__name__, name))
        return original(self, name)

    monkeypatch.setattr(BaseModel, "__getattribute__", getattribute)
    return reads


def field_owner(path: tuple) -> tuple[str, str]:
    """The settings model class and field name a preset key lands on."""
    node = resolve_settings(None)
    *parents, leaf = path
    for part in parents:
        if type(node).__name__ == "DirectionSettings" and part not in type(node).model_fields:
            from obliteratus.directions import get_direction_method

            node = get_direction_method(part).options()  # a method's own options table
            continue
        value = getattr(node, part)
        if value is None:  # optional sub-model (e.g. neurons, kernels): its class from the annotation
            ann = type(node).model_fields[part].annotation
            value = next(a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel))
            return value.__name__, leaf
        node = value
    return type(node).__name__, leaf


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_and_reads_every_option_it_sets(moe_dir, name, spy, tmp_path):
    overrides = merge(SMALL, RDO_FAST) if name == "rdo" else SMALL
    if uses_study(resolve_settings(load_preset(name))):  # optimized, heretic: the optimizer's study picks the edit
        result = obliterate(str(moe_dir), name, overrides=overrides, study=STUDY_FAST, run_dir=str(tmp_path))
        assert result.study.chosen is not None and len(result.study.front) >= 1
    else:
        result = obliterate(str(moe_dir), name, overrides=overrides)
    assert 0.0 <= result.after.metrics["refusal"] <= 1.0
    unread = []
    for path in leaves(load_preset(name)):
        if path in OVERRIDDEN:
            continue
        owner = field_owner(path)
        if owner not in spy:
            unread.append(".".join(path))
    assert not unread, f"{name}: options never read during the run: {unread}"


# --- every option a preset sets changes the outcome --------------------------------------------------
#
# The spy above proves an option is read; reading is not acting. Here each option a preset sets to
# something other than its default is put back to the default, the preset is run again on the same
# tiny model, and the outcome must differ: the weights (and any saved steering), the directions, the
# layer selection with every candidate's scores and status, the metrics, and for the study presets the
# chosen trial, the front and the confirmation checks. Options whose effect a random model cannot show
# are listed with the test that covers each instead.
#
# A random model never writes a refusal marker, so every contrast that labels prompts by the model's
# answers would fall back to the plain one. The marker judge is swapped for one that calls a response a
# refusal when it contains a byte from a fixed set: the verdicts still come from what the edited model
# generates, so labels, refusal counts, pruning and confirmation all react to the edit.

FAKE_MARKERS = tuple(string.ascii_letters + string.digits + string.punctuation)


@pytest.fixture(scope="module")
def biased_moe_dir(tmp_path_factory) -> Path:
    """Qwen3-MoE with random biases on every attention projection (o_proj included, so bias projection
    has something to do), 5 layers, the last one dense."""
    config = moe_config("qwen3_moe")
    config.num_hidden_layers, config.mlp_only_layers, config.attention_bias = 5, [4], True
    out = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    moe_model("qwen3_moe", config=config).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
NO_EFFECT_ON_A_RANDOM_MODEL = {
    # SMALL opens Arditi's filters (a random model has no direction that induces refusal), so the
    # induce bar, absolute or relative, passes every candidate: select/test_layers.py checks `pick` with both.
    ("layers", "induce_relative"): "select/test_layers.py::test_pick_induce_relative_to_harmless_baseline",
    # TPE only ranks infeasible trials differently once they would enter its "good" group, which takes
    # more trials than a unit test runs: optimize/test_optimize.py checks that every trial, pruned ones included,
    # carries its refusal excess as the constraint the sampler reads.
    ("optimize", "study", "constrain"):
        "optimize/test_optimize.py::test_constrained_study_gives_tpe_the_refusal_excess_of_complete_and_pruned_trials",
    # The KL cut needs a trial that passed its in-study confirmation and a later trial with more KL; the few
    # tiny trials here rarely give both: optimize/test_optimize.py checks the cut with and without confirm_during.
    ("optimize", "study", "kl_rank"):
        "optimize/test_optimize.py::test_confirm_during_checks_new_best_candidates_and_ranks_the_kl_cut_by_confirmed_trials",
    # The cap on confirmations only shows when more candidates fail than the preset checks; a few tiny
    # trials leave two candidates: optimize/test_optimize.py checks the cap on a study with more.
    ("optimize", "study", "confirm_trials"): "optimize/test_optimize.py::test_pick_confirmed_walks_the_trials_within_the_target_in_kl_order",
    # Execution only: the suspects are tried first and the KL pass stops early only when the full pass
    # would give the same verdict (optimize/test_optimize.py checks both against the full passes).
    ("optimize", "study", "suspect_prompts"):
        "optimize/test_optimize.py::test_suspects_prune_a_refusing_trial_after_a_few_tokens_of_a_small_batch",
    ("optimize", "study", "suspect_tokens"):
        "optimize/test_optimize.py::test_suspects_prune_a_refusing_trial_after_a_few_tokens_of_a_small_batch",
    ("optimize", "study", "kl_chunks"):
        "optimize/test_optimize.py::test_kl_chunks_stop_at_a_lower_bound_that_gives_the_full_pass_verdict",
    # Execution only: a batch size must not change what is computed (batched generation and probing are
    # checked against one prompt at a time).
    ("evaluate", "batch_size"): "evaluate/test_evaluate.py::test_generate_batched_equals_one_by_one",
}
# A validation target above the tiny model's confirmation rates (0.1-0.25), so that a confirmation
# target below them (the optimized preset's) changes the pick.
STUDY_DIFF = {"n_trials": 8, "n_startup_trials": 2, "refusal_tokens": 3, "target_refusal": 0.3}
# The cone needs at least 3 harmful train prompts in several categories before it can be wider than
# one direction (below that it is exactly the difference of means, by design).
SIZES = {"informed": {"data": {"n_train": 64}}, "rdo": RDO_FAST}


def field_default(path: tuple):
    """The default of the settings field a preset key lands on (its class's own default)."""
    from obliteratus import settings as cfg
    from obliteratus.directions import get_direction_method
    from obliteratus.optimize.options import StudyOptions

    cls_name, leaf = field_owner(path)
    classes = {c.__name__: c for c in vars(cfg).values() if isinstance(c, type) and issubclass(c, BaseModel)}
    classes[StudyOptions.__name__] = StudyOptions
    if cls_name not in classes:  # a direction method's own options table
        classes[cls_name] = type(get_direction_method(path[1]).options())
    return classes[cls_name].model_fields[leaf].get_default(call_default_factory=True)


def restates_default(name: str, path: tuple, default) -> bool:
    from obliteratus.errors import ConfigError

    try:
        return resolve_settings(merge(load_preset(name), nested(path, default))) == resolve_settings(load_preset(name))
    except ConfigError:  # the default is not valid with the rest of the preset: the option matters
        return False


def nested(path: tuple, value) -> dict:
    out: dict = value
    for key in reversed(path):
        out = {key: out}
    return out


def digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def outcome(model_dir: Path, name: str, overrides: dict, tmp_path: Path, monkeypatch) -> dict:
    """What a run did, as comparable data; an error is an outcome too."""
    try:
        if uses_study(resolve_settings(merge(load_preset(name), overrides))):
            result = obliterate(str(model_dir), name, overrides=overrides, study=STUDY_DIFF,
                                run_dir=str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"))
            study = result.study
            out = {"trial": (study.chosen.number, study.chosen.params, study.chosen.values),
                   "front": [(r.number, r.values) for r in study.front] if hasattr(study.front[0], "values")
                   else repr(study.front), "checks": study.checks}
        else:
            result = obliterate(str(model_dir), name, overrides=overrides)
            d = result.directions
            out = {"basis": digest([("basis", d.basis)] + [(str(k), v) for k, v in sorted((d.layer_bases or {}).items())]),
                   "selection": repr(result.selection.to_dict()), "steering": repr(result.edit.details.get("steering")),
                   "layer_weights": repr(d.layer_weights), "contrast": d.contrast}
    except Exception as err:  # noqa: BLE001 — an error is compared like any other outcome
        return {"error": f"{type(err).__name__}: {err}"}
    out["metrics"] = repr(result.after.metrics)
    out["weights"] = digest(sorted(result.loaded.model.state_dict().items()))
    return out


@pytest.fixture
def fake_markers(monkeypatch):
    """Refusal, for a random model: a response that opens with one of FAKE_MARKERS (about one in ten),
    and for the log-odds label a first token in the lower half of the byte vocabulary (the refusal
    log-odds then sit around 0)."""
    import obliteratus.directions.driver as driver
    import obliteratus.select.layers as layers
    import obliteratus.pipeline as pipeline
    from obliteratus.evaluate.judges import markers

    monkeypatch.setattr(markers, "MARKERS", FAKE_MARKERS)
    monkeypatch.setattr(markers, "normalise", lambda text: text[:1])
    for module in (driver, layers, pipeline):
        monkeypatch.setattr(module, "refusal_token_ids", lambda tokenizer: list(range(128)))


@pytest.mark.parametrize("name", PRESETS)
def test_no_option_a_preset_sets_is_a_silent_no_op(biased_moe_dir, name, fake_markers, monkeypatch, tmp_path):
    moe_dir = biased_moe_dir
    small = merge(SMALL, SIZES.get(name, {}))
    base = outcome(moe_dir, name, small, tmp_path, monkeypatch)
    assert "error" not in base, base
    silent = []
    for path in leaves(load_preset(name)):
        if path in OVERRIDDEN or path in NO_EFFECT_ON_A_RANDOM_MODEL:
            continue
        default = field_default(path)
        if restates_default(name, path, default):
            continue  # the preset restates a default (a baseline citing its source): nothing to switch off
        if outcome(moe_dir, name, merge(small, nested(path, default)), tmp_path, monkeypatch) == base:
            silent.append(f"{'.'.join(path)} (default {default!r})")
    assert not silent, f"{name}: setting these back to their defaults changes nothing: {silent}"
