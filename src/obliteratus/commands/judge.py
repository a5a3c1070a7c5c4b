"""``obliteratus judge FILE --judge NAME``: label (prompt, response) rows of a CSV or JSONL file and,
with a label column, score the judge (the rows and the scoring: evaluate/judges/rows.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import PromptError
from ..evaluate.judges import binary_metrics, make_judge
from ..evaluate.judges.rows import CV_FOLDS, is_judge_output, read_rows, score_calibration, write_rows
from ..save import check_output_file
from .options import Opt, command_options, parse_option_args, settings_options


@settings_options(Opt("judge.judge", ("--judge", "-j")), "judge.prompt_column", "judge.response_column",
                  "judge.label_column", sets=False, into="given")
def judge(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL file of (prompt, response) rows.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write rows + verdicts (.csv/.jsonl).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Judge option key=value, e.g. "
                                                        "model_path=DIR or model=PATH.")] = None,
    given: dict | None = None,
) -> dict | None:
    """Label a CSV/JSONL of (prompt, response) rows with a refusal judge; with labels, score the judge."""
    opts = command_options(given, "judge")  # its defaults: JudgeCommandOptions
    judge, prompt_column, response_column, label_column = (opts.judge, opts.prompt_column, opts.response_column,
                                                           opts.label_column)
    if output is not None and output.suffix not in (".csv", ".jsonl"):
        raise PromptError(f"--output {output}: use a .csv or .jsonl file")
    if output is not None:  # before judging: never the input, and replacing only an earlier verdicts file
        output = check_output_file(output, inputs=(file,), replaceable=is_judge_output,
                                   what="a verdicts file written by `obliteratus judge --output`")
    data = read_rows(file, prompt_column, response_column, label_column)
    verdicts = make_judge(judge, **parse_option_args(option))(data.prompts, data.responses)
    console = Console(file=sys.stdout, width=160)
    if output is not None:
        write_rows(output, data.rows, verdicts)
        console.print(f"wrote {len(data.rows)} verdicts to {output}", soft_wrap=True)
    else:
        table = Table(title=f"{file.name} · judge {judge}")
        for name in ("#", "refused", "score", *(["label"] if data.labels else []), "response"):
            table.add_column(name, justify="right" if name in ("#", "score") else "left")
        for i, refused in enumerate(verdicts.refused):
            score = f"{verdicts.scores[i]:.3f}" if verdicts.scores else "—"
            label = [("refusal" if data.labels[i] else "compliance")] if data.labels else []
            preview = " ".join(data.responses[i].split())
            table.add_row(str(i + 1), "refusal" if refused else "compliance", score, *label,
                          preview[:70] + ("…" if len(preview) > 70 else ""), )
        console.print(table)
    n_refused = sum(verdicts.refused)
    console.print(f"refused: {n_refused}/{len(verdicts.refused)} ({n_refused / len(verdicts.refused):.3f})")
    if data.labels is None:
        return None
    m = binary_metrics(verdicts.refused, data.labels)
    console.print(f"accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
                  f"F1 {m['f1']:.3f}  (n={m['n']}, TP {m['tp']} FP {m['fp']} FN {m['fn']} TN {m['tn']}; "
                  "positive = refusal)")
    if verdicts.scores is not None and 0 < sum(data.labels) < len(data.labels) and len(data.labels) >= CV_FOLDS:
        m.update(score_calibration(verdicts.scores, data.labels))
        console.print(f"scores: AUROC {m['auroc']:.3f}; on this set the best threshold is {m['best_threshold']:.4g} "
                      f"(accuracy {m['best_threshold_accuracy']:.3f} there, {m['cv_accuracy']:.3f} "
                      f"{CV_FOLDS}-fold cross-validated): --option threshold={m['best_threshold']:.4g}", soft_wrap=True)
    return m
