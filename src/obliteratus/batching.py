"""Length-sorted, left-padded batches of token ids, shared by PROBE, DISTILL and VERIFY."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Batch:
    index: list[int]  # positions of these rows in the caller's list
    input_ids: torch.Tensor  # [b, t]
    attention_mask: torch.Tensor  # [b, t]

    @property
    def position_ids(self) -> torch.Tensor:
        """[b, t]: 0 at each row's first real token, so absolute-position models (GPT-2) see the
        same positions as without padding."""
        return (self.attention_mask.cumsum(-1) - 1).clamp_min(0)

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
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return cls(ids, order, tokenizer.pad_token_id)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                suffix: list[list[int]] | None = None) -> Iterator[Batch]:
        """Left-padded batches; `suffix[i]` (optional) is appended to row i before padding."""
        for start in range(0, len(self.order), batch_size):
            index = self.order[start:start + batch_size]
            rows = [self.ids[i] + (suffix[i] if suffix is not None else []) for i in index]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                if row:
                    input_ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
                    mask[j, width - len(row):] = 1
            yield Batch(index, input_ids.to(device), mask.to(device))


def encode_prompts(tokenizer, texts: list[str], templated: bool) -> Encoded:
    """Templated text already carries its special tokens; raw text gets the tokenizer's own (e.g. BOS)."""
    return Encoded.of(tokenizer, texts, add_special_tokens=not templated)
