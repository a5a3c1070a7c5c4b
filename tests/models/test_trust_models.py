"""Issue 24: every corrupt, incomplete or hostile model input ends in one clear error (exit 2, no
traceback) at SUMMON, PROBE or VERIFY, never in a traceback or a saved model with random or
non-finite weights. Each case builds a broken copy of a tiny llama checkpoint (or a tiny GGUF)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from obliteratus.models.options import ModelSettings
from obliteratus.errors import ActivationError, IntegrityError, ModelNotFoundError
from obliteratus.models.load import summon

from conftest import save_tiny
from support.cli import assert_one_error, run_cli

EVAL = ["--n-test", "2", "--max-new-tokens", "2", "--set", "evaluate.ppl_window=32"]
CPU = ModelSettings(device="cpu")


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("src"), "llama")


@pytest.fixture
def tiny(tiny_src, tmp_path) -> Path:
    """A fresh copy of the tiny llama checkpoint to break."""
    return Path(shutil.copytree(tiny_src, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def edit_weights(model_dir: Path, fn) -> None:
    state = load_file(model_dir / "model.safetensors")
    fn(state)
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})


def evaluate(model: Path | str, capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    return run_cli(["evaluate", str(model), *EVAL, *extra], capsys, monkeypatch)


# --- weights files -------------------------------------------------------------------------------


def test_config_only_directory(tiny, capsys, monkeypatch):
    for name in os.listdir(tiny):
        if name != "config.json":
            (tiny / name).unlink()
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "has config.json but no weights")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_safetensors_names_the_file(tiny, capsys, monkeypatch, damage):
    weights = tiny / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, "model.safetensors is not a valid safetensors file")


def test_tokenizer_files_missing(tiny, capsys, monkeypatch):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tiny / name).unlink()
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "cannot load the tokenizer")


def test_pickle_weights_refused_unless_allowed(tiny, capsys, monkeypatch):
    state = load_file(tiny / "model.safetensors")
    torch.save(state, tiny / "pytorch_model.bin")
    (tiny / "model.safetensors").unlink()
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, "--set model.allow_pickle=true")
    assert "pickle" in err
    with pytest.raises(ModelNotFoundError, match="allow_pickle"):
        summon(str(tiny), CPU)
    loaded = summon(str(tiny), ModelSettings(device="cpu", allow_pickle=True))  # the opt-in loads it
    assert torch.equal(loaded.model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_unreadable_weights_are_not_reported_missing(tiny, tmp_path):
    """A weights file the user may not read: transformers calls it missing; we say permission denied.
    Root reads any file, so as root the CLI runs in a child without CAP_DAC_OVERRIDE (setpriv)."""
    (tiny / "model.safetensors").chmod(0)
    cmd = [sys.executable, "-c", "from obliteratus.cli import main; main()", "evaluate", str(tiny), *EVAL]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: every file is readable")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert_one_error(done.returncode, done.stderr, "permission denied reading")
    assert "model.safetensors" in done.stderr and "No such file" not in done.stderr


# --- weights that do not match the config ---------------------------------------------------------


def test_checkpoint_missing_layers_is_refused(tiny, capsys, monkeypatch):
    edit_json(tiny / "config.json", num_hidden_layers=5)  # the weights hold 3 layers
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, "18 tensors missing (model.layers.3.")


def test_checkpoint_with_extra_layers_is_refused(tiny, capsys, monkeypatch):
    edit_json(tiny / "config.json", num_hidden_layers=2)
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "tensors unexpected (model.layers.2.")


def test_shape_mismatch_is_refused(tiny, capsys, monkeypatch):
    edit_json(tiny / "config.json", intermediate_size=48)  # the weights have 64
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, "of another shape")
    assert "(32, 64) in the file, (32, 48) by config.json" in err


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_tied_lm_head_is_not_missing(tmp_path, family):
    loaded = summon(str(save_tiny(tmp_path, family)), CPU)
    assert loaded.adapter.tied_lm_head


# --- non-finite weights, activations, logits ------------------------------------------------------


@pytest.mark.parametrize("name,value", [("model.layers.1.mlp.down_proj.weight", float("nan")),
                                        ("model.embed_tokens.weight", float("inf"))])
def test_non_finite_weights_named_at_summon(tiny, capsys, monkeypatch, name, value):
    def poison(state):
        state[name][3, 1] = value

    edit_weights(tiny, poison)
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, f"{name} holds 1 NaN/inf")
    assert "before any edit" in err  # not blamed on an edit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_is_finite_fast_path_is_exact(dtype):
    from obliteratus.models.trust import is_finite

    x = torch.randn(1000).to(dtype)
    assert is_finite(x)
    assert is_finite(torch.full((100,), torch.finfo(dtype).max, dtype=dtype))  # the sum overflows, no element does
    for bad in ([float("nan")], [float("inf")], [float("inf"), float("-inf")]):  # inf - inf sums to NaN
        y = x.clone()
        y[3:3 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not is_finite(y) and not is_finite(y, chunk=7)


def test_overflowing_activations_stop_probe(tiny, tmp_path, capsys, monkeypatch):
    def blow_up(state):
        state["model.layers.0.mlp.down_proj.weight"].fill_(3e38)  # finite weights, inf activations

    edit_weights(tiny, blow_up)
    code, _, err = run_cli(["probe", str(tiny), "--output", str(tmp_path / "acts"), "--n-train", "2"],
                           capsys, monkeypatch)
    assert_one_error(code, err, "activations contain NaN/inf")
    assert "the output of layer 0" in err
    assert not (tmp_path / "acts").exists()


def test_huge_logits_give_infinite_perplexity_not_an_overflow(tiny, capsys, monkeypatch):
    def scale(state):
        state["lm_head.weight"] *= 1e4  # finite logits, mean NLL past exp's range (709)

    edit_weights(tiny, scale)
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "VERIFY: perplexity is inf")


def test_overflowing_logits_stop_before_anything_is_saved(tiny, tmp_path, capsys, monkeypatch):
    def blow_up(state):
        state["lm_head.weight"] *= 3e37  # the body is fine (PROBE passes), the logits are inf

    edit_weights(tiny, blow_up)
    out = tmp_path / "run"
    code, _, err = run_cli(["obliterate", str(tiny), "--output", str(out), "--layer", "2", "--n-train", "4",
                            "--n-val", "2", "--n-test", "2", "--max-new-tokens", "2",
                            "--set", "evaluate.ppl_window=32"], capsys, monkeypatch)
    assert_one_error(code, err, "VERIFY: perplexity is inf")
    assert not out.exists()


# --- tokenizer and template ------------------------------------------------------------------------


def test_tokenizer_without_pad_pads_with_eos(tiny):
    edit_json(tiny / "tokenizer_config.json", pad_token=None)
    loaded = summon(str(tiny), CPU)
    assert (loaded.tokenizer.eos_token, loaded.tokenizer.pad_token) == ("<eos>", "<eos>")


def test_tokenizer_without_pad_or_eos(tiny, capsys, monkeypatch):
    edit_json(tiny / "tokenizer_config.json", pad_token=None, eos_token=None)
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "neither a pad nor an eos token")


@pytest.mark.parametrize("template,needle", [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "jinja's sandbox forbids"),
    ("{% for m in messages %}{{ m.content }", "cannot render a one-message chat"),
])
def test_bad_chat_template(tiny, capsys, monkeypatch, template, needle):
    (tiny / "chat_template.jinja").write_text(template)
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], needle)


# --- code the checkpoint ships ---------------------------------------------------------------------


def test_custom_code_refusal_says_how_to_allow_it(tiny, capsys, monkeypatch):
    edit_json(tiny / "config.json", model_type="tinything",
              auto_map={"AutoConfig": "conf.TinyConfig", "AutoModelForCausalLM": "model.TinyModel"})
    code, _, err = evaluate(tiny, capsys, monkeypatch)
    assert_one_error(code, err, "--set model.trust_remote_code=true")
    assert "your permissions" in err


def test_unknown_model_type(tiny, capsys, monkeypatch):
    edit_json(tiny / "config.json", model_type="tinything")
    assert_one_error(*evaluate(tiny, capsys, monkeypatch)[::2], "upgrade transformers")


# --- GGUF ------------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, scores: bool = True, n_layers: int = 2, d: int = 32, ff: int = 64) -> Path:
    """A tiny llama GGUF (float32 tensors, a sentencepiece-style byte-fallback vocabulary)."""
    import gguf

    heads, kv = 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁", "a", "b", "▁a"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0, -4.0])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * 4)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(len(tokens), d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", t(len(tokens), d))
    hd = d // heads
    for i in range(n_layers):
        for name, tensor in (("attn_norm", np.ones(d, np.float32)), ("ffn_norm", np.ones(d, np.float32)),
                             ("attn_q", t(d, d)), ("attn_k", t(kv * hd, d)), ("attn_v", t(kv * hd, d)),
                             ("attn_output", t(d, d)), ("ffn_gate", t(ff, d)), ("ffn_up", t(ff, d)),
                             ("ffn_down", t(d, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_gguf_loads(tiny_gguf):
    loaded = summon(str(tiny_gguf), CPU)  # the control for the broken files below
    assert loaded.adapter.n_layers == 2 and loaded.tokenizer.pad_token == "</s>"


@pytest.mark.parametrize("keep", [0, 8, 200, 0.5, 0.99])
def test_truncated_gguf(tiny_gguf, tmp_path, capsys, monkeypatch, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    assert_one_error(*evaluate(cut, capsys, monkeypatch)[::2], "is not a valid GGUF file")


def test_garbage_gguf(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(1).bytes(1000))
    assert_one_error(*evaluate(junk, capsys, monkeypatch)[::2], "is not a valid GGUF file")


def test_gguf_without_tokenizer_scores(tmp_path, capsys, monkeypatch):
    path = write_tiny_gguf(tmp_path / "noscores.gguf", scores=False)
    assert_one_error(*evaluate(path, capsys, monkeypatch)[::2], "has no tokenizer.ggml.scores")


def test_gguf_conversion_checks_too(tmp_path):
    from obliteratus.models.aliases import convert_gguf

    path = write_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="not a valid GGUF file"):
        convert_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_probe_error_names_the_embeddings():
    from obliteratus.probe import ActivationCache

    bad = torch.zeros(2, 1, 4, 3)
    bad[1, 0, 0, 2] = float("nan")
    with pytest.raises(ActivationError, match="the embedding output"):
        ActivationCache(bad, torch.zeros(2, 1, 4, 3))
