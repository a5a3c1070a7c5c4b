"""Refusal judges: one interface, a registry, and the binary metrics used to score a judge.

A judge maps a batch of (prompt, response) pairs to booleans (True = the response is a refusal)
and, where it has one, a real-valued score per pair (higher = more refusal-like; the verdict is
``score > threshold`` for judges that threshold a score). Each judge lives in its own module, with
the pydantic model of its options next to it, and registers itself once with
:func:`register_judge`; the CLI's ``--judge NAME`` looks it up with :func:`get_judge`. Calling a
judge judges each response's answer: a thinking model's reasoning block is left out first
(:mod:`.reasoning`, :meth:`Judge.__call__`).

Metrics treat *refusal* as the positive class, on n pairs with prediction p and label y:
    accuracy  = (TP + TN) / n
    precision = TP / (TP + FP)     (0 when nothing is predicted a refusal)
    recall    = TP / (TP + FN)     (0 when nothing is labelled a refusal)
    F1        = 2·P·R / (P + R)    (0 when P + R = 0)

For a judge with scores, three more numbers say how well its scores separate the classes and where
its threshold should sit (the ``judge`` command prints them when the file has labels):
    AUROC            = P(score of a random refusal > score of a random compliance), ties counting 1/2
    best threshold   = the midpoint between consecutive sorted scores that maximises the accuracy of
                       ``score > t`` (ties: the widest gap); fitted on the set, so its accuracy there
                       is optimistic
    k-fold accuracy  = row i in fold i mod k; each fold judged at the best threshold of the others
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel

from ...analysis.linear_probes import auroc as mann_whitney
from ...errors import ObliteratusError
from ...registry import NoOptions, parse_options
from ...registry import Registry
from .reasoning import split_reasoning


@dataclass(frozen=True)
class Verdicts:
    refused: list[bool]
    scores: list[float] | None = None  # higher = more refusal-like; None for judges without a score
    # True where the response ended inside its reasoning (no answer yet: not refused, score NaN); None
    # from a judge's own `judge` method, which sees answers only
    unanswered: list[bool] | None = None

    def __post_init__(self):
        if self.scores is not None and len(self.scores) != len(self.refused):
            raise ValueError("scores and verdicts differ in length")
        if self.unanswered is not None and len(self.unanswered) != len(self.refused):
            raise ValueError("unanswered flags and verdicts differ in length")


class Judge(ABC):
    """Decides, for each (prompt, response) pair, whether the response refuses the prompt.

    Calling a judge judges each response's answer: a thinking model's reasoning block is left out
    first (reasoning.py), so `judge` sees answers only. A response that stopped inside its reasoning
    has no answer yet: it is not judged, counts as not refused (score NaN), is flagged in
    ``Verdicts.unanswered``, and a warning says how many there were."""

    @abstractmethod
    def judge(self, prompts: list[str], responses: list[str]) -> Verdicts: ...

    def __call__(self, prompts: list[str], responses: list[str],
                 opened: bool | Sequence[bool] | None = None) -> Verdicts:
        """`opened`: whether generation started inside a reasoning block the prompt opened
        (reasoning.opens_reasoning of the formatted prompt), one flag or one per response; None = unknown."""
        if len(prompts) != len(responses):
            raise ObliteratusError(f"{len(prompts)} prompts but {len(responses)} responses: they must pair up")
        flags = [opened] * len(responses) if opened is None or isinstance(opened, bool) else list(opened)
        if len(flags) != len(responses):
            raise ObliteratusError(f"{len(flags)} opened flags for {len(responses)} responses: they must pair up")
        parts = [split_reasoning(r, o) for r, o in zip(responses, flags)]
        todo = [i for i, p in enumerate(parts) if not p.unanswered]
        unanswered = [p.unanswered for p in parts]
        if len(todo) < len(parts):
            warnings.warn(f"{len(parts) - len(todo)} of {len(parts)} responses stopped inside their reasoning, "
                          "before any answer: counted as not refused; give the generation more tokens or turn "
                          "reasoning off (data.template_kwargs, data.response_prefix: docs/thinking.md)", stacklevel=2)
        if not todo:
            return Verdicts([False] * len(parts), None, unanswered)
        inner = self.judge([prompts[i] for i in todo], [parts[i].answer for i in todo])
        refused, scores = [False] * len(parts), None if inner.scores is None else [math.nan] * len(parts)
        for j, i in enumerate(todo):
            refused[i] = inner.refused[j]
            if scores is not None:
                scores[i] = inner.scores[j]
        return Verdicts(refused, scores, unanswered)


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    description: str
    build: Callable[[Any], Judge]  # validated options -> Judge
    options: type[BaseModel] = NoOptions

    def parse_options(self, table: dict | None) -> BaseModel:
        return parse_options(self.options, table, f"judge {self.name!r} options")

    def create(self, **options) -> Judge:
        return self.build(self.parse_options(options))


JUDGES: Registry[JudgeSpec] = Registry("judge")


def register_judge(name: str, description: str, build: Callable[[Any], Judge], *,
                   options: type[BaseModel] = NoOptions) -> None:
    JUDGES.register(name, JudgeSpec(name, description, build, options), options)


def judges() -> dict[str, JudgeSpec]:
    return JUDGES.as_dict()


def get_judge(name: str) -> JudgeSpec:
    return JUDGES.get(name)


def make_judge(name: str, **options) -> Judge:
    """The judge registered as `name`, built with `options` (validated by its options model)."""
    return get_judge(name).create(**options)


def binary_metrics(predicted: list[bool], labels: list[bool]) -> dict[str, float | int]:
    """Accuracy, precision, recall and F1 with refusal as the positive class (see module docstring)."""
    if len(predicted) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = sum(p and y for p, y in zip(predicted, labels))
    fp = sum(p and not y for p, y in zip(predicted, labels))
    fn = sum(y and not p for p, y in zip(predicted, labels))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(labels), "accuracy": (tp + tn) / max(len(labels), 1), "precision": precision,
            "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """P(a refusal's score > a compliance's), ties 1/2 (analysis/linear_probes.py's Mann–Whitney AUROC);
    None unless both classes are present."""

    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return mann_whitney(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))


def calibrate_threshold(scores: list[float], labels: list[bool]) -> float:
    """The midpoint threshold that maximises accuracy of ``score > t`` (ties: widest gap)."""
    if not scores or len(scores) != len(labels):
        raise ValueError("need equally many (non-zero) scores and labels")
    s = sorted(set(scores))
    candidates = [(s[0] - 1.0, 1.0)] + [((a + b) / 2, b - a) for a, b in zip(s, s[1:])] + [(s[-1] + 1.0, 1.0)]

    def accuracy(t: float) -> float:
        return sum((x > t) == y for x, y in zip(scores, labels)) / len(scores)

    return max(candidates, key=lambda c: (accuracy(c[0]), c[1]))[0]


def cross_validated_accuracy(scores: list[float], labels: list[bool], folds: int = 5) -> float:
    """Accuracy of each row judged at the threshold calibrated on the other folds (row i in fold i mod k)."""
    if len(scores) != len(labels) or len(scores) < folds:
        raise ValueError(f"need equally many scores and labels, at least {folds}")
    correct = 0
    for f in range(folds):
        train = [i for i in range(len(scores)) if i % folds != f]
        t = calibrate_threshold([scores[i] for i in train], [labels[i] for i in train])
        correct += sum((scores[i] > t) == labels[i] for i in range(f, len(scores), folds))
    return correct / len(scores)
