"""Shared fixtures: tiny random causal LMs of every supported family and a byte-level tokenizer.

Nothing here downloads or loads a real checkpoint; every model is built from a config in code
(3 layers, d = 32) and runs in milliseconds on a CPU.
"""

from __future__ import annotations

import os

# The suite checks float32 math on the CPU with tight tolerances, and a GPU would turn "auto" into
# CUDA and bfloat16 (models/load.py): hide GPUs from it, and from the subprocesses it starts, so
# that `make test` on a GPU machine runs what CI runs. OBLITERATUS_TEST_CUDA=1 leaves them visible
# for tests/test_cuda.py, the tests written for a GPU.
if os.environ.get("OBLITERATUS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# The capability check (evaluate/capability.py: ~1200 scored sequences) costs seconds on a tiny model,
# and the suite runs the pipeline hundreds of times: off unless a test asks for it (the tests of the
# check itself, tests/test_driver.py, tests/test_benchmarks.py's frontier). Subprocesses inherit it.
os.environ.setdefault("OBLITERATUS_EVALUATE__CAPABILITY", "0")

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny matmuls gain nothing from threads, and with another job on the CPUs a thread pool makes
# every forward pass ~100x slower (spin-waiting); one thread keeps the suite fast and stable.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]  # the repository root, whatever folder of tests/ a test file is in

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox")


def family_params(*only: str) -> list:
    """FAMILIES (or just `only`) as pytest params."""
    return [f for f in FAMILIES if not only or f in only]


VOCAB = 300  # > the tokenizer's 259 ids
PAD, EOS, BOS = 256, 257, 258  # ids of the tokenizer's special tokens (after the 256 byte symbols)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
_DECODER = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=256, **_COMMON,
)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, head_dim=8, **_DECODER)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, head_dim=8, sliding_window=None, **_DECODER)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **_DECODER)
    if family == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **_DECODER)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **_DECODER)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=64, **_DECODER)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=64, **_DECODER)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **_DECODER)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=256, **_COMMON)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**_DECODER)
    raise ValueError(family)


def reinit(model: nn.Module, seed: int = 0, std: float = 0.2, bias_std: float = 0.1) -> nn.Module:
    """HF's 0.02 init makes a tiny model's outputs nearly constant; use a larger scale, and make
    every bias non-zero so the bias handling of the edits is exercised."""
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(torch.randn(bias.shape, generator=gen) * bias_std)
    return model


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny random float32 causal LM of `family` (a model_type), in eval mode, without grads."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(family)
    if family == "gemma3_text":
        model = tf.Gemma3ForCausalLM(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == family
    model = reinit(model.float(), seed)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def tiny_tokenizer():
    """Byte-level tokenizer (256 byte symbols, no merges) + <pad>, <eos>, <bos>, left padding, chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    assert (fast.pad_token_id, fast.eos_token_id, fast.bos_token_id) == (PAD, EOS, BOS)
    return fast


def save_tiny(tmp_path: Path, family: str, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer under tmp_path/family and return the directory."""
    out = Path(tmp_path) / family
    tiny_model(family, seed).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def merge(*parts: dict) -> dict:
    """Nested settings overrides merged left to right (a later part's leaves win)."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def chromium() -> str | None:
    """The first headless-capable Chromium on PATH, or None."""
    import shutil

    names = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
    return next((b for b in names if shutil.which(b)), None)


def chromium_dom(page: Path) -> str:
    """`page` opened in headless Chromium: its DOM after loading. Skips the calling test where no
    Chromium is installed (.ci/run installs chromium-headless-shell); fails on a JavaScript error."""
    import subprocess

    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium installed (.ci/run installs chromium-headless-shell)")
    done = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not console_errors, console_errors
    return done.stdout


def params_digest(model: nn.Module) -> str:
    """A hash over every parameter and buffer (names and bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def random_unit(d: int, k: int = 1, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """[k, d] orthonormal rows."""
    from obliteratus.directions import orthonormalize

    gen = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(k, d, generator=gen, dtype=torch.float64)).to(dtype)


PROMPTS = [
    "Hi",
    "How do I bake bread?",
    "Tell me a long story about a dragon who lived in the mountains and collected shiny stones.",
    "What is 2 + 2?",
    "Write a poem.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """A tiny random Mixtral (support/moe.py) with 5 layers and the tokenizer, saved once per test module."""
    import transformers as tf

    from support.moe import moe_config

    config = moe_config("mixtral")
    config.num_hidden_layers = 5  # enough layers for every layer method's pruning
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float()
    out = tmp_path_factory.mktemp("moe") / "mixtral"
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
