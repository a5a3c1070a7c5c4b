"""REBIRTH's record: ``obliteratus.json``, one typed model for every preset.

Whichever strategy chose the edit (the fixed edit, the kernel grid or the Optuna study:
pipeline.obliterate), the run writes the same :class:`RunRecord`; ``optimize`` is None for the fixed
edit, a :class:`GridRecord` for the kernel grid and a :class:`StudyRecord` for the study.
:meth:`RunRecord.load` reads and validates a run directory's file (written by this or an earlier
version of the tool: the schema has not changed, only gained this model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ObliteratusError


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Open(BaseModel):
    """A section whose technique adds its own keys (kept as they are)."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")


class ModelRecord(Open):
    """models.load.describe() less the HF config."""

    source: str
    path: str
    family: str
    model_type: str
    n_layers: int
    d_model: int
    dtype: str
    device: str
    tied_lm_head: bool
    steering: dict | None = None


class DirectionsRecord(Closed):
    """The fixed edit and the grid: the fitted Directions (layer, per-layer norms, contrast, what the fit
    did); the study: the chosen trial's direction (scope ``global`` at a fractional ``index`` on the
    resid_pre axis, or ``per_layer``)."""

    method: str
    k: int
    layer: int | None = None
    position: int | None = None
    scope: str | None = None
    index: float | None = None
    layer_norms: list[float] | None = None
    contrast: Any = None
    fit: dict[str, Any] | None = None


class SelectionRecord(Open):
    """directions/layers.LayerSelection, or the study's pick (method ``optuna``)."""

    layer: int | float | str
    position: int
    method: str


class EditRecord(Open):
    """excise.EditReport (its variant adds ``details``)."""

    lam: float
    norm_preserve: bool
    k: int
    edited: list[str]
    variant: str
    details: dict[str, Any]


class GridRecord(Closed):
    """optimize/grid.GridResult: the plain edit (trials[0]) and every kernel, scored on val."""

    best: dict[str, Any]
    trials: list[dict[str, Any]]


class StudyRecord(Closed):
    """The Optuna study: its name and storage (password removed), the chosen trial and how it was
    picked, its confirmation, the options, trial counts by state and the Pareto front."""

    study_name: str
    storage: str
    trial: int
    params: dict[str, Any]
    val_refusal: float
    val_kl_first: float
    picked_by: Literal["index", "target", "confirmed", "fewest confirmed refusals"]
    confirm: dict[str, Any]
    target_refusal: float
    options: dict[str, Any]
    trials: dict[str, int]
    pareto: list[dict[str, Any]]


# How the metrics of ``metrics_before`` / ``metrics_after`` are labelled wherever a run's before/after
# table is shown: the CLI (commands/common.py), report.html (report/html.py), the web app (ui/app.py).
METRIC_ROWS: tuple[tuple[str, str], ...] = (
    ("refusal rate, harmful test", "refusal"), ("over-refusal, harmless test", "over_refusal"),
    ("over-refusal, benign-sensitive", "over_refusal_sensitive"), ("KL first token", "kl_first"),
    ("KL mean, first tokens", "kl_mean"), ("perplexity, held-out text", "perplexity"),
    ("answer quality, compliant harmful answers", "answer_quality"),
    ("answer quality, harmless answers", "answer_quality_harmless"), ("capability check accuracy", "capability"))


class RunRecord(Closed):
    """``obliteratus.json``."""

    tool: Literal["obliteratus"] = "obliteratus"
    preset: str
    settings: dict[str, Any]
    model: ModelRecord
    directions: DirectionsRecord
    selection: SelectionRecord
    edit: EditRecord
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any]
    optimize: GridRecord | StudyRecord | None = None
    timings_s: dict[str, float]
    versions: dict[str, str]
    seed: int
    splits: dict[str, dict[str, int]]

    def to_json(self) -> str:
        """The file's text (NaN and infinities written as JSON's usual constants, as json.dumps does)."""
        return self.model_dump_json(indent=2, fallback=str)

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        """Read and validate ``obliteratus.json`` (or the run directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "obliteratus.json"
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ObliteratusError(f"{path}: cannot read the run record ({err})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ObliteratusError(f"{path}: not an obliteratus run record:\n{err}") from None


__all__ = ["METRIC_ROWS", "DirectionsRecord", "EditRecord", "GridRecord", "ModelRecord", "RunRecord", "SelectionRecord",
           "StudyRecord"]
