"""Every preset and baseline runs end to end on a tiny random MoE model, and no option a preset sets
is a silent no-op: each one is read by the code during the run (a spy on the settings models)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from obliteratus.config import resolve_settings
from obliteratus.optimize.command import run_optimize
from obliteratus.pipeline import obliterate, uses_study
from obliteratus.presets import load_preset, preset_names

from conftest import tiny_tokenizer
from test_moe import _config

SMALL = {"data": {"n_train": 24, "n_val": 4, "n_test": 4},
         "evaluate": {"max_new_tokens": 3, "kl_tokens": 2, "perplexity": False},
         # a random model has no refusal direction to pass Arditi's filters: open them (still read, so still checked)
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9}}
PRESETS = preset_names()
META = {"description", "kind", "source"}
# Sizes a preset sets that this test overrides to stay fast (their effect is covered elsewhere).
OVERRIDDEN = {("data", "n_train"), ("data", "n_val"), ("data", "n_test"), ("layers", "kl_threshold"),
              ("layers", "induce_threshold"), ("optimize", "study", "n_trials"),
              ("optimize", "study", "n_startup_trials")}
STUDY_FAST = {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 3}
RDO_FAST = {"directions": {"rdo": {"max_steps": 1, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4}}}


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


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    import torch
    import transformers as tf

    config = _config("mixtral")
    config.num_hidden_layers = 5  # enough layers for every layer method's pruning
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float()
    out = tmp_path_factory.mktemp("moe") / "mixtral"
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def leaves(table: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += leaves(value, prefix + (key,))
        elif not (not prefix and key in META):
            out.append(prefix + (key,))
    return out


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
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
        result = run_optimize(str(moe_dir), name, overrides=overrides, study=STUDY_FAST, run_dir=str(tmp_path))
        assert result.chosen is not None and len(result.front) >= 1
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
