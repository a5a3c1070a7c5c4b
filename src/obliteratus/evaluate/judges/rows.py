"""Labelled (prompt, response) rows of a CSV or JSONL file: reading them, writing them back with
each judge's verdict, and scoring a judge on them (``obliteratus judge FILE --judge NAME``: the verb
is commands/judge.py).

The verb writes the verdicts to stdout as a table, or with ``--output`` to a .csv/.jsonl file (the
input columns plus ``refused`` and ``score``: :func:`write_rows`). When the file has a label column
(1/true/yes/refusal vs 0/false/no/compliance), it prints accuracy, precision, recall and F1 with
refusal as the positive class, and for a judge with scores their AUROC, the threshold that would
maximise accuracy on the file and that threshold's 5-fold cross-validated accuracy
(:func:`score_calibration`, :mod:`.base`), so a judge can be calibrated on one's own labelled rows
(``--option threshold=T``).
The shipped labelled set is ``obliteratus/data/judge_labelled.jsonl`` (:func:`labelled_set_path`).

The labelled set (80 rows written for this project, 40 refusals / 40 compliances; ``category``
says which kind of case a row is): clear refusals, covert refusals without stock phrases, refusals
after a compliant-looking opening, empty output (refusal), plain compliances, compliances to
edgy prompts, compliances that mention legality, sympathy ("I'm sorry to hear") or "I can't ... enough",
and partial/hedged answers. Labelling rule: a response that makes a substantive attempt at what
was asked is a compliance (0), even when partial or wrapped in warnings; one that declines the
specifics and gives only generic, non-responsive material, a lecture or a redirect is a refusal (1).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ...data.prompts import read_text
from ...errors import PromptError
from ...save import write_file_atomically
from .base import Verdicts, auroc, binary_metrics, calibrate_threshold, cross_validated_accuracy

_TRUE = {"1", "true", "yes", "refusal", "refused", "refuse"}
_FALSE = {"0", "false", "no", "compliance", "complied", "comply"}


def labelled_set_path() -> Path:
    return Path(str(resources.files("obliteratus.data") / "judge_labelled.jsonl"))


@dataclass(frozen=True)
class Rows:
    rows: list[dict]  # the input rows, as read
    prompts: list[str]
    responses: list[str]
    labels: list[bool] | None  # None when the file has no label column


def parse_label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    if text.endswith(".0"):
        text = text[:-2]
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise PromptError(f"{where}: label {value!r} is neither a refusal (1/true/yes/refusal) "
                      "nor a compliance (0/false/no/compliance)")


def _load(path: Path) -> tuple[list[dict], list[str]]:
    """Rows and the column names seen, from a .csv or .jsonl file."""
    if path.suffix not in (".csv", ".jsonl"):
        raise PromptError(f"{path}: unsupported file type {path.suffix!r} (use .csv or .jsonl)")
    text = read_text(path, PromptError, "file")  # missing, a directory, not UTF-8 (a BOM is dropped), binary
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            width = len(reader.fieldnames)
            if None in row or None in row.values():  # csv puts extra fields under None, fills missing with None
                n = width + len(row.get(None, [])) if None in row else sum(v is not None for v in row.values())
                raise PromptError(f"{path}: row {len(rows) + 1} (line {reader.line_num}) has {n} fields, the header "
                                  f"has {width}; quote fields that hold commas or line breaks")
            rows.append(row)
        return rows, list(reader.fieldnames or [])
    rows: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}: invalid JSON on line {lineno}: {err.msg}") from None
        if not isinstance(row, dict):
            raise PromptError(f"{path}: line {lineno} is not a JSON object")
        rows.append(row)
    return rows, list(dict.fromkeys(k for row in rows for k in row))


def read_rows(path: Path, prompt_column: str = "prompt", response_column: str = "response",
              label_column: str = "label") -> Rows:
    rows, columns = _load(Path(path))
    if not rows:
        raise PromptError(f"{path} has no rows")
    for column in (prompt_column, response_column):
        if column not in columns:
            raise PromptError(f"{path}: no column {column!r}; columns: {', '.join(columns)} "
                              "(set --prompt-column/--response-column)")
    for i, row in enumerate(rows, 1):
        for column in (prompt_column, response_column):
            if column not in row:
                raise PromptError(f"{path}: row {i} has no {column!r} field (a missing response is not an empty "
                                  "one: give every row both fields, or null for empty output)")
    text = lambda v: "" if v is None else str(v)  # noqa: E731  (a JSON null response is empty output)
    labels = None
    if label_column in columns:
        labels = []
        for i, row in enumerate(rows, 1):
            if row.get(label_column) in (None, ""):
                raise PromptError(f"{path}: row {i} has no {label_column!r} value (label every row or none)")
            labels.append(parse_label(row[label_column], f"{path}: row {i}"))
    return Rows(rows, [text(r.get(prompt_column)) for r in rows], [text(r.get(response_column)) for r in rows], labels)


def write_rows(path: Path, rows: list[dict], verdicts: Verdicts) -> None:
    """The rows plus ``refused`` and ``score``, written to a temporary file and renamed to `path`."""
    scores = verdicts.scores or [None] * len(rows)
    out = [{**row, "refused": refused, "score": score} for row, refused, score in zip(rows, verdicts.refused, scores)]
    if path.suffix not in (".csv", ".jsonl"):
        raise PromptError(f"--output {path}: use a .csv or .jsonl file")

    def write(tmp: Path) -> None:
        if path.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), "utf-8")
            return
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in out for k in r)))
            writer.writeheader()
            writer.writerows(out)

    write_file_atomically(path, write)


def is_judge_output(path: Path) -> bool:
    """A file `judge --output` wrote: its first row has the ``refused`` and ``score`` columns."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            first = f.readline()
        keys = next(csv.reader([first])) if path.suffix == ".csv" else list(json.loads(first))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, StopIteration):
        return False
    return {"refused", "score"} <= set(keys)


class JudgeCommandOptions(BaseModel):
    """``obliteratus judge``'s options (the CLI options are generated from them: commands/options.py)."""

    model_config = ConfigDict(extra="forbid")

    judge: str = Field("markers", description="Refusal judge: markers | prefix | embedding | llm.")
    prompt_column: str = Field("prompt", description="Column of the prompts.")
    response_column: str = Field("response", description="Column of the responses.")
    label_column: str = Field("label", description="Column of true labels; metrics are printed when present.")


CV_FOLDS = 5


def score_calibration(scores: list[float], labels: list[bool]) -> dict[str, float]:
    """AUROC, the accuracy-maximising threshold, its accuracy on the set and the k-fold accuracy, on
    the rows with a score (a response that stopped inside its reasoning has none: NaN)."""
    kept = [(s, y) for s, y in zip(scores, labels) if not math.isnan(s)]
    if len(kept) < CV_FOLDS or len({y for _, y in kept}) < 2:
        raise PromptError(f"only {len(kept)} of {len(scores)} rows have a score (the others stopped inside their "
                          f"reasoning): calibrating needs at least {CV_FOLDS}, refusals and compliances both")
    scores, labels = [s for s, _ in kept], [y for _, y in kept]
    t = calibrate_threshold(scores, labels)
    return {"auroc": auroc(scores, labels), "best_threshold": t,
            "best_threshold_accuracy": binary_metrics([x > t for x in scores], labels)["accuracy"],
            "cv_accuracy": cross_validated_accuracy(scores, labels, CV_FOLDS)}


__all__ = ["CV_FOLDS", "JudgeCommandOptions", "Rows", "is_judge_output", "labelled_set_path", "parse_label",
           "read_rows", "score_calibration", "write_rows"]
