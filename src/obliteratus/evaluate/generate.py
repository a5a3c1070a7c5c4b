"""Batched greedy generation and last-position logits, over length-sorted left-padded batches."""

from __future__ import annotations

from typing import Callable

import torch

from ..batching import Encoded


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate(model, tokenizer, encoded: Encoded, max_new_tokens: int = 64, batch_size: int = 32,
             on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and including the first EOS), in input order.
    A batch stops as soon as every sequence in it has ended."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted(stop) or None)
    out: list[list[int]] = [[] for _ in encoded.ids]
    for batch in encoded.batches(batch_size, device):
        seqs = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              generation_config=config)
        new = seqs[:, batch.input_ids.shape[1]:].tolist()
        for row, ids in zip(batch.index, new):
            for j, tok in enumerate(ids):
                if tok in stop:
                    ids = ids[:j + 1]
                    break
            out[row] = ids
        if on_batch:
            on_batch(len(batch.index))
    return out


def decode(tokenizer, continuations: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(continuations, skip_special_tokens=True)


@torch.inference_mode()
def last_logits(model, encoded: Encoded, batch_size: int = 32, share_prefix: bool = False) -> torch.Tensor:
    """Float32 logits at the last prompt position, ``[n, vocab]`` on CPU, in input order.
    Only the last position goes through the lm_head (``logits_to_keep=1``). With `share_prefix`,
    the prompts' common prefix runs once per batch (evaluate/prefix.py)."""
    from .prefix import forward_inputs

    device = next(model.parameters()).device
    rows: dict[int, torch.Tensor] = {}
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        logits = model(**forward_inputs(model, batch), logits_to_keep=1).logits[:, -1].float().cpu()  # [b, vocab]
        rows.update(zip(batch.index, logits))
    return torch.stack([rows[i] for i in range(len(encoded.ids))])
