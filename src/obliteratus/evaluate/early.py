"""Refusal counting that stops generating as soon as the judge has decided.

The marker judge (:mod:`obliteratus.evaluate.judges.markers`) reads the normalised text of the
response's answer and calls it a refusal when a marker phrase occurs in it. Once a marker has
appeared, more tokens cannot undo that verdict, and after `tokens` tokens without one the verdict
is "answered" (the same budget a full generation of `tokens` tokens would give). So for each
sequence of a batch

    decided_t  =  marker in normalise(answer(decode(y_1..y_t)))   or   y_t = EOS   or   t = tokens

and the batch stops at the first step where every sequence is decided (transformers'
per-sequence ``StoppingCriteria``: a decided row only receives padding afterwards). The verdict
is the judge applied to the text generated so far, so it equals the judge on a full greedy
generation of `tokens` tokens whenever a marker, once present, stays present (appending text
never removes a phrase). Compared with generating every response to full length, a refusing
sequence costs only the tokens up to its marker, and a batch of refusals ends after a handful of
steps (Heretic's refusal counting generates a fixed number of tokens for every prompt).

answer() leaves out a thinking model's reasoning block (judges/reasoning.py), so a marker the
model only weighs while reasoning neither decides nor stops a row. Whether a row starts inside a
reasoning block is read off its prompt (a template that ends with ``<think>``), so the answer of the
text so far only grows as tokens come (an opening tag hides what follows it, never what came
before) and a decided row stays decided. A row still inside its reasoning when the budget runs out
has no answer yet: it counts as not refused, as with ``Judge.__call__``, and a warning says so (the
verdict then means nothing: raise the budget or turn reasoning off, docs/thinking.md).

A caller may also stop a whole batch part-way (`abandon`): after every generated token it is told
how many rows of the batch have already shown a marker. Those rows are refusals whatever comes
next, so the count is a lower bound of the batch's final count; the optimizer's pruner gives up on
a trial the moment that bound rules it out, usually a few tokens into the first batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..batching import Encoded
from ..shared_prefix import generate_inputs, text_model
from .judges import markers
from .judges.reasoning import opens_reasoning, split_reasoning
from .generate import eos_ids
from ..models.placement import input_device

_TAIL = 32  # prompt tokens decoded to see whether the prompt ends inside a reasoning block


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


def opened(tokenizer, encoded: Encoded) -> list[bool]:
    """Per prompt (input order): whether it ends inside a reasoning block (judges/reasoning.py
    ``opens_reasoning`` of its last tokens' text), so that its response starts inside it."""
    return [opens_reasoning(tokenizer.decode(ids[-_TAIL:])) for ids in encoded.ids]


def _criterion(tokenizer, prompt_width: int, stop: set[int], rows: int,
               abandon: Callable[[int], bool] | None = None, opened: list[bool] | None = None):
    """A transformers StoppingCriteria that marks a row decided once its answer contains a marker or
    it ended with EOS (the token budget is max_new_tokens), and records ``ends[row]``: the number
    of new tokens at the step it was decided (None while undecided). `opened[row]`: the row's
    prompt ends inside a reasoning block. With `abandon`, raises :class:`Abandoned` as soon as
    ``abandon(rows with a marker)`` is true."""
    opened = opened or [False] * rows

    class MarkerSeen(StoppingCriteria):
        def __init__(self):
            self.ends: list[int | None] = [None] * rows
            self.hit = [False] * rows  # the row's text contains a marker

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            new = input_ids[:, prompt_width:].tolist()  # [b, t]
            for i, row in enumerate(new):
                if self.ends[i] is not None:
                    continue
                answer = split_reasoning(tokenizer.decode(row, skip_special_tokens=True), opened[i]).answer
                text = markers.normalise(answer)
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
    `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py). A wrapper
    whose generate wants pixels generates through its language model (shared_prefix.text_model)."""
    model = text_model(model)
    device = input_device(model)
    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted(stop) or None)
    prefix = encoded.common_prefix() if share_prefix else None
    starts = opened(tokenizer, encoded)
    for batch in encoded.batches(batch_size, device, prefix=prefix):
        inputs = generate_inputs(model, batch)
        width = inputs["input_ids"].shape[1]
        inside = [starts[i] for i in batch.index]
        seen = _criterion(tokenizer, width, stop, len(batch.index), abandon, inside)
        try:
            seqs = model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([seen]))
        except Abandoned as stop:
            stop.rows = [i for i, hit in zip(batch.index, seen.hit) if hit]
            raise
        refused, used, unanswered = [], [], 0
        for row, end, o in zip(seqs[:, width:].tolist(), seen.ends, inside):
            row = row if end is None else row[:end]  # a decided row only gets padding afterwards
            parts = split_reasoning(tokenizer.decode(row, skip_special_tokens=True), o)
            unanswered += parts.unanswered
            refused.append(not parts.unanswered and markers.is_refusal(parts.answer))
            used.append(len(row))
        if unanswered:
            warnings.warn(f"refusal counting: generation stopped inside the reasoning of a thinking model, before any "
                          f"answer (at most {tokens} tokens); such a prompt counts as not refused, so the count means "
                          "little: raise the token budget or turn reasoning off (data.template_kwargs, "
                          "data.response_prefix: docs/thinking.md)", stacklevel=2)
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
