"""Refusal counting that stops generating as soon as the judge has decided.

The marker judge (:mod:`obliteratus.evaluate.judges.markers`) reads the response's normalised text and
calls it a refusal when a marker phrase occurs in it. Once a marker has appeared, more tokens
cannot undo that verdict, and after `tokens` tokens without one the verdict is "answered" (the
same budget a full generation of `tokens` tokens would give). So for each sequence of a batch

    decided_t  =  marker in normalise(decode(y_1..y_t))   or   y_t = EOS   or   t = tokens

and the batch stops at the first step where every sequence is decided (transformers'
per-sequence ``StoppingCriteria``: a decided row only receives padding afterwards). The verdict
is the judge applied to the text generated so far, so it equals the judge on a full greedy
generation of `tokens` tokens whenever a marker, once present, stays present (appending text
never removes a phrase). Compared with generating every response to full length, a refusing
sequence costs only the tokens up to its marker, and a batch of refusals ends after a handful of
steps (Heretic's refusal counting generates a fixed number of tokens for every prompt).

A caller may also stop a whole batch part-way (`abandon`): after every generated token it is told
how many rows of the batch have already shown a marker. Those rows are refusals whatever comes
next, so the count is a lower bound of the batch's final count; the optimizer's pruner gives up on
a trial the moment that bound rules it out, usually a few tokens into the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..batching import Encoded
from ..shared_prefix import generate_inputs
from .judges import markers
from .generate import eos_ids


@dataclass
class EarlyVerdicts:
    """Per prompt (input order): refused or not, and how many tokens were generated for it."""

    refused: list[bool]
    tokens: list[int]

    @property
    def count(self) -> int:
        return sum(self.refused)


class Abandoned(Exception):
    """Raised out of generation when `abandon` said so: `refused` rows of the batch had shown a
    marker after `tokens` tokens in all. :func:`judge_batches` fills in `rows`, the indices (into
    the encoded prompts) of those rows."""

    def __init__(self, refused: int, tokens: int):
        super().__init__(f"abandoned with {refused} refusals in the batch")
        self.refused, self.tokens = refused, tokens
        self.rows: list[int] = []


def _criterion(tokenizer, prompt_width: int, stop: set[int], rows: int,
               abandon: Callable[[int], bool] | None = None):
    """A transformers StoppingCriteria that marks a row decided once its text contains a marker or
    it ended with EOS (the token budget is max_new_tokens), and records ``ends[row]``: the number
    of new tokens at the step it was decided (None while undecided). With `abandon`, raises
    :class:`Abandoned` as soon as ``abandon(rows with a marker)`` is true."""
    class MarkerSeen(StoppingCriteria):
        def __init__(self):
            self.ends: list[int | None] = [None] * rows
            self.hit = [False] * rows  # the row's text contains a marker

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            new = input_ids[:, prompt_width:].tolist()  # [b, t]
            for i, row in enumerate(new):
                if self.ends[i] is not None:
                    continue
                text = markers.normalise(tokenizer.decode(row, skip_special_tokens=True))
                if any(m in text for m in markers.MARKERS):
                    self.ends[i] = len(row)
                    self.hit[i] = True
                elif row and row[-1] in stop:
                    self.ends[i] = len(row)
            marked = sum(self.hit)
            if abandon is not None and marked and abandon(marked):
                raise Abandoned(marked, sum(len(row) if e is None else e for row, e in zip(new, self.ends)))
            return torch.tensor([e is not None for e in self.ends], dtype=torch.bool, device=input_ids.device)

    return MarkerSeen()


@torch.inference_mode()
def judge_batches(model, tokenizer, encoded: Encoded, tokens: int = 32, batch_size: int = 32,
                  abandon: Callable[[int], bool] | None = None,
                  share_prefix: bool = False) -> Iterator[tuple[list[int], list[bool], list[int]]]:
    """For each batch (in `encoded`'s length-sorted order): (row indices, refused, tokens generated).
    A generator, so a caller can stop after any batch; `abandon(marked rows in this batch)` is
    asked after every token and raises :class:`Abandoned` out of it when true. With
    `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py)."""
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted(stop) or None)
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        inputs = generate_inputs(model, batch)
        width = inputs["input_ids"].shape[1]
        seen = _criterion(tokenizer, width, stop, len(batch.index), abandon)
        try:
            seqs = model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([seen]))
        except Abandoned as stop:
            stop.rows = [i for i, hit in zip(batch.index, seen.hit) if hit]
            raise
        refused, used = [], []
        for row, end in zip(seqs[:, width:].tolist(), seen.ends):
            row = row if end is None else row[:end]  # a decided row only gets padding afterwards
            refused.append(markers.is_refusal(tokenizer.decode(row, skip_special_tokens=True)))
            used.append(len(row))
        yield batch.index, refused, used


def judge(model, tokenizer, encoded: Encoded, tokens: int = 32, batch_size: int = 32,
          on_batch: Callable[[int], None] | None = None, share_prefix: bool = False) -> EarlyVerdicts:
    """Refusal verdict for every prompt of `encoded` (input order), stopping early as described above.
    With `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py)."""
    refused = [False] * len(encoded.ids)
    used = [0] * len(encoded.ids)
    for index, r, u in judge_batches(model, tokenizer, encoded, tokens, batch_size, share_prefix=share_prefix):
        for i, ri, ui in zip(index, r, u):
            refused[i], used[i] = ri, ui
        if on_batch:
            on_batch(len(index))
    return EarlyVerdicts(refused, used)
