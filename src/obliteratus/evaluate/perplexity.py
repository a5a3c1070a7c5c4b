"""Perplexity on held-out text: exp(mean next-token NLL), padding excluded.

The text is tokenized once and cut into windows of `window` tokens; each window is scored on its
own (no overlap), batched, and every real token after the first of its window counts once."""

from __future__ import annotations

import math

import torch
from ..models.placement import input_device


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 256, batch_size: int = 8) -> float:
    device = input_device(model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise ValueError("perplexity text is shorter than two tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        rows = chunks[start:start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):  # right padding: the pad tail is masked out of the loss
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()  # [b, t, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
        )  # [b, t-1]
        keep = mask[:, 1:].bool()
        total_nll += float(nll[keep].sum())
        total_tokens += int(keep.sum())
    mean = total_nll / total_tokens
    return math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a float past 709.78; VERIFY refuses inf
