"""KL(original ‖ edited) over the first tokens of the original model's greedy continuation.

The original side is computed once, before the edit (:func:`reference`): the prompt plus the
first n tokens of the original's own greedy answer are run teacher-forced and the log-probs of
the n positions that predict those tokens are kept. After the edit, :func:`kl_to_reference` runs
the same sequences and compares. Position 0 is the first generated token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import Encoded


@dataclass
class KLReference:
    encoded: Encoded
    continuations: list[list[int]]  # first n tokens of the original's greedy answer per prompt
    logprobs: list[torch.Tensor]  # per prompt: [c_i, vocab] float32 on CPU
    n_tokens: int


@torch.inference_mode()
def _teacher_forced_logprobs(model, encoded: Encoded, continuations: list[list[int]], n: int,
                             batch_size: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded.ids)
    for batch in encoded.batches(batch_size, device, suffix=continuations):
        logits = model(**batch.inputs(), use_cache=False, logits_to_keep=n + 1).logits  # [b, <=n+1, vocab]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, row in enumerate(batch.index):
            c = len(continuations[row])
            out[row] = logp[j, -(c + 1):-1].clone()  # positions predicting continuation tokens 0..c-1
    return out


def reference(model, encoded: Encoded, continuations: list[list[int]], n_tokens: int = 16,
              batch_size: int = 32) -> KLReference:
    conts = [c[:n_tokens] for c in continuations]
    if any(len(c) == 0 for c in conts):
        raise ValueError("every continuation needs at least one token for KL")
    return KLReference(encoded, conts, _teacher_forced_logprobs(model, encoded, conts, n_tokens, batch_size), n_tokens)


def kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row of log-prob tensors [..., vocab], in float64."""
    p_log, q_log = p_log.double(), q_log.double()
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def kl_to_reference(model, ref: KLReference, batch_size: int = 32) -> dict[str, object]:
    """{"kl_first": mean KL at the first token, "kl_mean": mean over prompts of the mean KL over
    each prompt's (up to n) tokens, "kl_per_position": mean KL at each position, over the prompts
    whose continuation reaches it; it ends at the longest continuation (no position without data)}."""
    now = _teacher_forced_logprobs(model, ref.encoded, ref.continuations, ref.n_tokens, batch_size)
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
