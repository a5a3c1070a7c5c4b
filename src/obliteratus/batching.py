"""Length-sorted, left-padded batches of token ids, shared by PROBE, DISTILL and VERIFY."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import PromptError


@dataclass(frozen=True)
class Batch:
    index: list[int]  # positions of these rows in the caller's list
    input_ids: torch.Tensor  # [b, t]
    attention_mask: torch.Tensor  # [b, t]
    prefix: list[int] | None = None  # tokens every row starts with, left out of input_ids (see Encoded.batches)

    @property
    def position_ids(self) -> torch.Tensor:
        """[b, t]: 0 at each row's first real token, so absolute-position models (GPT-2) see the
        same positions as without padding (continuing after the shared prefix, when there is one)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp_min(0) + len(self.prefix or ())

    @property
    def full_mask(self) -> torch.Tensor:
        """[b, p + t]: the attention mask over the shared prefix (all ones) and this batch's tokens,
        the mask to pass with a cache that holds the prefix."""
        if not self.prefix:
            return self.attention_mask
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], len(self.prefix)))
        return torch.cat([ones, self.attention_mask], 1)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


@dataclass(frozen=True)
class Encoded:
    """Tokenized texts (no padding) sorted longest first, so a batch that does not fit fails early."""

    ids: list[list[int]]
    order: list[int]
    pad_id: int

    @classmethod
    def of(cls, tokenizer, texts: list[str], add_special_tokens: bool) -> "Encoded":
        ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return cls.from_ids(ids, tokenizer.pad_token_id)

    @classmethod
    def from_ids(cls, ids: list[list[int]], pad_id: int) -> "Encoded":
        """Token ids (input order), sorted longest first for batching."""
        return cls(ids, sorted(range(len(ids)), key=lambda i: -len(ids[i])), pad_id)

    def subset(self, rows: list[int]) -> "Encoded":
        """The prompts `rows` (indices into this set), in that order (sorted longest first as usual)."""
        return Encoded.from_ids([self.ids[i] for i in rows], self.pad_id)

    @classmethod
    def join(cls, *parts: "Encoded") -> "Encoded":
        """One set of every part's prompts, part by part (row i of part 1 is row len(part 0) + i)."""
        if len({p.pad_id for p in parts}) > 1:
            raise ValueError("Encoded.join: the parts have different pad ids")
        return cls.from_ids([row for p in parts for row in p.ids], parts[0].pad_id)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def common_prefix(self) -> list[int]:
        """The longest token prefix every row shares (the chat template's system turn, typically),
        leaving at least one token of every row outside it."""
        if not self.ids:
            return []
        n = min(len(r) for r in self.ids) - 1
        first = self.ids[0]
        for row in self.ids[1:]:
            k = 0
            while k < n and row[k] == first[k]:
                k += 1
            n = k
        return list(first[:max(n, 0)])

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                suffix: list[list[int]] | None = None, prefix: list[int] | None = None) -> Iterator[Batch]:
        """Left-padded batches; `suffix[i]` (optional) is appended to row i before padding. With
        `prefix` (a prefix of every row, e.g. :meth:`common_prefix`), the rows are given without it:
        the caller runs it once and passes its cache (shared_prefix.py), and the padding sits
        between the prefix and each row's remaining tokens."""
        cut = len(prefix or ())
        for start in range(0, len(self.order), batch_size):
            index = self.order[start:start + batch_size]
            if cut and any(self.ids[i][:cut] != list(prefix) for i in index):
                raise ValueError("batches(prefix=...): the prefix is not shared by every row")
            rows = [self.ids[i][cut:] + (suffix[i] if suffix is not None else []) for i in index]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                if row:
                    input_ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
                    mask[j, width - len(row):] = 1
            yield Batch(index, input_ids.to(device), mask.to(device), list(prefix) if cut else None)


def encode_prompts(tokenizer, texts: list[str], templated: bool) -> Encoded:
    """Templated text already carries its special tokens; raw text gets the tokenizer's own (e.g. BOS)."""
    return Encoded.of(tokenizer, texts, add_special_tokens=not templated)


def special_strings(tokenizer) -> list[str]:
    """The text of the tokenizer's special (control) tokens, e.g. ``<|im_start|>``, ``<eos>``."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [t.content for t in added.values() if getattr(t, "special", False) and t.content]


def has_special(tokenizer, text: str) -> bool:
    return any(s in text for s in special_strings(tokenizer))


def encode_plain(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of user text in which a special-token string is ordinary text, never a control token."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


_MARK = "\ue000{}\ue001"  # private-use characters stand in for the contents while the template is rendered


def encode_rendered(tokenizer, render, contents: list[str], what: str = "prompt") -> list[int] | None:
    """Ids of ``render(contents)`` (a chat template applied to messages with these contents) where
    the template's own text keeps its control tokens and each content is plain text (encode_plain);
    None when no content holds a special-token string (then the rendered text is encoded as usual,
    so ordinary prompts tokenize exactly as before). A template that rewrites the contents cannot
    be split this way: such a content is refused."""
    if not any(has_special(tokenizer, c) for c in contents):
        return None
    marks = [_MARK.format(i) for i in range(len(contents))]
    pieces = re.split("\ue000\\d+\ue001", render(marks))
    if len(pieces) != len(contents) + 1 or "".join(p + c for p, c in zip(pieces, [*contents, ""])) != render(contents):
        bad = next(c for c in contents if has_special(tokenizer, c))
        raise PromptError(f"{what} {bad[:60]!r}… holds a special-token string and the chat template changes the text "
                          "around it, so it cannot be kept as plain text; remove the special-token string")
    ids: list[int] = []
    for piece, content in zip(pieces, [*contents, None]):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if content:
            ids += encode_plain(tokenizer, content)
    return ids


def max_positions(model) -> int | None:
    """The longest sequence `model` takes (its config's position limit), or None if it names none."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(encoded: Encoded, prompts: list[str], limit: int, why: str, name: str = "prompt") -> None:
    """Refuse a prompt whose encoded length exceeds `limit` tokens (`why` says where the limit comes from)."""
    for i, ids in enumerate(encoded.ids):
        if len(ids) > limit:
            text = prompts[i]
            raise PromptError(f"{name} {i + 1} ({text[:40]!r}…, {len(text)} characters) is {len(ids)} tokens; {why} "
                              f"allows at most {limit}: shorten or remove it")
