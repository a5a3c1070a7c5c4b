"""``obliteratus evaluate MODEL [--base BASE]``: VERIFY alone on any model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..batching import max_positions
from ..errors import ConfigError, ObliteratusError
from ..evaluate import evaluate_model
from ..evaluate.lm_eval import run_lm_eval
from ..models.load import summon
from ..pipeline import capability_set, prepare_prompts, split_prompt_sets
from ..save import check_output_file, write_file_atomically
from ..settings import resolve_settings
from .common import RichReporter, metrics_table, out
from .options import JUDGE_OPTION, MODEL_OPTIONS, settings_options


@settings_options(*MODEL_OPTIONS, "data.n_test", "evaluate.max_new_tokens", JUDGE_OPTION)
def evaluate(
    model: str = typer.Argument(..., help="Model to evaluate."),
    base: Optional[str] = typer.Option(None, help="Original model: adds KL(base ‖ model). Loaded first, then freed."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Also run lm-evaluation-harness tasks, e.g. "
                                                                  "mmlu,arc_easy (optional: pip install lm-eval)."),
    overrides: dict | None = None,
) -> None:
    """VERIFY alone: refusal, over-refusal, answer quality, perplexity, the capability check (and KL with --base)
    on the held-out test split."""
    settings = resolve_settings(None, overrides)
    ev = settings.evaluate
    if json_out:  # before any model is loaded: not inside a model, writable, replacing only earlier metrics
        json_out = check_output_file(json_out, sources=(model, base), replaceable=_is_metrics_file,
                                     what="a metrics file written by `obliteratus evaluate --json`")
    if lm_eval is not None:
        if not [t for t in lm_eval.split(",") if t.strip()]:
            raise ConfigError("--lm-eval: name at least one task, e.g. --lm-eval arc_easy")
        if "lm_eval" not in sys.modules and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install lm-eval")
    splits = split_prompt_sets(settings)  # a bad prompt file fails before any model loads
    ref = None
    with RichReporter() as reporter:
        if base is not None:
            reporter.stage(f"reference: {base}")
            b = summon(base, settings.model)
            bp = prepare_prompts(b.tokenizer, settings, max_positions(b.model), splits)
            bev = evaluate_model(b.model, b.tokenizer, bp.part("harmful", "test"), bp.part("harmless", "test"),
                                 ev.model_copy(update={"perplexity": False}), None, reporter.task, make_reference=True)
            ref = bev.reference
            vocab = b.model.config.vocab_size
            del b, bp, bev
        reporter.stage(f"evaluate: {model}")
        m = summon(model, settings.model)
        if ref is not None and m.model.config.vocab_size != vocab:
            raise ObliteratusError(f"{model} and {base} have different vocabularies; KL needs the same tokenizer")
        prompts = prepare_prompts(m.tokenizer, settings, max_positions(m.model), splits)
        result = evaluate_model(m.model, m.tokenizer, prompts.part("harmful", "test"), prompts.part("harmless", "test"),
                                ev, ref, reporter.task, capability=capability_set(m.tokenizer, settings))
    if lm_eval:
        result.metrics["lm_eval"] = run_lm_eval(m.model, m.tokenizer, [t for t in lm_eval.split(",") if t])
    out.print(metrics_table(result.metrics, None, f"{model}" + (f" vs {base}" if base else "")))
    if result.metrics.get("lm_eval"):
        out.print(json.dumps(result.metrics["lm_eval"], indent=1))
    if json_out:
        write_file_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(result.metrics, indent=2)))


def _is_metrics_file(path: Path) -> bool:
    """A JSON object with a refusal rate: what `evaluate --json` writes."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "refusal" in data
