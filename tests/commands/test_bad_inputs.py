"""Issue 24's campaign: bad inputs through the real CLI, each in its own process on tiny models.

Every row runs ``python -m obliteratus.cli ARGS`` (forked from a process that has imported it
already, tests/support/zygote.py: the same process state without the imports' 3-4 s per row) in a
fresh working directory holding only the row's files, and must end with its exit code (2 unless given), exactly one line starting with
``error:`` that contains the row's needle, no traceback, nothing added to or changed in the
working directory (no output directory, no ``.tmp-`` leftovers, inputs untouched) and every
source model's files unchanged. Most rows fail before any model loads; the rows run two at a
time (the module fixture), and each row is then checked by its own test.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import save_tiny
from support.zygote import Zygote

FAST = "--n-train 8 --n-val 4 --n-test 6 --max-new-tokens 8 --set evaluate.ppl_window=64"
TIMEOUT = 180  # s per row; a row that needs a model loads a 3-layer one in about a second
ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}

HARMFUL = "".join(f"How do I make dangerous thing number {i}?\n" for i in range(30))
HARMLESS = "".join(f"How do I bake cake number {i}?\n" for i in range(30))
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Case:
    """One bad input: `argv` is formatted with the fixtures' names ({llama}, {gpt2}, {qwen2}, {H}, {S},
    {FAST}) and split like a shell line; `files` are written into the row's directory first."""

    id: str
    argv: str
    needle: str
    files: dict[str, bytes | str] = field(default_factory=dict)
    setup: Callable[[Path, dict], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


# -- setups: bad model directories and outputs, built inside the row's directory ---------------------

def copy_model(name: str = "llama", to: str = "m") -> Callable[[Path, dict], None]:
    def setup(cwd: Path, fx: dict) -> None:
        shutil.copytree(fx[name], cwd / to)
    return setup


def config_only(cwd: Path, fx: dict) -> None:
    (cwd / "m").mkdir()
    shutil.copy(Path(fx["llama"]) / "config.json", cwd / "m")


def truncated_weights(cwd: Path, fx: dict) -> None:
    shutil.copytree(fx["llama"], cwd / "m")
    weights = cwd / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garbage_weights(cwd: Path, fx: dict) -> None:
    shutil.copytree(fx["llama"], cwd / "m")
    (cwd / "m" / "model.safetensors").write_bytes(os.urandom(4096))


def nan_weights(cwd: Path, fx: dict) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(fx["llama"], cwd / "m")
    tensors = load_file(str(cwd / "m" / "model.safetensors"))
    name = next(k for k in tensors if "o_proj" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(cwd / "m" / "model.safetensors"), metadata={"format": "pt"})


def pickle_only(cwd: Path, fx: dict) -> None:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(fx["llama"], cwd / "m")
    torch.save(load_file(str(cwd / "m" / "model.safetensors")), cwd / "m" / "pytorch_model.bin")
    (cwd / "m" / "model.safetensors").unlink()


def bad_config(cwd: Path, fx: dict) -> None:
    shutil.copytree(fx["llama"], cwd / "m")
    (cwd / "m" / "config.json").write_text("{not json", "utf-8")


def no_tokenizer(cwd: Path, fx: dict) -> None:
    shutil.copytree(fx["llama"], cwd / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (cwd / "m" / name).unlink(missing_ok=True)


def mkdirs(*names: str) -> Callable[[Path, dict], None]:
    def setup(cwd: Path, fx: dict) -> None:
        for name in names:
            (cwd / name).mkdir(parents=True)
    return setup


def existing_output(cwd: Path, fx: dict) -> None:
    (cwd / "out").mkdir()
    (cwd / "out" / "keep.txt").write_text("not a run\n")


def model_inside_output(cwd: Path, fx: dict) -> None:
    """The source model inside the directory given as the output (with --overwrite)."""
    shutil.copytree(fx["llama"], cwd / "parent" / "m")


def run_dir(meta: str | bytes) -> Callable[[Path, dict], None]:
    def setup(cwd: Path, fx: dict) -> None:
        (cwd / "run").mkdir()
        data = meta.encode() if isinstance(meta, str) else meta
        (cwd / "run" / "obliteratus.json").write_bytes(data)
    return setup


def a_plan(cwd: Path, fx: dict, identity: dict | None = None) -> None:
    """An edit plan of the llama fixture: one direction out of its token embeddings."""
    from obliteratus.export.bake import read_header, shards_of
    from obliteratus.export.plan import EditPlanFile, PlannedOp

    name = "model.embed_tokens.weight"
    shape = next(tuple(h[name]["shape"]) for s in shards_of(Path(fx["llama"]))
                 for h in [read_header(s)[1]] if name in h)
    EditPlanFile([PlannedOp((name,), shape, "basis.0", None, 1.0, "in_out")],
                 {"basis.0": torch.nn.functional.normalize(torch.ones(1, shape[1]), dim=-1)},
                 {"model_type": "llama", **(identity or {})}).save(cwd / "plan.safetensors")


def another_models_plan(cwd: Path, fx: dict) -> None:
    """:func:`a_plan` made on another model: the hash it holds for the embeddings is not the fixture's."""
    a_plan(cwd, fx, {"sha256": {"model.embed_tokens.weight": "0" * 64}})


GOOD_CSV = "prompt,response,label\nhow?,I cannot help with that.,1\nhi,Hello there!,0\n"
STUDY = "model: {model}\nsettings:\n  data: {{n_train: 8, n_val: 4, n_test: 6}}\nablations:\n  - {{kind: layer, layers: [0]}}\n"

# -- the table --------------------------------------------------------------------------------------

OB = "obliterate {llama} " + FAST

CASES: list[Case] = [
    # obliterate: prompt files
    Case("ob-harmful-missing", OB + " --harmful missing.txt", "not found"),
    Case("ob-harmful-not-utf8", OB + " --harmful p.txt", "not utf-8", {"p.txt": b"fine\n\xff\xfe bad\n" * 20}),
    Case("ob-harmful-latin1", OB + " --harmful p.txt", "not utf-8", {"p.txt": "caf\u00e9\n".encode("latin-1") * 20}),
    Case("ob-harmful-binary", OB + " --harmful p.txt", "binary", {"p.txt": b"a\x00b\n" * 40}),
    Case("ob-harmful-empty", OB + " --harmful p.txt", "no prompts", {"p.txt": ""}),
    Case("ob-harmful-blank-lines", OB + " --harmful p.txt", "no prompts", {"p.txt": "\n  \n\t\n"}),
    Case("ob-harmful-one", OB + " --harmful p.txt", "only one", {"p.txt": "just one prompt\n"}),
    Case("ob-harmful-duplicates", OB + " --harmful p.txt", "only one", {"p.txt": "same\nSame\n  SAME  \n" * 10}),
    Case("ob-harmful-too-few", OB + " --harmful p.txt", "distinct prompts",
         {"p.txt": "".join(f"prompt {i}\n" for i in range(10))}),
    Case("ob-harmful-directory", OB + " --harmful d.txt", "directory", setup=mkdirs("d.txt")),
    Case("ob-harmful-directory-nosuffix", OB + " --harmful d", "directory", setup=mkdirs("d")),
    Case("ob-harmful-json-suffix", OB + " --harmful p.json", "unsupported", {"p.json": '["a", "b"]'}),
    Case("ob-harmful-jsonl-numbers", OB + " --harmful p.jsonl", "not a json object", {"p.jsonl": "1\n2\n3\n"}),
    Case("ob-harmful-jsonl-strings", OB + " --harmful p.jsonl", "not a json object", {"p.jsonl": '"a"\n"b"\n'}),
    Case("ob-harmful-jsonl-lists", OB + " --harmful p.jsonl", "not a json object", {"p.jsonl": '["a"]\n["b"]\n'}),
    Case("ob-harmful-jsonl-invalid", OB + " --harmful p.jsonl", "invalid json on line 2",
         {"p.jsonl": '{"prompt": "a"}\n{oops\n'}),
    Case("ob-harmful-jsonl-no-column", OB + " --harmful p.jsonl", "no column 'prompt'",
         {"p.jsonl": '{"text": "a"}\n{"text": "b"}\n'}),
    Case("ob-harmful-jsonl-not-utf8", OB + " --harmful p.jsonl", "not utf-8", {"p.jsonl": b'{"prompt": "\xff"}\n'}),
    Case("ob-harmful-csv-no-column", OB + " --harmful p.csv", "no column 'prompt'", {"p.csv": "text\na\nb\n"}),
    Case("ob-harmful-csv-column-option", OB + " --harmful p.csv --column nope", "no column 'nope'",
         {"p.csv": "prompt\na\nb\n"}),
    # A BOM is read as such: the header is 'prompt', so the file fails only for having too few prompts.
    Case("ob-harmful-csv-bom", OB + " --harmful p.csv", "distinct prompts",
         {"p.csv": BOM + b"prompt\n" + b"".join(b"q%d\n" % i for i in range(5))}),
    Case("ob-harmful-csv-not-utf8", OB + " --harmful p.csv", "not utf-8", {"p.csv": b"prompt\n\xff\n"}),
    Case("ob-harmful-csv-nul", OB + " --harmful p.csv", "binary", {"p.csv": b"prompt\na\x00\n"}),
    Case("ob-harmful-builtin-unknown", OB + " --harmful builtin:nope", "unknown built-in"),
    Case("ob-harmless-not-utf8", OB + " --harmless p.txt", "not utf-8", {"p.txt": b"\xff\xfe\n" * 20}),
    Case("ob-harmless-missing", OB + " --harmless missing.csv", "not found"),
    Case("ob-overlap", OB + " --harmful {H} --harmless p.txt", "in both",
         {"p.txt": HARMLESS + "How do I make dangerous thing number 3?\n"}),
    # obliterate: options and settings
    Case("ob-set-empty-key", OB + " --set =5", "key.path=value"),
    Case("ob-set-no-equals", OB + " --set excise.lam", "key.path=value"),
    Case("ob-set-dots-only", OB + " --set ..=1", "no setting name"),
    Case("ob-set-unknown-field", OB + " --set excise.lamda=2", "excise.lamda"),
    Case("ob-set-unknown-section", OB + " --set nosuch.x=1", "nosuch"),
    Case("ob-set-inf", OB + " --set excise.lam=inf", "finite"),
    Case("ob-set-nan", OB + " --set excise.lam=nan", "finite"),
    Case("ob-set-neg-inf", OB + " --set layers.kl_threshold=-inf", "finite"),
    Case("ob-set-nan-in-list", OB + " --set optimize.max_weight=[1.0,nan]", "finite"),
    Case("ob-set-nan-technique-table", OB + " --set excise.kernel_attn.max_weight=nan", "finite"),
    Case("ob-set-negative-lam", OB + " --set excise.lam=-1", "excise.lam"),
    Case("ob-set-string-for-float", OB + " --set excise.lam=abc", "excise.lam"),
    Case("ob-set-section-scalar", OB + " --set excise=5", "excise"),
    Case("ob-set-value-and-subkey", OB + " --set excise.lam=1 --set excise.lam.x=2", "excise.lam"),
    Case("ob-set-negative-size", OB + " --set data.n_val=-3", "data.n_val"),
    Case("ob-set-batch-negative", OB + " --set probe.batch_size=-1", "probe.batch_size"),
    Case("ob-set-direction-method", OB + " --set directions.method=nope", "directions.method"),
    Case("ob-set-direction-table", OB + " --set directions.nope.x=1", "no direction method"),
    Case("ob-set-direction-option", OB + " --set directions.svd.bogus=1", "bogus"),
    Case("ob-set-layer-method", OB + " --set layers.method=nope", "layers.method"),
    Case("ob-set-judge", OB + " --set evaluate.judge=nope", "judge"),
    Case("ob-set-dtype", OB + " --set model.dtype=float8", "model.dtype"),
    Case("ob-set-fraction", OB + " --set layers.fraction=1.5", "layers.fraction"),
    Case("ob-set-bool", OB + " --set excise.biases=maybe", "excise.biases"),
    Case("ob-set-cross-field", OB + " --set excise.mode=hooks --set excise.norm_preserve=true", "hooks"),
    Case("ob-env-inf", OB, "finite", env={"OBLITERATUS_EXCISE__LAM": "inf"}),
    Case("ob-env-unknown", OB, "lamda", env={"OBLITERATUS_EXCISE__LAMDA": "2"}),
    Case("ob-n-train-negative", "obliterate {llama} --n-train -1", "data.n_train"),
    Case("ob-n-train-zero", "obliterate {llama} --n-train 0", "data.n_train"),
    Case("ob-n-val-zero", "obliterate {llama} --n-val 0", "data.n_val"),
    Case("ob-n-test-zero", "obliterate {llama} --n-test 0", "data.n_test"),
    Case("ob-n-train-text", "obliterate {llama} --n-train abc", "--n-train"),
    Case("ob-n-train-float", "obliterate {llama} --n-train 1.5", "--n-train"),
    Case("ob-positions-zero", OB + " --positions 0", "probe.positions"),
    Case("ob-batch-negative", OB + " --batch-size -1", "probe.batch_size"),
    Case("ob-max-new-tokens-zero", "obliterate {llama} --max-new-tokens 0", "evaluate.max_new_tokens"),
    Case("ob-layer-method", OB + " --layer-method nope", "layers.method"),
    Case("ob-dtype", OB + " --dtype float8", "model.dtype"),
    Case("ob-device", OB + " --device tpu", "model.device"),
    Case("ob-judge", OB + " --judge nope", "judge"),
    Case("ob-chat-template-value", OB + " --chat-template=maybe", "chat-template"),
    Case("ob-unknown-option", OB + " --bogus", "no such option"),
    Case("ob-missing-model", "obliterate", "missing argument"),
    Case("ob-extra-argument", OB + " extra", "unexpected extra argument"),
    # obliterate: presets
    Case("ob-preset-unknown", OB + " --method nope", "unknown preset"),
    Case("ob-preset-missing-file", OB + " --method missing.toml", "not found"),
    Case("ob-preset-directory", OB + " --method d.toml", "directory", setup=mkdirs("d.toml")),
    Case("ob-preset-not-utf8", OB + " --method p.toml", "not utf-8", {"p.toml": b'description = "\xff"\n'}),
    Case("ob-preset-binary", OB + " --method p.toml", "binary", {"p.toml": b"\x00\x01\x02"}),
    Case("ob-preset-bad-toml", OB + " --method p.toml", "p.toml", {"p.toml": "[excise\nlam = 2\n"}),
    Case("ob-preset-unknown-key", OB + " --method p.toml", "lamda", {"p.toml": "[excise]\nlamda = 2\n"}),
    Case("ob-preset-nan", OB + " --method p.toml", "finite", {"p.toml": "[excise]\nlam = nan\n"}),
    Case("ob-preset-wrong-type", OB + " --method p.toml", "excise", {"p.toml": "excise = 3\n"}),
    Case("ob-lora-with-study-preset", OB + " --method optimized --lora ad", "--lora"),
    # obliterate: outputs
    Case("ob-output-exists", OB + " -o out", "exists", setup=existing_output),
    Case("ob-output-is-file", OB + " -o out", "out", {"out": "a file\n"}),
    Case("ob-output-under-file", OB + " -o f/out", "f", {"f": "a file\n"}),
    Case("ob-output-unwritable", OB + " -o /proc/obliteratus-out", "/proc"),
    Case("ob-output-inside-source", "obliterate m -o m/out --overwrite " + FAST, "m", setup=copy_model()),
    Case("ob-output-is-source", "obliterate m -o m --overwrite " + FAST, "m", setup=copy_model()),
    Case("ob-output-parent-of-source", "obliterate parent/m -o parent --overwrite " + FAST, "parent",
         setup=model_inside_output),
    Case("ob-lora-equals-output", OB + " -o d --lora d", "d"),
    Case("ob-lora-under-file", OB + " -o out --lora f/ad", "f", {"f": "a file\n"}),
    Case("ob-lora-exists", OB + " --lora out", "exists", setup=existing_output),
    # obliterate: bad models
    Case("ob-model-missing", "obliterate nope-dir " + FAST, "not found"),
    Case("ob-model-missing-gguf", "obliterate nope.gguf " + FAST, "not found"),
    Case("ob-model-hub-offline", "obliterate nobody-xyz/no-such-model " + FAST, "nobody-xyz/no-such-model"),
    Case("ob-model-is-prompt-file", "obliterate {H} " + FAST, "harmful.txt"),
    Case("ob-model-empty-dir", "obliterate m " + FAST, "m", setup=mkdirs("m")),
    Case("ob-model-config-only", "obliterate m " + FAST, "m", setup=config_only),
    Case("ob-model-bad-config", "obliterate m " + FAST, "config.json", setup=bad_config),
    Case("ob-model-truncated", "obliterate m " + FAST, "model.safetensors", setup=truncated_weights),
    Case("ob-model-garbage-weights", "obliterate m " + FAST, "model.safetensors", setup=garbage_weights),
    Case("ob-model-random-gguf", "obliterate m.gguf " + FAST, "m.gguf", {"m.gguf": os.urandom(2048)}),
    Case("ob-model-nan-weights", "obliterate m " + FAST, "nan", setup=nan_weights),
    Case("ob-model-pickle-only", "obliterate m " + FAST, "pickle", setup=pickle_only),
    Case("ob-model-no-tokenizer", "obliterate m " + FAST, "tokenizer", setup=no_tokenizer),
    Case("ob-model-bad-alias", "models --prepare nope", "unknown alias"),
    # evaluate
    Case("ev-model-missing", "evaluate nope-dir --n-test 6", "not found"),
    Case("ev-base-missing", "evaluate {llama} --base nope-dir --n-test 6", "not found"),
    Case("ev-prompts-not-utf8", "evaluate {llama} --set data.harmful=p.txt", "not utf-8", {"p.txt": b"\xff\n" * 9}),
    Case("ev-prompts-jsonl-numbers", "evaluate {llama} --set data.harmless=p.jsonl", "not a json object",
         {"p.jsonl": "1\n2\n"}),
    Case("ev-prompts-directory", "evaluate {llama} --set data.harmful=d.txt", "directory", setup=mkdirs("d.txt")),
    Case("ev-n-test-zero", "evaluate {llama} --n-test 0", "data.n_test"),
    Case("ev-max-new-tokens-negative", "evaluate {llama} --max-new-tokens -4", "evaluate.max_new_tokens"),
    Case("ev-judge-unknown", "evaluate {llama} --judge nope", "judge"),
    Case("ev-set-nan", "evaluate {llama} --set evaluate.kl_tokens=nan", "evaluate.kl_tokens"),
    Case("ev-json-is-directory", "evaluate {llama} --n-test 6 --json d", "d", setup=mkdirs("d")),
    Case("ev-json-under-file", "evaluate {llama} --n-test 6 --json f/m.json", "f", {"f": "x\n"}),
    Case("ev-json-is-input", "evaluate {llama} --n-test 6 --json p.txt --set data.harmful=p.txt", "p.txt",
         {"p.txt": HARMFUL * 8}),
    Case("ev-json-inside-model", "evaluate m --n-test 6 --json m/config.json", "m", setup=copy_model()),
    Case("ev-lm-eval-empty", "evaluate {llama} --lm-eval ,", "task"),
    Case("ev-lm-eval-missing", "evaluate {llama} --lm-eval arc_easy", "lm-eval"),
    # probe
    Case("pr-output-missing", "probe {llama}", "missing option"),
    Case("pr-output-exists", "probe {llama} -o out", "exists", setup=existing_output),
    Case("pr-output-inside-source", "probe m -o m/acts", "m", setup=copy_model()),
    Case("pr-positions-zero", "probe {llama} -o out --positions 0", "probe.positions"),
    Case("pr-batch-negative", "probe {llama} -o out --batch-size -2", "probe.batch_size"),
    Case("pr-n-train-one", "probe {llama} -o out --n-train 1", "data.n_train"),
    Case("pr-prompts-bad", "probe {llama} -o out --set data.harmful=p.csv", "not utf-8", {"p.csv": b"prompt\n\xfe\n"}),
    Case("pr-model-config-only", "probe m -o out --n-train 8 --set data.n_val=4 --set data.n_test=6", "m",
         setup=config_only),
    # models, presets
    Case("models-bad-option", "models --bogus", "no such option"),
    Case("models-prepare-empty", "models --prepare", "requires an argument"),
    Case("presets-extra-argument", "presets basic", "unexpected extra argument"),
    Case("config-preset-unknown", "config -m nope", "unknown preset"),
    Case("config-set-unknown", "config --set excise.lamda=2", "excise.lamda"),
    Case("config-set-nan", "config --set excise.lam=nan", "finite"),
    Case("config-set-no-equals", "config --set excise.lam", "key.path=value"),
    Case("unknown-verb", "obliviate {llama}", "no such command"),
    # analyze
    Case("an-probe-method", "analyze {llama} -o out --probe-method svm", "probe method"),
    Case("an-layer-negative", "analyze {llama} -o out --layer -1", "negative"),
    Case("an-layers-negative", "analyze {llama} -o out --layers -2", "negative"),
    Case("an-patch-layers-negative", "analyze {llama} -o out --patch-layers -1", "negative"),
    Case("an-patch-prompts-zero", "analyze {llama} -o out --patch-prompts 0", "--patch-prompts"),
    Case("an-top-k-zero", "analyze {llama} -o out --top-k 0", "--top-k"),
    Case("an-n-train-one", "analyze {llama} -o out --n-train 1", "data.n_train"),
    Case("an-n-test-zero", "analyze {llama} -o out --n-test 0", "data.n_test"),
    Case("an-preset-unknown", "analyze {llama} -o out -m nope", "unknown preset"),
    Case("an-output-missing", "analyze {llama}", "missing option"),
    Case("an-output-exists", "analyze {llama} -o out", "exists", setup=existing_output),
    Case("an-output-under-file", "analyze {llama} -o f/out", "f", {"f": "x\n"}),
    Case("an-prompts-not-utf8", "analyze {llama} -o out --n-train 8 --n-test 4 --set data.harmful=p.txt",
         "not utf-8", {"p.txt": b"\xc3\x28\n" * 30}),
    Case("an-prompts-few", "analyze {llama} -o out --n-train 8 --n-test 4 --set data.harmful=p.txt",
         "distinct prompts", {"p.txt": "a\nb\nc\n"}),
    Case("an-set-nan", "analyze {llama} -o out --set excise.lam=nan", "finite"),
    Case("an-layer-out-of-range", "analyze {llama} -o out --n-train 8 --n-test 4 --layer 99", "outside"),
    # optimize
    Case("op-trials-zero", "optimize {llama} --trials 0 " + FAST, "n_trials"),
    Case("op-trials-negative", "optimize {llama} --trials -5 " + FAST, "n_trials"),
    Case("op-startup-negative", "optimize {llama} --startup-trials -1 " + FAST, "n_startup_trials"),
    Case("op-target-nan", "optimize {llama} --target nan " + FAST, "target_refusal"),
    Case("op-target-inf", "optimize {llama} --target inf " + FAST, "target_refusal"),
    Case("op-target-above-one", "optimize {llama} --target 2 " + FAST, "target_refusal"),
    Case("op-refusal-tokens-zero", "optimize {llama} --refusal-tokens 0 " + FAST, "refusal_tokens"),
    Case("op-storage-unknown-dialect", "optimize {llama} --storage foo://bar " + FAST, "--storage"),
    Case("op-storage-not-a-url", "optimize {llama} --storage notaurl " + FAST, "--storage"),
    Case("op-storage-missing-folder", "optimize {llama} --storage sqlite:///nope/dir/study.db " + FAST, "does not exist"),
    Case("op-storage-directory", "optimize {llama} --storage sqlite:///d " + FAST, "directory", setup=mkdirs("d")),
    Case("op-storage-password-redacted", "optimize {llama} --storage foo://user:secret@host/db " + FAST, "***"),
    Case("op-preset-unknown", "optimize {llama} -m nope " + FAST, "unknown preset"),
    Case("op-set-study-nan", "optimize {llama} --set optimize.study.kl_rank=nan " + FAST, "kl_rank"),
    Case("op-set-study-unknown", "optimize {llama} --set optimize.study.trials=3 " + FAST, "trials"),
    Case("op-confirm-too-many", "optimize {llama} --set optimize.study.confirm_prompts=100000 " + FAST,
         "confirm_prompts"),
    Case("op-n-val-zero", "optimize {llama} --n-train 8 --n-val 0", "data.n_val"),
    Case("op-prompts-not-utf8", "optimize {llama} --set data.harmful=p.txt " + FAST, "not utf-8",
         {"p.txt": b"\xff\n" * 30}),
    Case("op-output-exists", "optimize {llama} -o out " + FAST, "exists", setup=existing_output),
    Case("op-output-inside-source", "optimize m -o m/out " + FAST, "m", setup=copy_model()),
    Case("op-model-missing", "optimize nope-dir -o out " + FAST, "not found"),
    # judge
    Case("ju-file-missing", "judge missing.csv", "not found"),
    Case("ju-file-txt", "judge f.txt", "unsupported", {"f.txt": "a\n"}),
    Case("ju-file-directory", "judge d.csv", "directory", setup=mkdirs("d.csv")),
    Case("ju-csv-not-utf8", "judge f.csv", "not utf-8", {"f.csv": b"prompt,response\n\xff,x\n"}),
    Case("ju-csv-binary", "judge f.csv", "binary", {"f.csv": b"prompt,response\na,\x00\n"}),
    Case("ju-csv-bom-missing-column", "judge f.csv", "columns: prompt", {"f.csv": BOM + b"prompt\nhello\n"}),
    Case("ju-csv-empty", "judge f.csv", "no rows", {"f.csv": ""}),
    Case("ju-csv-header-only", "judge f.csv", "no rows", {"f.csv": "prompt,response\n"}),
    Case("ju-csv-no-response", "judge f.csv", "no column 'response'", {"f.csv": "prompt,answer\na,b\n"}),
    Case("ju-csv-bad-label", "judge f.csv", "label", {"f.csv": "prompt,response,label\na,b,maybe\n"}),
    Case("ju-csv-missing-label", "judge f.csv", "label", {"f.csv": "prompt,response,label\na,b,1\nc,d,\n"}),
    Case("ju-jsonl-numbers", "judge f.jsonl", "not a json object", {"f.jsonl": "1\n2\n"}),
    Case("ju-jsonl-invalid", "judge f.jsonl", "invalid json", {"f.jsonl": '{"prompt": 1\n'}),
    Case("ju-jsonl-not-utf8", "judge f.jsonl", "not utf-8", {"f.jsonl": b'{"prompt": "\xff", "response": ""}\n'}),
    Case("ju-judge-unknown", "judge f.csv --judge nope", "nope", {"f.csv": GOOD_CSV}),
    Case("ju-option-no-equals", "judge f.csv --option threshold", "key=value", {"f.csv": GOOD_CSV}),
    Case("ju-option-unknown", "judge f.csv --option bogus=1", "bogus", {"f.csv": GOOD_CSV}),
    Case("ju-option-nan", "judge f.csv --judge prefix --option threshold=nan", "threshold", {"f.csv": GOOD_CSV}),
    Case("ju-output-suffix", "judge f.csv -o out.txt", ".csv or .jsonl", {"f.csv": GOOD_CSV}),
    Case("ju-output-is-input", "judge f.csv -o f.csv", "f.csv", {"f.csv": GOOD_CSV}),
    Case("ju-output-under-file", "judge f.csv -o g/out.csv", "g", {"f.csv": GOOD_CSV, "g": "x\n"}),
    Case("ju-output-is-directory", "judge f.csv -o d.csv", "d.csv", {"f.csv": GOOD_CSV}, setup=mkdirs("d.csv")),
    # study
    Case("st-config-missing", "study missing.yaml", "not found"),
    Case("st-config-directory", "study d.yaml", "directory", setup=mkdirs("d.yaml")),
    Case("st-config-not-utf8", "study s.yaml", "not utf-8", {"s.yaml": b"name: \xff\n"}),
    Case("st-config-bad-yaml", "study s.yaml", "invalid yaml", {"s.yaml": "model: [unclosed\n"}),
    Case("st-config-list", "study s.yaml", "invalid study config", {"s.yaml": "- a\n- b\n"}),
    Case("st-config-no-ablations", "study s.yaml", "ablations", {"s.yaml": "model: m\n"}),
    Case("st-config-unknown-field", "study s.yaml", "bogus", {"s.yaml": STUDY.format(model="m") + "bogus: 1\n"}),
    Case("st-config-bad-kind", "study s.yaml", "kind",
         {"s.yaml": "model: m\nablations:\n  - {kind: nope, layers: [0]}\n"}),
    Case("st-settings-nan", "study s.yaml", "finite",
         {"s.yaml": STUDY.format(model="m") + "preset: basic\n"}, env={"OBLITERATUS_EXCISE__LAM": "nan"}),
    Case("st-preset-unknown", "study s.yaml", "unknown preset", {"s.yaml": STUDY.format(model="m") + "preset: nope\n"}),
    Case("st-prompts-not-utf8", "study s.yaml", "not utf-8",
         {"s.yaml": "model: m\nsettings: {data: {harmful: p.txt}}\nablations:\n  - {kind: layer, layers: [0]}\n",
          "p.txt": b"\xff\n"}),
    Case("st-output-exists", "study s.yaml -o out", "exists", {"s.yaml": STUDY.format(model="m")},
         setup=existing_output),
    Case("st-output-under-file", "study s.yaml -o f/out", "f", {"s.yaml": STUDY.format(model="m"), "f": "x\n"}),
    Case("st-model-missing", "study s.yaml -o out", "not found", {"s.yaml": STUDY.format(model="nope-dir")}),
    # report
    Case("bk-no-plan", "bake nope --model {llama} --output out", "no edit plan"),
    Case("bk-not-safetensors", "bake p.safetensors --model {llama} --output out", "not a readable safetensors",
         {"p.safetensors": b"garbage" * 10}),
    Case("bk-not-a-plan", "bake p.safetensors --model {llama} --output out", "not an obliteratus edit plan",
         setup=lambda cwd, fx: shutil.copy(next(Path(fx["llama"]).glob("*.safetensors")), cwd / "p.safetensors")),
    Case("bk-missing-model", "bake plan.safetensors --model nowhere --output out", "not a checkpoint directory",
         setup=a_plan),
    Case("bk-other-model", "bake plan.safetensors --model {gpt2} --output out", "'gpt2' checkpoint", setup=a_plan),
    Case("bk-existing-output", "bake plan.safetensors --model {llama} --output out", "exists",
         setup=lambda cwd, fx: (a_plan(cwd, fx), existing_output(cwd, fx))),
    Case("bk-output-is-source", "bake plan.safetensors --model {llama} --output {llama} --overwrite", "source",
         setup=a_plan),
    Case("bk-hash-mismatch", "bake plan.safetensors --model {llama} --output out", "sha256",
         setup=another_models_plan),
    Case("ob-bake-from-no-output", OB + " --bake-from {llama}", "--output"),
    Case("ob-bake-from-missing", OB + " --bake-from nowhere -o out", "no model.safetensors"),
    Case("ob-quantization-hub-id", "obliterate org/name --quantization nf4 -o out " + FAST,
         "not a local checkpoint directory"),
    Case("ob-quantization-bad", OB + " --quantization nf3", "model.quantization"),
    Case("ob-max-memory-bad", OB + " --set 'model.max_memory={{cpu=\"lots\"}}'", "GiB"),
    Case("ob-offload-dir-alone", OB + " --set model.offload_dir=off", "max_memory too"),
    Case("bk-gguf-garbage", "bake plan.safetensors --model m.gguf --output o.gguf", "not a readable gguf",
         {"m.gguf": b"garbage" * 10}, setup=a_plan),
    Case("bk-gguf-overwrite", "bake plan.safetensors --model m.gguf --output o.gguf --overwrite", "never replaced",
         {"m.gguf": b"garbage" * 10}, setup=a_plan),
    Case("ob-gguf-hf-source", OB + " --gguf o.gguf", "not a .gguf file or an alias"),
    Case("ob-gguf-output-exists", "obliterate m.gguf --gguf o.gguf " + FAST, "exists",
         {"m.gguf": b"garbage" * 10, "o.gguf": "mine"}),
    Case("re-missing", "report nope", "no obliteratus.json"),
    Case("re-no-metadata", "report d", "no obliteratus.json", setup=mkdirs("d")),
    Case("re-file", "report f", "no obliteratus.json", {"f": "x\n"}),
    Case("re-bad-json", "report run", "invalid json", setup=run_dir("{not json")),
    Case("re-not-utf8", "report run", "not utf-8", setup=run_dir(b'{"model": "\xff"}')),
    Case("re-binary", "report run", "binary", setup=run_dir(b"\x00\x00")),
    Case("re-list", "report run", "json object", setup=run_dir("[1, 2]")),
    Case("re-wrong-field-type", "report run", "'model'", setup=run_dir('{"model": "x"}')),
    Case("re-metadata-directory", "report run", "directory",
         setup=lambda cwd, fx: (cwd / "run" / "obliteratus.json").mkdir(parents=True)),
    # chat
    Case("ch-temperature-negative", "chat {llama} --temperature -1", "temperature"),
    Case("ch-temperature-nan", "chat {llama} --temperature nan", "temperature"),
    Case("ch-temperature-inf", "chat {llama} --temperature inf", "temperature"),
    Case("ch-top-p-above-one", "chat {llama} --top-p 5", "top_p"),
    Case("ch-top-p-zero", "chat {llama} --top-p 0", "top_p"),
    Case("ch-max-new-tokens-zero", "chat {llama} --max-new-tokens 0", "max_new_tokens"),
    Case("ch-dtype", "chat {llama} --dtype float8", "dtype"),
    Case("ch-device", "chat {llama} --device tpu", "device"),
    Case("ch-model-missing", "chat nope-dir", "not found"),
    Case("ch-model-config-only", "chat m", "m", setup=config_only),
    # compare
    Case("co-batch-size-zero", "compare {llama} {gpt2} --prompts {H} --batch-size 0", "--batch-size"),
    Case("co-max-new-tokens-zero", "compare {llama} {gpt2} --prompts {H} --max-new-tokens 0", "--max-new-tokens"),
    Case("co-prompts-missing", "compare {llama} {gpt2} --prompts missing.txt", "not found"),
    Case("co-prompts-not-utf8", "compare {llama} {gpt2} --prompts p.txt", "not utf-8", {"p.txt": b"\xff\xfe\n"}),
    Case("co-prompts-jsonl-numbers", "compare {llama} {gpt2} --prompts p.jsonl", "not a json object",
         {"p.jsonl": "1\n2\n"}),
    Case("co-prompts-one", "compare {llama} {gpt2} --prompts p.txt", "only one", {"p.txt": "hi\n"}),
    Case("co-prompts-csv-column", "compare {llama} {gpt2} --prompts p.csv --column nope", "no column 'nope'",
         {"p.csv": "prompt\na\nb\n"}),
    Case("co-judge-unknown", "compare {llama} {gpt2} --prompts {H} --judge nope", "nope"),
    Case("co-option-bad", "compare {llama} {gpt2} --prompts {H} --option x", "key=value"),
    Case("co-dtype", "compare {llama} {gpt2} --prompts {H} --dtype float8", "dtype"),
    Case("co-missing-second-model", "compare {llama} --prompts {H}", "missing argument"),
    # The second model is missing: found out before the first one is loaded and run.
    Case("co-second-model-missing", "compare {llama} nope-dir --prompts {H} --max-new-tokens 4", "not found"),
    # ui: the login and the port are checked before Gradio starts a server
    Case("ui-auth-no-colon", "ui {llama} --auth admin", "USER:PASSWORD"),
    Case("ui-auth-no-password", "ui {llama} --auth admin:", "USER:PASSWORD"),
    Case("ui-port-out-of-range", "ui {llama} --port 70000", "port"),
]


# -- running the table --------------------------------------------------------------------------------

def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> a digest of its bytes ('dir' for a directory)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


@dataclass
class Result:
    code: int | None
    out: str
    err: str
    before: dict[str, str]
    after: dict[str, str]
    sources_changed: list[str]
    seconds: float

    def show(self) -> str:
        return f"exit {self.code} after {self.seconds:.1f}s\n--- stderr ---\n{self.err[-3000:]}\n--- stdout ---\n{self.out[-1500:]}"


def fixtures(root: Path) -> dict[str, str]:
    root.mkdir(parents=True)
    fx = {family: str(save_tiny(root, family)) for family in ("llama", "gpt2", "qwen2")}
    (root / "harmful.txt").write_text(HARMFUL, "utf-8")
    (root / "harmless.txt").write_text(HARMLESS, "utf-8")
    return {**fx, "H": str(root / "harmful.txt"), "S": str(root / "harmless.txt"), "FAST": FAST}


def run_case(case: Case, root: Path, fx: dict[str, str], hashes: dict[str, str], zygotes: Queue | None = None) -> Result:
    cwd = root / case.id
    cwd.mkdir()
    for name, data in case.files.items():
        (cwd / name).write_bytes(data.encode() if isinstance(data, str) else data)
    if case.setup is not None:
        case.setup(cwd, fx)
    before = snapshot(cwd)
    argv = shlex.split(case.argv.format(**fx))
    env = {**os.environ, **ENV, **case.env}
    start = time.monotonic()
    if zygotes is not None:
        zygote = zygotes.get()
        try:
            code, out, err = zygote.run(argv, cwd, env, TIMEOUT)
        finally:
            zygotes.put(zygote)
        if code is None:
            err = f"timed out after {TIMEOUT}s\n{err}"
    else:
        try:
            done = subprocess.run([sys.executable, "-m", "obliteratus.cli", *argv], cwd=cwd, env=env, text=True,
                                  capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as timeout:
            code, out, err = None, str(timeout.stdout or ""), f"timed out after {TIMEOUT}s\n{timeout.stderr or ''}"
    seconds = time.monotonic() - start
    changed = [name for name, path in fx.items() if name in hashes and tree_hash(Path(path)) != hashes[name]]
    return Result(code, out, err, before, snapshot(cwd), changed, seconds)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, request) -> dict[str, Result]:
    """Runs the selected rows (all, or those `-k` keeps), two processes at a time."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and getattr(item, "callspec", None) is not None
                and "case" in item.callspec.params}
    cases = [c for c in CASES if c.id in selected]
    root = tmp_path_factory.mktemp("bad_inputs")
    fx = fixtures(root / "fixtures")
    hashes = {name: tree_hash(Path(fx[name])) for name in ("llama", "gpt2", "qwen2")}
    (root / "cases").mkdir()
    start = time.monotonic()
    zygotes: Queue | None = None
    if hasattr(os, "fork"):
        zygotes = Queue()
        for _ in range(2):
            zygotes.put(Zygote({**os.environ, **ENV}))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip((c.id for c in cases),
                               pool.map(lambda c: run_case(c, root / "cases", fx, hashes, zygotes), cases)))
    finally:
        while zygotes is not None and not zygotes.empty():
            zygotes.get().close()
    print(f"\n{len(cases)} bad inputs in {time.monotonic() - start:.0f}s; slowest: " + ", ".join(
        f"{k} {r.seconds:.1f}s" for k, r in sorted(results.items(), key=lambda kv: -kv[1].seconds)[:5]))
    return results


def test_the_table_is_large_and_covers_every_verb():
    from obliteratus.cli import app

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {shlex.split(c.argv)[0] if c.argv.strip() else "" for c in CASES}
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES), "duplicate row ids"
    assert verbs <= covered, f"verbs without a bad-input row: {sorted(verbs - covered)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_clear_error(campaign, case):
    r = campaign[case.id]
    assert r.code == case.code, r.show()
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.show()
    assert "Traceback" not in r.out + r.err, r.show()
    assert case.needle.lower() in r.err[r.err.index("error:"):].lower(), r.show()
    added = sorted(set(r.after) - set(r.before))
    changed = sorted(k for k in r.before if r.after.get(k) != r.before[k])
    assert not added and not changed, f"added {added}, changed or removed {changed}\n{r.show()}"
    assert not r.sources_changed, f"source models changed: {r.sources_changed}"


@pytest.mark.parametrize("argv", [
    "obliterate M --harmful BAD", "evaluate M --set data.harmful=BAD", "probe M -o out --set data.harmful=BAD",
    "analyze M -o out --set data.harmful=BAD", "optimize M -o out --set data.harmful=BAD",
    "evaluate M --base M --set data.harmless=BAD", "study S", "compare M M --prompts BAD",
])
def test_prompt_files_are_read_before_any_model_loads(tmp_path, monkeypatch, capsys, argv):
    """Every verb reads and splits its prompt files before SUMMON: a bad one fails with no model loaded."""
    import obliteratus.models.load
    from obliteratus.cli import main

    def no_summon(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt files were read")

    for module in [m for name, m in sys.modules.items()  # the pipeline, analysis/analyze.py and the verbs
                   if name.startswith("obliteratus") and getattr(m, "summon", None) is obliteratus.models.load.summon]:
        monkeypatch.setattr(module, "summon", no_summon)
    (tmp_path / "bad.txt").write_bytes(b"\xff\n" * 30)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "s.yaml").write_text("model: m\nsettings: {data: {harmful: bad.txt}}\n"
                                     "ablations:\n  - {kind: layer, layers: [0]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["obliteratus", *argv.replace("BAD", "bad.txt").replace("M", "m")
                                      .replace("S", "s.yaml").split()])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.study").exists()


@pytest.mark.xfail(strict=False, raises=subprocess.TimeoutExpired,
                   reason="a rarer stall is left (docs/journal/2026-12-07-ctrl-c-hang.md): in the full suite at "
                          "55e2cef no trial completed within 120 s of STUDY and SIGINT did not end it in 60 s; "
                          "the SIGINT-inside-a-commit hang is fixed (optimize/interrupts.py)")
def test_ctrl_c_during_the_optimizer_study_is_one_error_line(tmp_path):
    """SIGINT while trials run: exit 130, one `error:` line saying the study can be resumed, no
    traceback (Optuna logs the interrupted trial with one; it is filtered), no output directory. A
    SIGINT inside a storage commit used to leave SQLite's write lock held and hang the exit
    (optimize/interrupts.py now holds it until the call returns)."""
    import signal
    import sqlite3

    src = save_tiny(tmp_path, "llama")
    db = tmp_path / "run.study" / "study.db"
    argv = [sys.executable, "-m", "obliteratus.cli", "optimize", str(src), "-o", str(tmp_path / "run"),
            "--trials", "10000", "--startup-trials", "4", *shlex.split(FAST)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def finished() -> int:
        try:
            with sqlite3.connect(db) as con:
                return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:
            return 0

    while finished() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a 10,000-trial study running behind the test
        proc.communicate()
        raise
    assert proc.returncode == 130, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resume" in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "run").exists()
