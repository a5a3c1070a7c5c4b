"""Run a prefix that every prompt shares once per batch instead of once per prompt.

Templated prompts all start with the same system turn (about 25 of the demo model's ~45 tokens
per prompt). Its keys and values are the same for every row, so a batch can be run as

    cache = model(prefix)            one row, p tokens
    cache repeated to b rows         (DynamicCache.batch_repeat_interleave)
    model(rest, cache)               b rows, t − p tokens each, padding between prefix and rest

with position ids continuing after the prefix and the attention mask covering prefix and rest
(batching.Batch.full_mask / position_ids). Every real token sees the same keys and values at the
same positions as in the unshared left-padded batch, so logits and greedy continuations agree up
to float rounding (tests/test_shared_prefix.py). The prefix is recomputed for each batch under whatever
hooks are attached, so an edit that changes the prefix's activations is scored correctly.

Some models cannot share it, and :func:`can_share_prefix` says no for them (once per model, with the
reason logged and kept: :func:`sharing_obstacle`), decided from what the model is where it can be:

* a recurrent state in the cache (Mamba, linear attention, short convolutions: Granite 4, Qwen3-Next,
  LFM2, Falcon-H1, ...): the state sums up every token it has seen, so the padding between prefix
  and rest would run through it, and transformers cannot repeat it for every row either;
* 3-D multimodal RoPE positions (Qwen2-VL and its descendants, GLM-4V, ...): the model keeps the
  position offsets of its last call (``rope_deltas``) and generation reads them back whenever a
  cache is passed in, so a cache made for another batch gives positions of the wrong shape;
* no cache in the output, or one without ``batch_repeat_interleave``.

Every forward pass here goes through :func:`text_model`: a multimodal wrapper whose forward wants
pixels (BLIP-2, InstructBLIP) runs text through the causal LM inside it.
"""

from __future__ import annotations

import inspect
import logging
import warnings
import weakref

import torch
from torch import nn

from .batching import Batch, Encoded
from .models.placement import input_device


logger = logging.getLogger(__name__)

