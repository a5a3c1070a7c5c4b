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
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch

from .batching import Batch, Encoded


def cache_keyword(fn) -> str:
    """The name transformers gives the KV cache argument of `fn` (``cache`` in recent versions,
    ``past_key_values`` before)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def prefix_cache(model, batch: Batch):
    """The KV cache of ``batch.prefix``, repeated for every row of `batch`."""
    device = batch.input_ids.device
    out = model(input_ids=torch.tensor([batch.prefix], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)  # transformers >= 5.x; reading past_key_values there only warns
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(model).__name__} returned no repeatable KV cache for the shared prefix")
    cache.batch_repeat_interleave(batch.input_ids.shape[0])
    return cache


def forward_inputs(model, batch: Batch, runner=None) -> dict:
    """Keyword arguments of a forward pass over `batch` (with the prefix cache when it has one).
    `runner` is the module those arguments are for when it is not `model` itself (PROBE runs the
    decoder body; the prefix cache is still made by `model`)."""
    if not batch.prefix:
        return {**batch.inputs(), "use_cache": False}
    return {"input_ids": batch.input_ids, "attention_mask": batch.full_mask, "position_ids": batch.position_ids,
            cache_keyword((runner or model).forward): prefix_cache(model, batch), "use_cache": True}


def generate_inputs(model, batch: Batch) -> dict:
    """Keyword arguments of ``model.generate`` over `batch`: the full ids (prefix included, as
    generate expects) and the prefix cache, which generate skips over."""
    if not batch.prefix:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    rows = batch.input_ids.shape[0]
    head = torch.tensor([batch.prefix], device=batch.input_ids.device).expand(rows, -1)
    return {"input_ids": torch.cat([head, batch.input_ids], 1), "attention_mask": batch.full_mask,
            cache_keyword(model.forward): prefix_cache(model, batch)}


_AGREES: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


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


def can_share_prefix(model, encoded: Encoded, tol: float = 1e-3, new_tokens: int | None = None) -> bool:
    """Whether `encoded`'s prompts can be run with their common prefix shared: they have one, and
    this model gives the same last-position log-probs (within `tol`) with the prefix cache as in a
    plain left-padded batch. Gemma 2 and Gemma 3 build a different attention mask when a cache is
    followed by padding, so for them it is False (with a warning). The model is checked once, on
    the two longest and two shortest prompts (padding between prefix and rest is what differs).

    Sliding-window attention counts cache slots, and the shared layout puts the padding inside them
    (prefix, padding, rest): once a sequence is longer than the window, a token's window holds
    padding instead of prefix tokens and the results differ. So with a window the answer is False
    unless every sequence fits: the longest prompt plus `new_tokens` (the tokens the caller appends:
    generated or teacher-forced; None = unknown, then any window rules sharing out). This part
    depends on the prompts and is decided on every call; only the model check above is cached."""
    if not encoded.common_prefix():
        return False
    window = sliding_window(model)
    if window is not None and (new_tokens is None or max(len(r) for r in encoded.ids) + new_tokens > window):
        return False
    if model not in _AGREES:
        order = encoded.order
        rows = sorted(set(order[:2] + order[-2:]))
        probe = encoded.subset(rows)
        plain = torch.log_softmax(last_logits(model, probe, len(rows)).double(), -1)
        shared = torch.log_softmax(last_logits(model, probe, len(rows), share_prefix=True).double(), -1)
        gap = float((shared - plain).abs().max())
        if gap > tol:
            warnings.warn(f"{type(model).__name__}: shared-prefix logits differ from plain batches by {gap:.3g} "
                          "(log-prob); running every prompt in full", stacklevel=2)
        _AGREES[model] = gap <= tol
    return _AGREES[model]


@torch.inference_mode()
def last_logits(model, encoded: Encoded, batch_size: int = 32, share_prefix: bool = False) -> torch.Tensor:
    """Float32 logits at the last prompt position, ``[n, vocab]`` on CPU, in input order.
    Only the last position goes through the lm_head (``logits_to_keep=1``). With `share_prefix`,
    the prompts' common prefix runs once per batch (shared_prefix.py)."""
    device = next(model.parameters()).device
    rows: dict[int, torch.Tensor] = {}
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        logits = model(**forward_inputs(model, batch), logits_to_keep=1).logits[:, -1].float().cpu()  # [b, vocab]
        rows.update(zip(batch.index, logits))
    return torch.stack([rows[i] for i in range(len(encoded.ids))])
