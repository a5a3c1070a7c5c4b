"""KL(original ‖ edited) over the first tokens of the original model's greedy continuation.

The original side is computed once, before the edit: the log-probs of the n positions that
predict the first n tokens of the original's own greedy answer, either kept while that answer was
generated (:func:`recorded_reference`, what VERIFY does) or by running the prompt plus those tokens
teacher-forced (:func:`reference`). After the edit, :func:`kl_to_reference` runs
the same sequences and compares. Position 0 is the first generated token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import Encoded
from ..shared_prefix import forward_inputs, text_model
from ..models.placement import input_device


@dataclass
class KLReference:
    encoded: Encoded
    continuations: list[list[int]]  # first n tokens of the original's greedy answer per prompt
    logprobs: list[torch.Tensor]  # per prompt: [c_i, vocab] float32 on CPU
    n_tokens: int


@torch.inference_mode()
def _teacher_forced_logprobs(model, encoded: Encoded, continuations: list[list[int]], n: int,
                             batch_size: int, share_prefix: bool = False) -> list[torch.Tensor]:
    model = text_model(model)  # a wrapper whose forward wants pixels: its language model
    device = input_device(model)
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded.ids)
    prefix = encoded.common_prefix() if share_prefix else None
    for batch in encoded.batches(batch_size, device, suffix=continuations, prefix=prefix):
        logits = model(**forward_inputs(model, batch), logits_to_keep=n + 1).logits  # [b, <=n+1, vocab]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, row in enumerate(batch.index):
            c = len(continuations[row])
            out[row] = logp[j, -(c + 1):-1].clone()  # positions predicting continuation tokens 0..c-1
    return out


def _first_tokens(continuations: list[list[int]], n_tokens: int) -> list[list[int]]:
    conts = [c[:n_tokens] for c in continuations]
    if any(len(c) == 0 for c in conts):
        raise ValueError("every continuation needs at least one token for KL")
    return conts


def reference(model, encoded: Encoded, continuations: list[list[int]], n_tokens: int = 16,
              batch_size: int = 32) -> KLReference:
    conts = _first_tokens(continuations, n_tokens)
    return KLReference(encoded, conts, _teacher_forced_logprobs(model, encoded, conts, n_tokens, batch_size), n_tokens)


def recorded_reference(encoded: Encoded, continuations: list[list[int]], logprobs: dict[int, torch.Tensor],
                       n_tokens: int = 16) -> KLReference:
    """The reference from log-probs kept while the original model generated `continuations`
    (generate.LogprobRecorder over every row of `encoded`): the same numbers :func:`reference`
    computes teacher-forced, without running the sequences again."""
    conts = _first_tokens(continuations, n_tokens)
    missing = [i for i, c in enumerate(conts) if i not in logprobs or len(logprobs[i]) < len(c)]
    if missing:
        raise ValueError(f"no recorded log-probs for {len(missing)} continuations, e.g. row {missing[0]}")
    return KLReference(encoded, conts, [logprobs[i][:len(c)].clone() for i, c in enumerate(conts)], n_tokens)


def kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row of log-prob tensors [..., vocab], in float64; float rounding of nearly equal
    distributions (about -1e-8) is clamped to 0, the bound KL cannot cross."""
    p_log, q_log = p_log.double(), q_log.double()
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def kl_to_reference(model, ref: KLReference, batch_size: int = 32, share_prefix: bool = False) -> dict[str, object]:
    """{"kl_first": mean KL at the first token, "kl_mean": mean over prompts of the mean KL over
    each prompt's (up to n) tokens, "kl_per_position": mean KL at each position, over the prompts
    whose continuation reaches it; it ends at the longest continuation (no position without data)}.
    With `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py)."""
    now = _teacher_forced_logprobs(model, ref.encoded, ref.continuations, ref.n_tokens, batch_size, share_prefix)
    per_prompt = [kl_rows(p, q) for p, q in zip(ref.logprobs, now)]  # each [c_i]
    sums = torch.zeros(ref.n_tokens, dtype=torch.float64)
    counts = torch.zeros(ref.n_tokens, dtype=torch.float64)
    for kl in per_prompt:
        sums[: len(kl)] += kl
        counts[: len(kl)] += 1
    return {
        "kl_first": float(torch.stack([kl[0] for kl in per_prompt]).mean()),
        "kl_mean": float(torch.stack([kl.mean() for kl in per_prompt]).mean()),
        "kl_per_position": (sums / counts)[counts > 0].tolist(),  # counts fall with position: a suffix is cut
    }
