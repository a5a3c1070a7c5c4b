"""The study strategy from Python: :func:`run_optimize` is pipeline.obliterate with the Optuna study
(optimize/strategy.py), whatever the preset; ``obliteratus optimize`` (commands/optimize.py) runs it."""

from __future__ import annotations

from ..pipeline import obliterate
from .base import OptimizeResult


def run_optimize(model, preset: str = "optimized", output: str | None = None, overwrite: bool = False,
                 overrides: dict | None = None, study: dict | None = None, run_dir: str | None = None,
                 pick_index: int | None = None, worker: bool = False, reporter=None) -> OptimizeResult:
    """pipeline.obliterate with the study strategy, whatever the preset (an SQLite study stays locked,
    study.study_lock, until it returns); the study's outcome, its run in ``.run``."""
    run = obliterate(model, preset, output, overwrite=overwrite, reporter=reporter, overrides=overrides,
                     study=study or {}, run_dir=run_dir, pick=pick_index, worker=worker)
    return run.study


__all__ = ["run_optimize"]
