"""The every-decoder table of tests/test_coverage.py and tests/test_coverage_pipeline.py (issue 26):
the model types of transformers' causal-LM and image-text-to-text mappings with their marks (the
unsupported ones with why, ``UNSUPPORTED``), the tiny random model of each (``benchmarks/coverage.py``'s
``tiny_config`` and ``reinit``), a text input for it and the outputs of its decoder layers."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch

from conftest import REPO
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.discover import resolve, tiny_inputs


def _load_coverage():
    """benchmarks/coverage.py as a module (its name would clash with the coverage package)."""
    path = REPO / "benchmarks" / "coverage.py"
    spec = importlib.util.spec_from_file_location("obliteratus_benchmark_coverage", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


coverage = _load_coverage()

EXACT = 1e-4
POST_NORM_BOUND = 0.2  # coverage.py measured at most 8.7e-2 on these tiny models
HOOK_GAP = 1e-4

_STREAM = "the residual stream goes through a module (post-LN norm or per-channel residual gate): no exact edit"
_STREAMS = "several residual streams (hyper-connections): needs a writer model for mixed streams"
_ALTUP = "several residual streams (Gemma 3n's AltUp: the hidden state is [4, batch, seq, d])"
_GATE = ("the residual stream itself is scaled per channel by a learned gain (a residual gate) before each add: "
         "no exact edit, and no module whose output is the stream to measure a bound at")
_TABLE = ("a fixed sinusoidal position table adds to the embeddings: a non-persistent buffer (not saved with the "
          "model, recomputed on load), so no saved edit can remove the direction")
_DRAFTER = ("an assistant (drafter) model: its forward takes the target model's embeddings and KV states, not text "
            "(input_ids are ignored)")
_TIMM = "needs the timm library, which needs a torchvision build matching torch (not importable here)"


def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # timm imports torchvision; a CUDA build fails on a CPU torch
        return False
    return True


HAS_TIMM = _timm_importable()
# Without timm these types do not instantiate: skipped, not failed. With it, gemma3n still fails (AltUp)
# and the other two were never measured (timm could not be imported where benchmarks/coverage.py ran).
NEEDS_TIMM = {("causal-lm", "gemma3n"), ("image-text-to-text", "gemma3n"), ("image-text-to-text", "fast_vlm"),
              ("image-text-to-text", "perception_lm")}
_UNMEASURED = "not measured: timm could not be imported where benchmarks/coverage.py ran"
# (mapping, model type) -> why it fails, from benchmarks/coverage.py's run (docs/journal/2026-12-06-coverage.md,
# its addendum). None of these is a tiny-config problem any more: each is the architecture or a
# forward that needs more than text.
UNSUPPORTED: dict[tuple[str, str], str] = {
    # XLNet projects with a bare [d, heads, head_dim] parameter of its attention, residual side first
    ("causal-lm", "xlnet"): _STREAM + " (and its attention's writer is a 3-D parameter, residual axis first)",
    # the stream is scaled per channel: in code (Doge's input_residual * residual), or by a module that takes
    # the branch and the stream as two inputs (Ergo's ErgoResidualGate)
    **{("causal-lm", t): _GATE for t in ("ergo", "doge")},
    ("causal-lm", "dory"): _STREAM,
    # ZAYA scales the residual stream per channel (ZayaResidualScaling) before and inside every layer
    ("causal-lm", "zaya"): _STREAM + " (a per-channel scale and bias on the stream itself)",
    # HRM runs two stacks of layers in H/L cycles, each stack's output normalised (its final_norm)
    ("causal-lm", "hrm_text"): _STREAM + " (recurrent H/L stacks, each output normalised)",
    **{("causal-lm", t): _STREAMS for t in ("deepseek_v4", "hy_v4", "qwen4_exp", "qwen4_exp_text")},
    ("causal-lm", "gemma3n_text"): _ALTUP,
    ("causal-lm", "gemma3n"): _ALTUP if HAS_TIMM else _TIMM,
    **{("causal-lm", t): _DRAFTER for t in ("gemma4_assistant", "gemma4_unified_assistant")},
    **{("causal-lm", t): _TABLE for t in ("ctrl", "xglm")},
    # zero-computation experts return their input (the normed stream): no weight writes what they add
    ("causal-lm", "longcat_flash"): "identity experts copy the normed residual stream into it: nothing to edit",
    # discovery falls back to the byte patcher (an entropy model inside BLT), not the decoder to edit
    ("causal-lm", "blt"): "the tiny model's forward fails on a text-only input; the module found is BLT's byte "
                          "patcher, not its decoder",
    ("image-text-to-text", "evolla"): "no image-text-to-text class for its config",
    ("image-text-to-text", "idefics"): "the forward needs perceiver inputs (pixel_values or image embeddings)",
    **{("image-text-to-text", t): "the forward needs robot state and a cache (pi0 / pi05 are action models)"
       for t in ("pi0", "pi05")},
    # a diffusion decoder: layer 0's input is its self-conditioning module's output, not the embeddings
    ("image-text-to-text", "diffusion_gemma"): "the embeddings reach layer 0 through a self-conditioning module "
                                               "(a diffusion decoder)",
    **{("image-text-to-text", t): _TABLE for t in ("kosmos-2", "kosmos-2.5")},
    **{("image-text-to-text", t): _STREAMS for t in ("glm5_next", "hy_v4_vl", "qwen4_exp")},
    ("image-text-to-text", "gemma3n"): _ALTUP if HAS_TIMM else _TIMM,
    **{("image-text-to-text", t): _UNMEASURED if HAS_TIMM else _TIMM for t in ("fast_vlm", "perception_lm")},
    ("image-text-to-text", "muse_spark"): _STREAM,
}

# the settings of tests/test_coverage_pipeline.py's obliterate(loaded, "basic") on every type
SMALL = {"data": {"n_train": 8, "n_val": 2, "n_test": 2},
         "evaluate": {"max_new_tokens": 2, "kl_tokens": 1, "perplexity": False},
         # a random model has no refusal direction to pass Arditi's filters: open them; with 2 layers
         # and no pruning the later layers are candidates too (layer 0 sees only the embeddings)
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9, "prune_fraction": 0.0}}


def _types() -> list:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    out = []
    for mapping, names in (("causal-lm", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                           ("image-text-to-text", MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)):
        for model_type in sorted(names):
            why = UNSUPPORTED.get((mapping, model_type))
            if (mapping, model_type) in NEEDS_TIMM and not HAS_TIMM:
                marks = [pytest.mark.skip(reason=why)]
            else:  # (an unmeasured row may pass: not strict)
                marks = [pytest.mark.xfail(reason=why, strict=why != _UNMEASURED)] if why else []
            out.append(pytest.param(mapping, model_type, marks=marks, id=f"{mapping}/{model_type}"))
    return out


def tiny(mapping: str, model_type: str) -> torch.nn.Module:
    """A tiny random model of `model_type` (skips encoder-decoder and encoder-only types)."""
    import transformers as tf

    config = coverage.tiny_config(model_type)
    if getattr(config, "is_encoder_decoder", False) or \
            getattr(getattr(config, "text_config", None), "is_encoder_decoder", False):
        pytest.skip("encoder-decoder")
    if coverage.encoder_only(model_type):
        pytest.skip("encoder-only (it has a masked-LM head)")
    auto = tf.AutoModelForCausalLM if mapping == "causal-lm" else tf.AutoModelForImageTextToText
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config)
    return coverage.reinit(model.float(), 0).eval().requires_grad_(False)


def _inputs(adapter: ArchitectureAdapter) -> tuple[torch.nn.Module, dict]:
    """The module whose forward takes text (a wrapper that wants pixels: its language model) and a
    tiny text input for it."""
    root = adapter.model if adapter.discovery is None else resolve(adapter.model, adapter.discovery.root)
    vocab = adapter.embeddings[0].weight.shape[0]
    return root, tiny_inputs(root, vocab, seed=1)


def _layer_outputs(adapter: ArchitectureAdapter, root, inputs) -> list[torch.Tensor]:
    outs: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(m, a, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            outs.setdefault(i, t.detach().clone())
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(adapter.layers)]
    try:
        with torch.no_grad():
            root(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in sorted(outs)]


def _logits(root, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = root(**inputs)
    assert hasattr(out, "logits"), f"{type(root).__name__} is not a causal LM: its forward returns no logits"
    return out.logits.double()
