"""VERIFY: refusal on held-out harmful prompts, over-refusal on held-out harmless prompts, the
quality of the answers called compliant (quality.py), KL to the original model over several tokens,
perplexity on held-out text and the multiple-choice capability check (capability.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..batching import Encoded
from ..data.prompts import heldout_text, load_prompts
from ..errors import ActivationError
from .capability import CapabilitySet, capability as run_capability
from .early import opened
from .generate import LogprobRecorder, decode, generate
from .kl import KLReference, kl_to_reference, recorded_reference, reference
from ..shared_prefix import can_share_prefix
from .perplexity import perplexity
from .quality import answer_quality
from .judges import make_judge
from .judges.markers import is_refusal, refusal_rate

if TYPE_CHECKING:
    from ..settings import EvalSettings

Step = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


@dataclass
class Evaluation:
    metrics: dict[str, object]
    harmful_responses: list[str]
    harmless_responses: list[str]
    harmless_continuations: list[list[int]] = field(repr=False, default_factory=list)
    reference: KLReference | None = field(repr=False, default=None)  # when asked for (the model before the edit)
    settings: EvalSettings | None = field(repr=False, default=None)  # what it was measured with


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def verdict_rates(refused: list[bool], harmless: list[str], flagged: list[bool], sensitive: list[str]) -> dict:
    """The judge's verdicts as rates: refusal on the harmful prompts (`refused`), over-refusal on the
    `harmless` prompts (`flagged`) and on those of them that are benign but sound sensitive (in
    `sensitive`, compared casefolded; None when there are none), and the counts."""
    sensitive_keys = {p.casefold() for p in sensitive}
    sens = [f for p, f in zip(harmless, flagged) if p.casefold() in sensitive_keys]
    return {"refusal": sum(refused) / max(len(refused), 1), "over_refusal": sum(flagged) / max(len(flagged), 1),
            "over_refusal_sensitive": (sum(sens) / len(sens)) if sens else None,
            "n_harmful": len(refused), "n_harmless": len(harmless), "n_sensitive": len(sens)}


def check_finite_metrics(metrics: dict[str, object]) -> None:
    """VERIFY's numbers are finite: NaN or inf means the model's logits overflowed (issue 24: such a
    run used to save the model with metrics `nan`)."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ActivationError(f"VERIFY: {key} is {bad[0]}: the model's logits are NaN, inf or absurdly large; in "
                                  "float16 or bfloat16 try --dtype float32, in float32 the weights (or the edit) are "
                                  "broken")


def evaluate_model(model, tokenizer, harmful: tuple[list[str], Encoded], harmless: tuple[list[str], Encoded],
                   settings: EvalSettings, ref: KLReference | None = None, step: Step = _no_progress,
                   make_reference: bool = False, capability: CapabilitySet | None = None) -> Evaluation:
    """Run VERIFY. `harmful`/`harmless` are (raw test prompts, their encoded chat-formatted form).
    Both sets are generated together, in batches of ``settings.batch_size`` (bigger batches decode
    faster per prompt). With `make_reference` (the model before an edit), the log-probs of the
    first ``settings.kl_tokens`` tokens of each harmless answer are kept as they are generated and
    returned as ``Evaluation.reference``, the KL reference for the edited model. With `capability`
    (capability.encode_items) and ``settings.capability``, the capability check runs too."""
    (raw_harmful, enc_harmful), (raw_harmless, enc_harmless) = harmful, harmless
    bs, n_new = settings.batch_size, settings.max_new_tokens
    both = Encoded.join(enc_harmful, enc_harmless)
    share = settings.share_prefix and can_share_prefix(model, both)
    n = len(enc_harmful.ids)
    record = LogprobRecorder(settings.kl_tokens, set(range(n, len(both.ids)))) if make_reference else None
    ids = generate(model, tokenizer, both, n_new, bs, step("generate", len(both.ids)), share, record)
    harmful_ids, harmless_ids = ids[:n], ids[n:]
    harmful_text, harmless_text = decode(tokenizer, harmful_ids), decode(tokenizer, harmless_ids)
    judge = make_judge(settings.judge, **settings.judge_options)
    # a prompt that ends inside a reasoning block (a template that opens <think>): its response starts there
    vh = judge(raw_harmful, harmful_text, opened(tokenizer, enc_harmful))
    vl = judge(raw_harmless, harmless_text, opened(tokenizer, enc_harmless))
    refused, flagged = vh.refused, list(vl.refused)
    metrics: dict[str, object] = {
        "judge": settings.judge,
        **verdict_rates(refused, raw_harmless, flagged, load_prompts("builtin:benign_sensitive")),
        "mean_response_tokens": sum(map(len, harmful_ids + harmless_ids)) / max(len(harmful_ids + harmless_ids), 1),
        # responses still inside their reasoning when generation stopped: judged not refused, no answer yet
        "unanswered": sum(vh.unanswered or []) + sum(vl.unanswered or []),
    }
    # the answers the judge calls compliant: are they answers (on topic, not empty, looping or in another language)?
    quality = answer_quality(raw_harmful, harmful_text, [not r for r in refused])
    metrics.update(quality)
    harmless_quality = answer_quality(raw_harmless, harmless_text, [not f for f in flagged])
    metrics["answer_quality_harmless"] = harmless_quality["answer_quality"]
    if ref is not None:
        advance = step("KL", 1)
        metrics.update(kl_to_reference(model, ref, bs, settings.share_prefix and can_share_prefix(model, ref.encoded)))
        advance(1)
    if settings.perplexity:
        advance = step("perplexity", 1)
        metrics["perplexity"] = perplexity(model, tokenizer, heldout_text(), settings.ppl_window)
        advance(1)
    if capability is not None and settings.capability:
        advance = step("capability", 1)
        metrics.update(run_capability(model, capability, bs, settings.share_prefix and
                                      can_share_prefix(model, capability.prompts)))
        advance(1)
    reference = None
    if record is not None:
        reference = recorded_reference(enc_harmless, harmless_ids,
                                       {i - n: lp for i, lp in record.logprobs.items()}, settings.kl_tokens)
    check_finite_metrics(metrics)
    return Evaluation(metrics, harmful_text, harmless_text, harmless_ids, reference, settings)


__all__ = ["CapabilitySet", "Evaluation", "KLReference", "evaluate_model", "is_refusal", "kl_to_reference",
           "perplexity", "reference", "refusal_rate", "verdict_rates"]
