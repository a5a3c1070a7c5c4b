"""Batched greedy generation and last-position logits, over length-sorted left-padded batches."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from transformers import GenerationConfig

from ..batching import Encoded
from ..shared_prefix import generate_inputs, text_model
from ..models.placement import input_device


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LogprobRecorder:
    """Keeps, for the rows asked for, the log-probs of the first `n_tokens` generated tokens:
    log_softmax of the model's own output logits at each step (a forward hook on the model, so
    before any logits processor), in float32 on CPU. Greedy decoding feeds each step the token
    the previous one chose, so these equal the teacher-forced log-probs of the prompt plus the
    continuation (evaluate/kl.py), up to float rounding, at no extra forward pass."""

    def __init__(self, n_tokens: int, rows: set[int] | None = None):
        self.n_tokens, self.rows = n_tokens, rows
        self.logprobs: dict[int, torch.Tensor] = {}  # row -> [steps, vocab] (cut to the continuation later)

    @contextmanager
    def batch(self, model, index: list[int]) -> Iterator[None]:
        keep = [j for j, row in enumerate(index) if self.rows is None or row in self.rows]
        steps: list[torch.Tensor] = []

        def hook(module, args, output) -> None:
            if keep and len(steps) < self.n_tokens:
                logits = output.logits[keep, -1]  # [k, vocab]
                steps.append(torch.log_softmax(logits.float(), -1).cpu())

        handle = model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        if steps:
            stacked = torch.stack(steps, 1)  # [k, steps, vocab]
            for j, lp in zip(keep, stacked):
                self.logprobs[index[j]] = lp


@torch.inference_mode()
def generate(model, tokenizer, encoded: Encoded, max_new_tokens: int = 64, batch_size: int = 32,
             on_batch: Callable[[int], None] | None = None, share_prefix: bool = False,
             record: LogprobRecorder | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and including the first EOS), in input order.
    A batch stops as soon as every sequence in it has ended. With `share_prefix`, the prompts'
    common prefix runs once per batch (shared_prefix.py: check the model with
    ``can_share_prefix`` first); with `record`, the first tokens' log-probs are kept. A multimodal
    wrapper whose generate wants pixels generates through its language model (shared_prefix.text_model)."""
    model = text_model(model)
    device = input_device(model)
    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted(stop) or None)
    out: list[list[int]] = [[] for _ in encoded.ids]
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        inputs = generate_inputs(model, batch)
        with record.batch(model, batch.index) if record else nullcontext():
            seqs = model.generate(**inputs, generation_config=config)
        new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
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