_TEXT_MODELS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _needs_more_than_text(module: nn.Module) -> bool:
    """Whether `module`'s forward has a required argument other than the token ids (pixel_values)."""
    params = inspect.signature(module.forward).parameters.values()
    return any(p.default is inspect.Parameter.empty and p.name != "input_ids"
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


def text_model(model: nn.Module) -> nn.Module:
    """The module to run text through and generate from: `model` itself, unless its forward needs
    more than token ids (BLIP-2 and InstructBLIP want ``pixel_values``, and so does their
    ``generate``); then the outermost causal LM inside it (a submodule that generates and has its
    own lm_head: their ``language_model``), which holds the decoder the edit changes. Cached per model."""
    if not isinstance(model, nn.Module):  # a stand-in callable (tests)
        return model
    if model not in _TEXT_MODELS:
        inner = model
        if _needs_more_than_text(model):
            inner = next((m for name, m in model.named_modules() if name and hasattr(m, "generate")
                          and callable(getattr(m, "get_output_embeddings", None))
                          and isinstance(m.get_output_embeddings(), nn.Module) and not _needs_more_than_text(m)), model)
        _TEXT_MODELS[model] = inner
    return _TEXT_MODELS[model]


def cache_keyword(fn) -> str:
    """The name transformers gives the KV cache argument of `fn` (``cache`` in recent versions,
    ``past_key_values`` before)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


# where a cache (or a layer of it) keeps a recurrent state: transformers >= 5's linear-attention layers
# (conv_states, recurrent_states), and the Mamba / hybrid cache classes before them (conv_states, ssm_states)
RECURRENT_STATE = ("conv_states", "recurrent_states", "ssm_states")


def cache_obstacle(cache) -> str | None:
    """Why `cache` (a model's output cache after the prefix) cannot be shared by every row of a
    batch; None when it can: a KV cache with ``batch_repeat_interleave`` and no recurrent state."""
    if cache is None:
        return "its forward returns no cache"
    if not hasattr(cache, "batch_repeat_interleave"):
        return f"its cache ({type(cache).__name__}) cannot be repeated for every row (no batch_repeat_interleave)"
    state = next((type(part).__name__ for part in (cache, *getattr(cache, "layers", ()))
                  if any(hasattr(part, name) for name in RECURRENT_STATE)), None)
    if state is not None:
        return (f"its cache holds a recurrent state ({state}: Mamba, linear attention or short convolutions), which "
                "would run over the padding between the shared prefix and each prompt")
    return None


def returned_cache(out):
    """The KV cache a forward pass with ``use_cache=True`` returned in `out` (None when it returned none)."""
    cache = getattr(out, "cache", None)  # transformers >= 5.x; reading past_key_values there only warns
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _output_cache(model, prefix: list[int], device):
    """The cache `model` returns for the one-row input `prefix` (None when it returns none)."""
    return returned_cache(model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1))


def prefix_cache(model, batch: Batch):
    """The KV cache of ``batch.prefix``, repeated for every row of `batch`."""
    model = text_model(model)
    cache = _output_cache(model, batch.prefix, batch.input_ids.device)
    why = cache_obstacle(cache)
    if why is not None:
        raise TypeError(f"{type(model).__name__} cannot share the prompts' prefix: {why}")
    cache.batch_repeat_interleave(batch.input_ids.shape[0])
    return cache


def forward_inputs(model, batch: Batch, runner=None) -> dict:
    """Keyword arguments of a forward pass over `batch` (with the prefix cache when it has one).
    `runner` is the module those arguments are for when it is not `model` itself (PROBE runs the
    decoder body; the prefix cache is still made by `model`)."""
    if not batch.prefix:
        return {**batch.inputs(), "use_cache": False}
    model = text_model(model)
    return {"input_ids": batch.input_ids, "attention_mask": batch.full_mask, "position_ids": batch.position_ids,
            cache_keyword((runner or model).forward): prefix_cache(model, batch), "use_cache": True}


def generate_inputs(model, batch: Batch) -> dict:
    """Keyword arguments of ``model.generate`` over `batch`: the full ids (prefix included, as
    generate expects) and the prefix cache, which generate skips over."""
    if not batch.prefix:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    model = text_model(model)
    rows = batch.input_ids.shape[0]
    head = torch.tensor([batch.prefix], device=batch.input_ids.device).expand(rows, -1)
    return {"input_ids": torch.cat([head, batch.input_ids], 1), "attention_mask": batch.full_mask,
            cache_keyword(model.forward): prefix_cache(model, batch)}


# model -> why its prompts cannot share a prefix (None: they can); decided once per model
_OBSTACLES: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def sliding_window(model) -> int | None:
    """The attention window of the model's sliding-window layers (None when no layer has one).
    transformers marks them in ``config.layer_types`` ("sliding_attention"), or with
    ``use_sliding_window``; Mistral just sets ``sliding_window``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and not any("sliding" in str(t) for t in types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window if isinstance(window, int) and window > 0 else None


def three_d_positions(model) -> bool:
    """Whether `model` uses multimodal RoPE with 3-D (time, height, width) positions: a module of it
    computes them (``get_rope_index``: Qwen2-VL and its descendants, GLM-4V, PaddleOCR-VL, ...) and
    keeps their offsets for the next call (``rope_deltas``). That bookkeeping is what breaks
    generation from a shared cache; an ``mrope_section`` in the config is not asked (a config may
    carry one that its text model never reads: benchmarks/coverage.py's tiny configs do)."""
    return any(callable(getattr(m, "get_rope_index", None)) for m in model.modules())


def _model_obstacle(model, encoded: Encoded, tol: float) -> str | None:
    """Why `model` cannot share a prefix (module docstring); None when it gives the same
    last-position log-probs (within `tol`) with the prefix cache as in plain left-padded batches,
    measured on the two longest and two shortest prompts of `encoded`."""
    if three_d_positions(model):
        return ("it uses 3-D multimodal RoPE positions: generation reads back the position offsets (rope_deltas) of "
                "the model's previous call whenever a cache is passed in")
    order = encoded.order
    rows = sorted(set(order[:2] + order[-2:]))
    probe = encoded.subset(rows)
    with torch.inference_mode():
        why = cache_obstacle(_output_cache(model, probe.common_prefix(), input_device(model)))
    if why is not None:
        return why
    plain = torch.log_softmax(last_logits(model, probe, len(rows)).double(), -1)
    shared = torch.log_softmax(last_logits(model, probe, len(rows), share_prefix=True).double(), -1)
    gap = float((shared - plain).abs().max())
    if gap > tol:
        warnings.warn(f"{type(model).__name__}: shared-prefix logits differ from plain batches by {gap:.3g} "
                      "(log-prob); running every prompt in full", stacklevel=3)
        return f"its shared-prefix logits differ from plain batches by {gap:.3g} (log-prob)"
    return None


def sharing_obstacle(model) -> str | None:
    """Why :func:`can_share_prefix` said no for `model` (None: it has not, or has not been asked)."""
    return _OBSTACLES.get(text_model(model))


def can_share_prefix(model, encoded: Encoded, tol: float = 1e-3, new_tokens: int | None = None) -> bool:
    """Whether `encoded`'s prompts can be run with their common prefix shared: they have one, and
    this model gives the same last-position log-probs (within `tol`) with the prefix cache as in a
    plain left-padded batch. Gemma 2 and Gemma 3 build a different attention mask when a cache is
    followed by padding, so for them it is False (with a warning). Models whose cache holds a
    recurrent state, or that use 3-D multimodal positions, cannot share it at all (module
    docstring): False, from those properties, before any shared pass runs. The model is checked
    once (the answer and its reason are kept: :func:`sharing_obstacle`), on the two longest and
    two shortest prompts (padding between prefix and rest is what differs).

    Sliding-window attention counts cache slots, and the shared layout puts the padding inside them
    (prefix, padding, rest): once a sequence is longer than the window, a token's window holds
    padding instead of prefix tokens and the results differ. So with a window the answer is False
    unless every sequence fits: the longest prompt plus `new_tokens` (the tokens the caller appends:
    generated or teacher-forced; None = unknown, then any window rules sharing out). This part
    depends on the prompts and is decided on every call; only the model check above is cached."""
    if not encoded.common_prefix():
        return False
    model = text_model(model)
    window = sliding_window(model)
    if window is not None and (new_tokens is None or max(len(r) for r in encoded.ids) + new_tokens > window):
        return False
    if model not in _OBSTACLES:
        why = _model_obstacle(model, encoded, tol)
        if why is not None:
            logger.info("%s: running every prompt in full, without a shared template prefix: %s", type(model).__name__,
                        why)
        _OBSTACLES[model] = why
    return _OBSTACLES[model] is None


@torch.inference_mode()
def last_logits(model, encoded: Encoded, batch_size: int = 32, share_prefix: bool = False) -> torch.Tensor:
    """Float32 logits at the last prompt position, ``[n, vocab]`` on CPU, in input order.
    Only the last position goes through the lm_head (``logits_to_keep=1``). With `share_prefix`,
    the prompts' common prefix runs once per batch (shared_prefix.py)."""
    model = text_model(model)
    device = input_device(model)
    rows: dict[int, torch.Tensor] = {}
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        logits = model(**forward_inputs(model, batch), logits_to_keep=1).logits[:, -1].float().cpu()  # [b, vocab]
        rows.update(zip(batch.index, logits))
    return torch.stack([rows[i] for i in range(len(encoded.ids))])
