"""Which two groups of activations a direction contrasts.

``prompts`` (Arditi et al. 2024): harmful prompts against harmless ones. The difference of their
means mixes two things: what the model recognises as harmful and whether it refuses. On chat
models that refuse almost every harmful request the two coincide.

``behaviour``: the harmful training prompts the model itself refuses against the harmful
training prompts it answers. Both groups are harmful, so the topic cancels and what is left is
the refusal decision. This matters on models that refuse only part of a harmful set (the demo
model refuses about half): there the prompts contrast also removes the model's notion of
"harmful request", which costs KL on ordinary prompts without removing more refusals (see
docs/journal). Which prompts the model refuses is judged either from its greedy answer
(``label = "generate"``, the marker judge on up to ``label_tokens`` tokens, each sequence stopped
once decided) or from the refusal log-odds of its first answer token (``label = "logodds"``, the
score Arditi's layer selection uses, read from the final residual the probe already kept, so no
extra forward pass; cheaper but noisier: on the demo model it calls 44 of 128 harmful prompts
refused where their answers refuse 69 times, and the noisier groups give a weaker direction). When fewer than
``min_group`` harmful prompts fall in either group, the contrast falls back to refused-or-all
harmful prompts against the harmless ones (Arditi's contrast), and says so.

``filtered`` (Arditi et al.'s own data filter): harmful prompts the model refuses against harmless
prompts it does not refuse. Arditi et al. filter by the first-token log-odds; with ``label =
"generate"`` both sides are judged from the model's own answers. This is ``basic``'s contrast. On the
demo model it keeps what ``prompts`` gets right (the direction of the refusals, not of the answered
harmful prompts, so it generalises: 1 of 96 AdvBench prompts still refused at layer 17) and drops
what ``behaviour`` gets wrong (two small groups of borderline harmful prompts give a noisy direction
that leaves 28 of 96), at about half the KL of ``prompts``' best layer (docs/journal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from ..models.placement import input_device


@dataclass
class Contrast:
    """The two groups: ``positive`` [n, ...] (refusing side) and ``negative`` [m, ...]."""

    positive: torch.Tensor
    negative: torch.Tensor
    kind: str  # "prompts", "behaviour" or "filtered"
    n_refused: int | None = None  # harmful train prompts scored as refused (behaviour only)
    n_answered: int | None = None
    fallback: bool = False  # behaviour was asked for but a group was too small
    labels: str | None = None  # how refused prompts were found ("generate" or "logodds")

    def info(self) -> dict:
        d = asdict(self)
        del d["positive"], d["negative"]
        d.update(n_positive=len(self.positive), n_negative=len(self.negative))
        return d


def split_by_refusal(harmful: torch.Tensor, harmless: torch.Tensor, log_odds: torch.Tensor,
                     threshold: float = 0.0, min_group: int = 8) -> Contrast:
    """harmful [n, ...], harmless [m, ...], log_odds [n] (refusal log-odds of each harmful prompt)."""
    if log_odds.shape != (len(harmful),):
        raise ValueError(f"log_odds must be [{len(harmful)}], got {tuple(log_odds.shape)}")
    refused = log_odds > threshold  # [n]
    n_ref, n_ans = int(refused.sum()), int((~refused).sum())
    if n_ref >= min_group and n_ans >= min_group:
        return Contrast(harmful[refused], harmful[~refused], "behaviour", n_ref, n_ans)
    positive = harmful[refused] if n_ref >= min_group else harmful
    return Contrast(positive, harmless, "behaviour", n_ref, n_ans, fallback=True)


def filter_by_refusal(harmful: torch.Tensor, harmless: torch.Tensor, log_odds_harmful: torch.Tensor,
                      log_odds_harmless: torch.Tensor, threshold: float = 0.0, min_group: int = 8) -> Contrast:
    """Arditi et al.'s data filter (``filter_data`` in their pipeline): harmful prompts the model
    refuses (score > threshold) against harmless prompts it does not refuse (score < threshold).
    Falls back to the unfiltered group when fewer than `min_group` prompts would remain."""
    keep_h, keep_s = log_odds_harmful > threshold, log_odds_harmless < threshold
    fallback = int(keep_h.sum()) < min_group or int(keep_s.sum()) < min_group
    positive = harmful[keep_h] if int(keep_h.sum()) >= min_group else harmful
    negative = harmless[keep_s] if int(keep_s.sum()) >= min_group else harmless
    return Contrast(positive, negative, "filtered", int(keep_h.sum()), int((~keep_h).sum()), fallback)


@torch.no_grad()
def final_logits(adapter, residual: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits from final residuals [n, d] (before the final norm): final norm, lm_head, and the
    final logit soft-cap of Gemma 2/3 when the config has one. Float32 on CPU."""
    model = adapter.model
    device = input_device(model)
    dtype = adapter.lm_head.weight.dtype
    cap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    for chunk in residual.split(batch_size):
        logits = adapter.lm_head(adapter.final_norm(chunk.to(device=device, dtype=dtype))).float()  # [b, vocab]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.cpu())
    return torch.cat(out)
