"""Settings: defaults < preset < environment < CLI, strict validation, packaged presets."""

from __future__ import annotations

import pytest

from obliteratus.settings import Settings, deep_merge, env_overrides, nest, parse_value, resolve_settings
from obliteratus.errors import ConfigError
from obliteratus.presets import load_preset, preset_names


def test_defaults():
    s = resolve_settings(environ={})
    assert s == Settings()
    assert (s.directions.method, s.directions.n_directions) == ("diff_means", 1)
    assert (s.excise.lam, s.excise.norm_preserve, s.excise.biases) == (1.0, False, True)
    assert s.data.n_train == 128 and s.layers.method == "arditi"


def test_precedence_cli_over_env_over_preset_over_defaults():
    preset = {"excise": {"lam": 1.5, "norm_preserve": True}, "data": {"n_test": 10, "n_val": 5}}
    environ = {"OBLITERATUS_EXCISE__LAM": "2", "OBLITERATUS_DATA__N_TEST": "20", "PATH": "/bin"}
    cli = {"excise": {"lam": 3.0}}
    s = resolve_settings(preset, cli, environ)
    assert s.excise.lam == 3.0  # CLI beats env and preset
    assert s.data.n_test == 20  # env beats preset
    assert s.data.n_val == 5 and s.excise.norm_preserve is True  # preset beats defaults
    assert s.data.n_train == 128 and s.excise.biases is True  # defaults
    # without the CLI the environment wins; without the environment the preset does
    assert resolve_settings(preset, None, environ).excise.lam == 2.0
    assert resolve_settings(preset, None, {}).excise.lam == 1.5


def test_env_overrides_parsing():
    environ = {
        "OBLITERATUS_EXCISE__NORM_PRESERVE": "true",
        "OBLITERATUS_DATA__HARMFUL": "builtin:harmless",
        "OBLITERATUS_LAYERS__KL_THRESHOLD": "0.25",
        "OBLITERATUS_CACHE": "/tmp/x",  # no "__": not a setting
        "OTHER__THING": "1",
    }
    assert env_overrides(environ) == {
        "excise": {"norm_preserve": True},
        "data": {"harmful": "builtin:harmless"},
        "layers": {"kl_threshold": 0.25},
    }
    s = resolve_settings(environ=environ)
    assert s.excise.norm_preserve is True and s.data.harmful == "builtin:harmless" and s.layers.kl_threshold == 0.25


def test_typo_key_is_reported():
    with pytest.raises(ConfigError) as err:
        resolve_settings({"excise": {"lamda": 2}}, environ={})
    assert "excise.lamda" in str(err.value)
    with pytest.raises(ConfigError, match="excise.lamm"):
        resolve_settings(environ={"OBLITERATUS_EXCISE__LAMM": "2"})
    with pytest.raises(ConfigError, match="exise"):
        resolve_settings(cli={"exise": {"lam": 2}}, environ={})


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        resolve_settings({"excise": {"lam": -1.0}, "data": {"n_train": 1}}, environ={})
    message = str(err.value)
    assert "excise.lam" in message and "data.n_train" in message


def test_unknown_direction_method():
    with pytest.raises(ConfigError) as err:
        resolve_settings(cli={"directions": {"method": "magic"}}, environ={})
    assert "magic" in str(err.value) and "diff_means" in str(err.value) and "svd" in str(err.value)


def test_cross_check_min_fraction():
    with pytest.raises(ConfigError, match="min_fraction"):
        resolve_settings({"layers": {"min_fraction": 0.9, "prune_fraction": 0.2}}, environ={})


def test_the_study_refuses_to_ignore_the_embeddings():
    """The optimizer's trial plans (Heretic's kernels) never edit the embeddings: asking for them (the default
    excise.embeddings = true) is an error, not a setting silently dropped. The kernel grid and fixed kernels
    do edit them, so they accept it."""
    with pytest.raises(ConfigError, match="embeddings"):
        resolve_settings({"optimize": {"enabled": True}}, environ={})
    resolve_settings({"optimize": {"enabled": True}, "excise": {"embeddings": False}}, environ={})
    resolve_settings({"optimize": {"enabled": True, "search": "grid"}}, environ={})


def test_literal_fields_rejected():
    with pytest.raises(ConfigError, match="layers.method"):
        resolve_settings(cli={"layers": {"method": "best"}}, environ={})


def test_packaged_presets():
    assert {"basic", "advanced"} <= set(preset_names())
    basic = resolve_settings(load_preset("basic"), environ={})
    assert basic.directions.method == "diff_means" and basic.directions.n_directions == 1
    assert basic.excise.norm_preserve is False and basic.layers.method == "arditi"
    assert basic.description
    advanced = resolve_settings(load_preset("advanced"), environ={})
    assert advanced.directions.method == "diff_means" and advanced.directions.contrast == "filtered"
    assert advanced.excise.layer_weights == "through_source"


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_preset("nonexistent")
    assert "basic" in str(err.value) and "advanced" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_preset(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[excise\nlam = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_preset(str(bad))
    good = tmp_path / "mine.toml"
    good.write_text('[excise]\nlam = 2.0\n[data]\nharmful = "x.txt"\n', encoding="utf-8")
    s = resolve_settings(load_preset(str(good)), environ={})
    assert s.excise.lam == 2.0 and s.data.harmful == "x.txt"


@pytest.mark.parametrize(
    "text, value",
    [
        ("2", 2),
        ("-7", -7),
        ("0.5", 0.5),
        ("1e-3", 1e-3),
        ("true", True),
        ("false", False),
        ("hello", "hello"),
        ("builtin:harmful", "builtin:harmful"),
        ('"quoted string"', "quoted string"),
        ("some/path.txt", "some/path.txt"),
    ],
)
def test_parse_value(text, value):
    out = parse_value(text)
    assert out == value and type(out) is type(value)


def test_merge_helpers():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}, "e": 6}) == {"a": {"b": 5, "c": 2}, "d": 3, "e": 6}
    base = {"a": {"b": 1}}
    deep_merge(base, {"a": {"b": 2}})
    assert base == {"a": {"b": 1}}  # inputs are not mutated
    assert nest({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert nest({"x__y__z": 1}, sep="__") == {"x": {"y": {"z": 1}}}


@pytest.mark.parametrize("override", [{"excise": {"lam": float("inf")}}, {"excise": {"lam": float("nan")}},
                                      {"layers": {"kl_threshold": float("-inf")}},
                                      {"optimize": {"max_weight": [1.0, float("nan")]}},
                                      {"excise": {"kernel_attn": {"max_weight": float("nan")}}}])
def test_nan_and_inf_settings_are_refused_by_the_python_api(override):
    with pytest.raises(ConfigError, match="finite number"):
        resolve_settings(cli=override, environ={})


@pytest.mark.parametrize("flat, needle", [({"": 5}, "no setting name"), ({"..": 5}, "no setting name"),
                                          ({"excise.lam": 1, "excise.lam.x": 2}, "value and sub-settings"),
                                          ({"excise.lam.x": 2, "excise.lam": 1}, "value and sub-settings")])
def test_nest_refuses_empty_and_conflicting_keys(flat, needle):
    with pytest.raises(ConfigError, match=needle):
        nest(flat)
