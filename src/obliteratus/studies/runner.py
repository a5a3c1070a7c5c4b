"""Ablation studies: build the evaluator once on the unablated model, then for each ablation attach
its hooks (studies/ablations.py), evaluate, detach. The model's weights are never written.

Metrics (``metrics:`` in the study YAML), all on the held-out *test* split:

* ``log_odds`` (cheap, one forward pass per prompt): mean refusal log-odds
  log p(R) − log(1 − p(R)) at the last prompt position on harmful and harmless prompts
  (select/layers.py, Arditi et al. 2024 app. C), and ``kl_last``, the mean KL(base ‖ ablated)
  of the next-token distribution on harmless prompts.
* ``generate``: the full VERIFY (evaluate/): greedy answers, marker refusal rate, over-refusal,
  and KL over the first ``evaluate.kl_tokens`` tokens of the *unablated* model's answers.
* ``perplexity``: on the built-in held-out text (pad excluded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..settings import Settings
from ..data.prompts import heldout_text, read_text
from ..select.layers import refusal_log_odds, refusal_token_ids
from ..errors import ConfigError
from ..evaluate import evaluate_model, perplexity
from ..shared_prefix import last_logits
from ..evaluate.kl import kl_rows
from ..models.load import Loaded
from ..pipeline import PromptSets
from .ablations import Ablation, ablate

Metric = Literal["log_odds", "generate", "perplexity"]


class StudyConfig(BaseModel):
    """A study YAML file (see examples/studies/)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("study", description="Title of the table.")
    model: str = Field(..., description="Alias, local directory, .gguf file or hub id.")
    preset: str | None = Field(None, description="Preset whose data/evaluate settings are used (default: none).")
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description="Nested setting overrides, e.g. {data: {n_test: 16}}.")
    metrics: list[Metric] = Field(default_factory=lambda: ["log_odds"], min_length=1)
    ablations: list[Ablation] = Field(..., min_length=1)


def load_study(path: str | Path) -> StudyConfig:
    """Parse and validate a study YAML file; every field error is reported at once."""
    import yaml


    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, ConfigError, "study config"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid study config (see examples/studies/):\n" + "\n".join(lines)) from None


class Evaluator:
    """Every metric's reference, computed once on the unablated model; calling it scores the model as
    it is now (hooks included)."""

    def __init__(self, loaded: Loaded, prompts: PromptSets, settings: Settings, metrics: list[Metric]):
        self.loaded, self.prompts, self.metrics = loaded, prompts, list(metrics)
        self.ev = settings.evaluate
        self.tokens = refusal_token_ids(loaded.tokenizer)
        self.harmful, self.harmless = prompts.encoded["harmful.test"], prompts.encoded["harmless.test"]
        base = last_logits(loaded.model, self.harmless, self.ev.batch_size)  # [n, vocab]
        self.base_harmless = torch.log_softmax(base.double(), -1)
        self.ref = None
        if "generate" in self.metrics:
            self.ref = self._generate(None, make_reference=True).reference

    def _generate(self, ref, make_reference: bool = False):
        ev = self.ev.model_copy(update={"perplexity": False})
        return evaluate_model(self.loaded.model, self.loaded.tokenizer, self.prompts.part("harmful", "test"),
                              self.prompts.part("harmless", "test"), ev, ref, make_reference=make_reference)

    def __call__(self) -> dict[str, float]:
        model, bs, out = self.loaded.model, self.ev.batch_size, {}
        if "log_odds" in self.metrics:
            harmful = last_logits(model, self.harmful, bs)  # [n, vocab]
            harmless = torch.log_softmax(last_logits(model, self.harmless, bs).double(), -1)
            out["log_odds_harmful"] = float(refusal_log_odds(harmful, self.tokens).mean())
            out["log_odds_harmless"] = float(refusal_log_odds(harmless, self.tokens).mean())
            out["kl_last"] = float(kl_rows(self.base_harmless, harmless).mean())
        if "generate" in self.metrics:
            m = self._generate(self.ref).metrics
            out.update({k: m[k] for k in ("refusal", "over_refusal", "kl_first", "kl_mean")})
        if "perplexity" in self.metrics:
            out["perplexity"] = perplexity(model, self.loaded.tokenizer, heldout_text(), self.ev.ppl_window)
        return out


@dataclass
class StudyRow:
    label: str
    ablation: dict | None  # None for the unablated baseline
    metrics: dict[str, float]
    seconds: float


@dataclass
class StudyResult:
    name: str
    model: str
    rows: list[StudyRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model,
                "rows": [{"label": r.label, "ablation": r.ablation, "metrics": r.metrics, "seconds": r.seconds}
                         for r in self.rows]}

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r.metrics if k not in cols]
        return cols

    def to_markdown(self) -> str:
        cols = self.columns
        lines = [f"# {self.name} · {self.model}", "", "| ablation | " + " | ".join(cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        for r in self.rows:
            cells = ["—" if r.metrics.get(c) is None else f"{r.metrics[c]:.4f}" for c in cols]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


@torch.inference_mode()
def run_study(loaded: Loaded, prompts: PromptSets, settings: Settings, config: StudyConfig,
              on_row: Callable[[StudyRow], None] | None = None) -> StudyResult:
    """Baseline row first, then one row per (expanded) ablation; hooks are gone after each row."""
    evaluator = Evaluator(loaded, prompts, settings, config.metrics)
    result = StudyResult(config.name, config.model)
    ablations = [a for spec in config.ablations for a in spec.expand(loaded.adapter.n_layers)]

    def row(label: str, ablation: Ablation | None) -> None:
        start = time.perf_counter()
        if ablation is None:
            metrics = evaluator()
        else:
            with ablate(loaded.adapter, ablation):
                metrics = evaluator()
        r = StudyRow(label, None if ablation is None else ablation.model_dump(exclude_none=True), metrics,
                     time.perf_counter() - start)
        result.rows.append(r)
        if on_row:
            on_row(r)

    row("(none)", None)
    for a in ablations:
        row(a.label, a)
    return result
