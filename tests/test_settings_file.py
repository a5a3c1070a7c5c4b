"""The settings surface generated from the model: default.toml, the CLI options, the environment
variables, and secrets kept out of every saved file (issue 25)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from obliteratus.settings import Settings, env_overrides, resolve_settings, tomllib
from obliteratus.settings_file import (DEFAULT_TOML, default_toml, env_name, redact_url, saved_settings,
                                       secret_paths, settings_toml)

from conftest import save_tiny
from support.cli import FAST, run_cli

SECRET = "postgresql://user:s3cret@db.example/study"


def leaf_paths(model=Settings, prefix=""):
    from obliteratus.settings_file import _model_in

    for name, info in model.model_fields.items():
        sub = _model_in(info.annotation)
        if name == "options" and prefix == "directions.":
            continue
        if sub is None:
            yield prefix + name
        else:
            yield from leaf_paths(sub, f"{prefix}{name}.")


# -- default.toml ----------------------------------------------------------------------------------

def test_default_toml_is_in_step_with_the_settings_model():
    """The shipped file is what the model generates: run `obliteratus config > src/obliteratus/default.toml`."""
    assert DEFAULT_TOML.read_text("utf-8") == default_toml(), \
        "default.toml is stale: regenerate it with `obliteratus config > src/obliteratus/default.toml`"


def test_default_toml_loads_back_to_the_defaults_and_names_every_setting():
    text = DEFAULT_TOML.read_text("utf-8")
    assert resolve_settings(tomllib.loads(text), environ={}) == Settings()
    lines = [line.lstrip("# ") for line in text.splitlines()]
    tables = {line.strip("[]") for line in lines if line.startswith("[")}
    for path in leaf_paths():
        table, _, name = path.rpartition(".")
        assert table == "" or table in tables, path
        assert any(line.startswith(f"{name} = ") for line in lines), path
    assert "# system_prompt = <str>" in text and "# storage = <str>" in text  # None defaults: commented out
    assert "# [excise.kernel_attn]" in text  # an optional table: off
    assert "s3cret" not in text and "1.4x" not in text and "188 s" not in text


def test_the_default_file_is_no_preset():
    from obliteratus.presets import preset_names

    assert "default" not in preset_names()


@pytest.mark.parametrize("preset", ["basic", "heretic", "advanced", "informed", "rdo"])
def test_a_presets_settings_written_as_toml_load_back_the_same(preset):
    from obliteratus.presets import load_preset

    settings = resolve_settings(load_preset(preset), environ={})
    assert resolve_settings(tomllib.loads(settings_toml(settings)), environ={}) == settings


def test_config_verb_prints_the_default_file_and_a_resolved_preset(capsys, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("OBLITERATUS_") and "__" in k]:
        monkeypatch.delenv(key)
    code, out, err = run_cli(["config"], capsys, monkeypatch)
    assert code == 0, err
    assert out == DEFAULT_TOML.read_text("utf-8")
    monkeypatch.setenv("OBLITERATUS_EXCISE__LAM", "1.5")
    code, out, err = run_cli(["config", "-m", "heretic", "--set", f"optimize.study.storage={SECRET}"], capsys,
                             monkeypatch)
    assert code == 0, err
    data = tomllib.loads(out)
    assert data["excise"]["lam"] == 1.5 and data["optimize"]["enabled"] is True
    assert data["optimize"]["study"]["storage"] == "postgresql://user:***@db.example/study"
    assert "s3cret" not in out


# -- environment variables ------------------------------------------------------------------------

def test_every_settings_environment_variable_reaches_its_setting():
    assert env_name("data.n_train") == "OBLITERATUS_DATA__N_TRAIN"
    assert env_name("optimize.study.kl_rank") == "OBLITERATUS_OPTIMIZE__STUDY__KL_RANK"
    for path in [p for p in leaf_paths() if "." in p]:  # the top-level keys (a preset's description) have none
        node = env_overrides({env_name(path): "1"})
        for part in path.split("."):
            node = node[part]
        assert node == 1, path


# -- the CLI options are the settings' ------------------------------------------------------------

def _verbs():
    import typer

    from obliteratus.cli import app

    return typer.main.get_command(app).commands


def test_cli_options_of_settings_take_help_and_choices_from_the_model_and_default_to_unset():
    from obliteratus.models.options import ModelSettings
    from obliteratus.settings import DataSettings

    verbs = _verbs()
    ob = {p.name: p for p in verbs["obliterate"].params}
    assert ob["n_train"].help.startswith(DataSettings.model_fields["n_train"].description)
    assert "data.n_train" in ob["n_train"].help
    assert ob["dtype"].metavar == "[auto|float32|bfloat16|float16]"
    assert "evaluate.judge" in ob["judge"].help and ob["judge"].opts == ["--judge"]
    assert ModelSettings.model_fields["device"].description in ob["device"].help
    for name, verb in verbs.items():  # no CLI default of its own: a generated option is None until given
        for param in verb.params:
            if "(setting " in (param.help or ""):
                assert param.default is None, (name, param.name)


def test_every_verb_keeps_its_flags():
    verbs = _verbs()
    flags = {name: {o for p in verb.params for o in [*p.opts, *p.secondary_opts]} for name, verb in verbs.items()}
    assert flags["obliterate"] >= {"--method", "-m", "--output", "-o", "--overwrite", "--dtype", "--device",
                                   "--harmful", "--harmless", "--column", "--n-train", "--n-val", "--n-test", "--seed",
                                   "--chat-template", "--no-chat-template", "--positions", "--batch-size", "--layer",
                                   "--layer-method", "--max-new-tokens", "--set", "--lora", "--judge"}
    assert flags["evaluate"] >= {"--base", "--dtype", "--device", "--n-test", "--max-new-tokens", "--judge", "--json",
                                 "--lm-eval", "--set"}
    assert flags["probe"] >= {"--output", "-o", "--overwrite", "--positions", "--batch-size", "--n-train", "--dtype",
                              "--device", "--set"}
    assert flags["optimize"] >= {"--method", "--output", "--overwrite", "--trials", "--startup-trials",
                                 "--study-seed", "--storage", "--study-name", "--run-dir", "--pick", "--target",
                                 "--refusal-tokens", "--worker", "--dtype", "--device", "--n-train", "--n-val",
                                 "--n-test", "--max-new-tokens", "--set"}
    assert flags["analyze"] >= {"--output", "--method", "-m", "--n-train", "--n-test", "--layers", "--layer",
                                "--probe-method", "--patch-prompts", "--patch-layers", "--top-k", "--overwrite",
                                "--set"}
    assert flags["chat"] >= {"--system", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--dtype",
                             "--device"}
    assert flags["compare"] >= {"--prompts", "--judge", "--column", "--max-new-tokens", "--batch-size", "--dtype",
                                "--device", "--option"}
    assert flags["judge"] >= {"--judge", "-j", "--prompt-column", "--response-column", "--label-column", "--output",
                              "--option"}
    assert "config" in verbs


def test_generated_options_gather_overrides_and_implications():
    import typer
    from typer.testing import CliRunner

    from obliteratus.commands.options import Opt, settings_options

    seen = {}

    @settings_options("data.n_train", "model.dtype", Opt("layers.layer", implies={"layers.method": "fixed"}),
                      Opt("layers.method", name="layer_method"), "data.chat_template")
    def verb(model: str = typer.Argument(...), overrides: dict | None = None) -> None:
        seen.update(model=model, overrides=overrides)

    app = typer.Typer()
    app.command()(verb)
    app.command("noop")(lambda: None)
    run = CliRunner().invoke
    assert run(app, ["verb", "m", "--n-train", "9", "--layer", "3", "--set", "excise.lam=2"]).exit_code == 0
    assert seen == {"model": "m", "overrides": {"data": {"n_train": 9}, "layers": {"layer": 3, "method": "fixed"},
                                                "excise": {"lam": 2}}}
    assert run(app, ["verb", "m", "--layer", "3", "--layer-method", "knee", "--no-chat-template"]).exit_code == 0
    assert seen["overrides"] == {"layers": {"layer": 3, "method": "knee"}, "data": {"chat_template": False}}
    assert run(app, ["verb", "m"]).exit_code == 0 and seen["overrides"] == {}


def test_command_option_models_hold_the_python_api_defaults():
    from obliteratus.analysis.analyze import analyze
    from obliteratus.analysis.options import AnalyzeOptions

    params = inspect.signature(analyze).parameters
    for name, info in AnalyzeOptions.model_fields.items():
        assert params[name].default == info.default, name


def test_a_bad_command_option_names_its_flag():
    from obliteratus.commands.options import command_options
    from obliteratus.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--batch-size \(compare.batch_size\)"):
        command_options({"compare": {"batch_size": 0}}, "compare")
    assert command_options({}, "compare").max_new_tokens == 128


def test_study_option_groups_cover_each_option_once():
    from obliteratus.optimize.options import StudyOptions

    grouped = [n for names in StudyOptions.GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(StudyOptions.model_fields)


# -- secrets ---------------------------------------------------------------------------------------

def test_redaction_of_urls_and_secret_settings():
    assert redact_url(SECRET) == "postgresql://user:***@db.example/study"
    assert redact_url("postgresql://user:p%40ss@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redact_url("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    assert redact_url("not a url") == "not a url"
    assert "optimize.study.storage" in secret_paths()
    settings = resolve_settings({"optimize": {"study": {"storage": SECRET}},
                                 "evaluate": {"judge_options": {"api_key": "s3cret", "url": SECRET, "threshold": 1}}},
                                environ={})
    saved = saved_settings(settings)
    assert "s3cret" not in json.dumps(saved)
    assert saved["evaluate"]["judge_options"]["threshold"] == 1
    assert settings.optimize.study.storage == SECRET  # the run itself still has it


def _no_secret_under(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            assert b"s3cret" not in file.read_bytes(), file


def test_no_saved_file_or_log_line_holds_the_storage_password(tmp_path, capsys, monkeypatch):
    """A study on a password-protected storage (here PostgreSQL's URL, served by a local SQLite file)
    writes the model, obliteratus.json, the report, the study's metadata: none holds the password."""
    import optuna

    from obliteratus.optimize import strategy, study

    src = save_tiny(tmp_path / "src", "llama")
    db = tmp_path / "served.db"
    monkeypatch.setattr(strategy, "check_storage", lambda url: None)
    monkeypatch.setattr(study, "_storage", lambda options, url, attempts=5: optuna.storages.RDBStorage(
        f"sqlite:///{db}"))
    out = tmp_path / "run"
    code, stdout, err = run_cli(["optimize", str(src), "-o", str(out), "--storage", SECRET, "--trials", "2",
                                 "--startup-trials", "1", "--refusal-tokens", "3", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert "s3cret" not in stdout + err and "user:***@db.example" in stdout
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["settings"]["optimize"]["study"]["storage"] == "postgresql://user:***@db.example/study"
    assert meta["optimize"]["storage"] == "postgresql://user:***@db.example/study"
    _no_secret_under(out)
    loaded = optuna.load_study(study_name=meta["optimize"]["study_name"], storage=f"sqlite:///{db}")
    assert "s3cret" not in json.dumps([loaded.user_attrs, [t.user_attrs for t in loaded.trials]], default=str)
    analysis = tmp_path / "analysis"
    code, _, err = run_cli(["analyze", str(src), "-o", str(analysis), "--n-train", "8", "--n-test", "6",
                            "--patch-prompts", "1", "--set", f"optimize.study.storage={SECRET}"], capsys, monkeypatch)
    assert code == 0, err
    _no_secret_under(analysis)
