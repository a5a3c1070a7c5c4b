"""The CLI end to end on a tiny random model, and every bad input ending in one clear error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from obliteratus.errors import IntegrityError
from obliteratus.models.aliases import assemble_parts

from conftest import save_tiny
from support.cli import FAST, assert_one_error, run_cli, tree_hash
from support.lm_eval import fake_lm_eval


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("src"), "llama")


def test_obliterate_end_to_end_writes_a_loadable_model(tiny_dir, tmp_path, capsys, monkeypatch):
    before = tree_hash(tiny_dir)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), "--layer", "2", *FAST],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "refusal rate" in stdout and "KL" in stdout
    assert tree_hash(tiny_dir) == before, "the source model was modified"
    for name in ("model.safetensors", "config.json", "obliteratus.json", "directions.safetensors", "README.md"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["preset"] == "basic" and meta["directions"]["layer"] == 2
    assert set(meta["timings_s"]) >= {"summon", "probe", "distill", "verify_before", "excise", "verify_after", "rebirth"}
    assert meta["metrics_after"]["kl_mean"] is not None
    assert meta["splits"]["harmful"] == {"train": 8, "val": 4, "test": 6}
    # The saved model has the direction removed from every writer.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    q = load_file(str(out / "directions.safetensors"))["basis"]
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        assert (q @ layer.self_attn.o_proj.weight).abs().max() < 1e-4
        assert (q @ layer.mlp.down_proj.weight).abs().max() < 1e-4
    assert (model.model.embed_tokens.weight @ q.T).abs().max() < 1e-4
    assert not list(tmp_path.glob(".run.*")), "temporary directories left behind"


def test_existing_output_is_refused_then_overwritten(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "exists")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an empty directory or a previous output (issue 24, item 8)
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), "--overwrite", *FAST],
                           capsys, monkeypatch)
    assert_one_error(code, err, "not an obliteratus output")
    (out / "obliteratus.json").write_text("{}")  # a run written before the .obliteratus-output marker
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), "--overwrite", "--layer", "1", *FAST],
                           capsys, monkeypatch)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "obliteratus.json").is_file()


def test_missing_model(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["obliterate", str(tmp_path / "nope"), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "not found")
    code, _, err = run_cli(["obliterate", str(tmp_path / "nope.gguf"), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "gguf file not found")


def test_gguf_with_wrong_hash_leaves_nothing(tmp_path):
    part = tmp_path / "part01.bin"
    part.write_bytes(b"not a model")
    dest = tmp_path / "joined.gguf"
    with pytest.raises(IntegrityError, match="sha256"):
        assemble_parts([part], dest, "0" * 64)
    assert not dest.exists() and not list(tmp_path.glob("*.partial"))


def test_wrong_hash_alias_is_an_error(tmp_path, capsys, monkeypatch):
    from obliteratus.models import aliases

    part = tmp_path / "pkg" / "data" / "part01.bin"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"corrupted")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OBLITERATUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(aliases.ALIASES, "broken", aliases.Alias("broken", "test", (("pkg", "data/part01.bin"),),
                                                                 "0" * 64, "n/a"))
    code, _, err = run_cli(["models", "--prepare", "broken"], capsys, monkeypatch)
    assert_one_error(code, err, "does not match")
    assert not (tmp_path / "cache" / "models" / "broken").exists()


@pytest.mark.parametrize("content, needle", [("", "empty"), ("only one prompt\n", "only one")])
def test_bad_prompt_files(tiny_dir, tmp_path, capsys, monkeypatch, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    out = tmp_path / "run"
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--harmful", str(bad), "--output", str(out), *FAST],
                           capsys, monkeypatch)
    assert_one_error(code, err, needle)
    assert not out.exists()


def test_fewer_prompts_than_directions(tiny_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["obliterate", str(tiny_dir), *FAST, "--set", "directions.method=svd",
                            "--set", "directions.n_directions=16"], capsys, monkeypatch)
    assert_one_error(code, err, "n_directions")


def test_nan_activations(tmp_path, capsys, monkeypatch):
    path = save_tiny(tmp_path, "llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    key = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run_cli(["obliterate", str(path), "--output", str(out), *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "NaN")
    assert not out.exists()


def test_bad_setting_lists_the_field(tiny_dir, capsys, monkeypatch):
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--set", "excise.lamda=2"], capsys, monkeypatch)
    assert_one_error(code, err, "excise.lamda")


def test_listing_verbs(capsys, monkeypatch):
    code, out, _ = run_cli(["presets"], capsys, monkeypatch)
    assert code == 0 and "basic" in out and "advanced" in out
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert code == 0 and "demo" in out and "smollm2-135m" in out and "GPT-NeoX" in out


def test_probe_and_evaluate_verbs(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "acts"
    code, stdout, err = run_cli(["probe", str(tiny_dir), "--output", str(out), "--n-train", "8", "--positions", "2",
                                 "--set", "data.n_val=4", "--set", "data.n_test=4"], capsys, monkeypatch)
    assert code == 0, err
    from safetensors.torch import load_file

    acts = load_file(str(out / "activations.safetensors"))
    assert acts["harmful"].shape == (8, 2, 4, 32) and torch.isfinite(acts["harmful"]).all()
    assert len(json.loads((out / "norms.json").read_text())["layer_norms"][0]) == 4
    report = tmp_path / "metrics.json"
    code, stdout, err = run_cli(["evaluate", str(tiny_dir), "--base", str(tiny_dir), "--n-test", "4",
                                 "--max-new-tokens", "6", "--json", str(report), "--set", "evaluate.ppl_window=64"],
                                capsys, monkeypatch)
    assert code == 0, err
    metrics = json.loads(report.read_text())
    assert metrics["kl_mean"] < 1e-6 and metrics["n_harmful"] == 4


def test_evaluate_lm_eval_option_runs_the_evaluated_model(tiny_dir, tmp_path, capsys, monkeypatch):
    calls = fake_lm_eval(monkeypatch)
    report = tmp_path / "metrics.json"
    code, stdout, err = run_cli(["evaluate", str(tiny_dir), "--n-test", "2", "--max-new-tokens", "2", "--lm-eval",
                                 "arc_easy,hellaswag,", "--json", str(report), "--set", "evaluate.perplexity=false"],
                                capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(report.read_text())["lm_eval"] == {t: {"acc,none": 0.25, "acc_stderr,none": 0.01}
                                                         for t in ("arc_easy", "hellaswag")}
    assert calls[1][2] == ["arc_easy", "hellaswag"] and "arc_easy" in stdout
    assert type(calls[0][1]).__name__ in ("LlamaForCausalLM",)  # the evaluated model, already loaded


def test_obliterate_writes_a_lora_that_peft_loads_into_the_edited_model(tiny_dir, tmp_path, capsys, monkeypatch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out, lora = tmp_path / "run", tmp_path / "lora"
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), "--lora", str(lora), "--layer", "2",
                            "--set", "excise.biases=false", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        edited = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        with_lora = peft.PeftModel.from_pretrained(base, lora)(input_ids=ids).logits
    torch.testing.assert_close(with_lora, edited, atol=1e-4, rtol=1e-4)


def test_lora_refused_for_an_edit_that_is_not_low_rank(tiny_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--lora", str(tmp_path / "lora"), "--layer", "2",
                            "--method", "surgical", *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "low-rank")
    assert not (tmp_path / "lora").exists()


def test_judge_is_selectable_for_verify(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--output", str(out), "--layer", "2", "--judge", "prefix",
                            *FAST], capsys, monkeypatch)
    assert code == 0, err
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["metrics_after"]["judge"] == "prefix" and meta["settings"]["evaluate"]["judge"] == "prefix"
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--layer", "2", "--judge", "nope", *FAST], capsys, monkeypatch)
    assert_one_error(code, err, "unknown judge")


def test_obliterate_with_a_study_preset_runs_the_optimizer(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["obliterate", str(tiny_dir), "--method", "optimized", "--output", str(out), *FAST,
                                 "--set", "optimize.study.n_trials=2", "--set", "optimize.study.n_startup_trials=1",
                                 "--set", "optimize.study.refusal_tokens=3"], capsys, monkeypatch)
    assert code == 0, err
    assert "optimizer study" in stdout and "Pareto front" in stdout and "refusal rate" in stdout
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["preset"] == "optimized" and meta["optimize"]["trial"] in (0, 1)
    assert (tmp_path / "run.study" / "study.db").is_file()
    code, _, err = run_cli(["obliterate", str(tiny_dir), "--method", "optimized", "--lora", str(tmp_path / "l"), *FAST],
                           capsys, monkeypatch)
    assert_one_error(code, err, "--lora")


def test_analyze_names_the_layer_it_took_the_direction_from(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli(["analyze", str(tiny_dir), "--output", str(out), "--n-train", "8", "--n-test", "6",
                                 "--patch-prompts", "2"], capsys, monkeypatch)
    assert code == 0, err
    layer = json.loads((out / "analysis.json").read_text())["direction"]["layer"]
    assert f"direction from layer {layer}, chosen by effect_size" in " ".join(stdout.split())
