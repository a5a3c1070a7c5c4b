"""What the study strategy (optimize/strategy.py; ``obliteratus optimize`` and the ``optimized`` and
``heretic`` presets) is built from: the study's outcome (:class:`OptimizeResult`), its options
validated (:func:`study_options`), the storage URL checked before any model loads
(:func:`check_storage`), Optuna's interrupted-trial log quietened, and the per-layer mean differences
the trials ablate (:func:`mean_differences`). From Python a study runs through pipeline.obliterate
(``obliterate(model, "optimized")``, or ``study={...}`` with any preset; the outcome is ``run.study``);
the verb is commands/optimize.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..directions.diff_means import mean_difference
from ..directions.driver import contrast_groups
from ..errors import ConfigError
from ..settings import validated
from .options import StudyOptions
from .study import redact


@dataclass
class OptimizeResult:
    """The study's outcome (``run.study`` of a study preset's run.Run); its edit, metrics and output
    are the run's."""

    settings: object
    options: StudyOptions
    study_name: str
    storage: str  # redacted
    front: list
    chosen: object | None = None  # optuna FrozenTrial
    timings: dict[str, float] = field(default_factory=dict)
    n_harmful_val: int = 0
    picked_by: str = ""  # "index" (--pick), "target", "confirmed" or "fewest confirmed refusals"
    checks: list = field(default_factory=list)  # confirmation of the pick (study.pick_confirmed), one dict each
    strength: float = 1.0  # the confirmed strength multiplier the pick is baked at
    run: object | None = None  # the run.Run this study chose the edit of

    before = property(lambda self: getattr(self.run, "before", None))  # evaluate.Evaluation
    after = property(lambda self: getattr(self.run, "after", None))
    edit = property(lambda self: getattr(self.run, "edit", None))  # excise.EditReport
    output = property(lambda self: getattr(self.run, "output", None))


def study_options(settings, updates: dict | None = None) -> StudyOptions:
    """``settings.optimize.study`` (once settings.py mounts it) with `updates` applied, validated."""
    mounted = getattr(settings.optimize, "study", None)
    # field by field (not model_dump), so that the presets test's read spy sees every option used
    base = ({name: getattr(mounted, name) for name in StudyOptions.model_fields} if isinstance(mounted, StudyOptions)
            else dict(mounted or {}))
    return validated(StudyOptions, {**base, **{k: v for k, v in (updates or {}).items() if v is not None}},
                     "optimize.study options")


def check_storage(url: str) -> None:
    """A bad --storage URL fails before any model loads: it must parse, name a database whose driver is
    installed and, for SQLite, a file in an existing folder."""
    from sqlalchemy.engine import make_url  # optional extra (optuna's storage)
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    hint = "use sqlite:///PATH/study.db or postgresql://USER:PASSWORD@HOST/DB"
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise ConfigError(f"--storage {redact(url)}: not a database URL SQLAlchemy can open ({err}); {hint}") from None
    except ImportError as err:
        raise ConfigError(f"--storage {redact(url)}: its database driver is not installed ({err})") from None
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database and database != ":memory:":
        folder = Path(database).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(f"--storage {redact(url)}: folder {folder} does not exist")
        if Path(database).expanduser().is_dir():
            raise ConfigError(f"--storage {redact(url)}: {database} is a directory, not a database file")


def _quiet_interrupts() -> None:
    """Ctrl-C inside a trial: Optuna logs the trial's failure with the KeyboardInterrupt's traceback
    before it re-raises it; the CLI reports the interruption in one line instead."""

    class Interrupted(logging.Filter):
        seen = False

        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
                Interrupted.seen = True
            return not Interrupted.seen  # that record and the trial's next line ("failed with value None")

    for handler in logging.getLogger("optuna").handlers:
        if not any(type(f).__name__ == "Interrupted" for f in handler.filters):
            handler.addFilter(Interrupted())


def mean_differences(loaded, cache, settings, prompts, orthogonalize: bool = False,
                     contrast=None) -> torch.Tensor:
    """[L+1, d]: harmful minus harmless train means at the last position, on the resid_pre axis
    (the contrast groups of directions/driver.py, or `contrast` when the caller already has them).
    With `orthogonalize`, each row is the unit difference with its component along the unit
    negative-group mean removed, renormalised (Heretic's ``orthogonalize_direction``, after
    grimjim's projected abliteration)."""
    if contrast is None:
        contrast = train_contrast(loaded, cache, settings, prompts)
    diffs = mean_difference(contrast.positive, contrast.negative)[-1]  # [L+1, d]
    if not orthogonalize:
        return diffs
    return orthogonal_to(diffs, contrast.negative[:, -1].double().mean(0))


def train_contrast(loaded, cache, settings, prompts):
    """The contrast groups (directions/driver.py) of the train activations in `cache`."""
    train = {cls: prompts.encoded[f"{cls}.train"] for cls in ("harmful", "harmless")}
    return contrast_groups(loaded.adapter, loaded.tokenizer, cache, settings, train)


def orthogonal_to(diffs: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Row-wise: r̂ − (r̂·ĝ)ĝ, renormalised, for r = `diffs` [L+1, d] and g = `means` [L+1, d]."""
    r = torch.nn.functional.normalize(diffs.double(), dim=-1)
    g = torch.nn.functional.normalize(means.double(), dim=-1)
    r = r - (r * g).sum(-1, keepdim=True) * g
    return torch.nn.functional.normalize(r, dim=-1).to(diffs.dtype)


__all__ = ["OptimizeResult", "check_storage", "mean_differences", "orthogonal_to", "study_options", "train_contrast"]
