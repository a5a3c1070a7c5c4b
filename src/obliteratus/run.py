"""What :func:`obliteratus.pipeline.obliterate` returns: the run, whichever strategy chose its edit,
with its metrics, its typed record (``obliteratus.json``, record.py) and ``save`` (REBIRTH, now or
later); and the progress callbacks every verb passes along."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ConfigError, ObliteratusError
from .excise.dispatch import weights_held
from .export.bake import prepare_bake, source_digests
from .export.plan import EditPlanFile, plan_of
from .models.load import describe
from .record import RunRecord
from .save import check_output, save_run, versions
from .settings_file import saved_settings

if TYPE_CHECKING:
    from .settings import Settings
    from .directions import Directions
    from .select.layers import LayerSelection
    from .evaluate import Evaluation
    from .excise import EditReport
    from .models.load import Loaded
    from .pipeline import PromptSets


class Reporter:
    """Progress callbacks; the CLI draws bars, the Python API stays quiet."""

    def stage(self, name: str) -> None:
        pass

    def task(self, label: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def done(self, name: str, seconds: float) -> None:
        pass


@contextmanager
def timed(timings: dict[str, float], name: str, reporter: Reporter) -> Iterator[None]:
    reporter.stage(name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    reporter.done(name, timings[name])


@dataclass
class Run:
    """One run of :func:`~obliteratus.pipeline.obliterate`.

    ``metrics`` is ``{"before": ..., "after": ...}`` (evaluate.Evaluation.metrics of the test split,
    unedited and edited); ``save(dir)`` writes the edited model with ``obliteratus.json``
    (:meth:`record`), the directions, the report and, in hook mode, the steering files. The fixed
    edit and the kernel grid fill ``directions`` and ``selection`` (and ``search``: the grid's trials);
    the Optuna study fills ``study`` (optimize.base.OptimizeResult: the front, the chosen trial, its
    confirmation). A ``--worker`` run of the study only ran trials: no edit, no metrics."""

    preset: str
    settings: Settings
    loaded: Loaded
    prompts: PromptSets
    choice: Any  # the strategy that chose the edit (pipeline.FixedEdit, optimize.strategy.StudyEdit)
    before: Evaluation | None = None
    after: Evaluation | None = None
    edit: EditReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pca: dict | None = None  # analysis.pca.run_pca: the report's PCA panels
    output: str | None = None
    bake_from: str | None = None  # the full-precision checkpoint REBIRTH bakes the edit into (bake_source)
    _plan: EditPlanFile | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.study is not None:
            self.study.run = self  # its edit, metrics and output are this run's

    @property
    def directions(self) -> Directions | None:
        return getattr(self.choice, "directions", None)

    @property
    def selection(self) -> LayerSelection | None:
        return getattr(self.choice, "selection", None)

    @property
    def search(self) -> dict | None:
        """The kernel grid's trials (``optimize.search = "grid"``)."""
        grid = getattr(self.choice, "grid", None)
        return None if grid is None else grid.to_dict()

    @property
    def study(self):
        """The study's outcome (optimize.base.OptimizeResult), or None."""
        return getattr(self.choice, "result", None)

    @property
    def metrics(self) -> dict[str, dict]:
        if self.after is None:
            raise ObliteratusError("this run has no metrics: a --worker run only runs trials")
        return {"before": self.before.metrics, "after": self.after.metrics}

    def record(self) -> RunRecord:
        """The typed run record (``obliteratus.json``)."""
        if self.edit is None:
            raise ObliteratusError("a --worker run only ran trials: it has no edit to record or save")
        model = describe(self.loaded)
        model.pop("config")

        settings = saved_settings(self.settings)  # a storage password (or any secret setting) stays out of the file
        return RunRecord.model_validate({
            "tool": "obliteratus",
            "preset": self.preset,
            "settings": settings,
            "model": model,
            **self.choice.sections(),  # directions, selection, optimize
            "edit": self.edit.to_dict(),
            "metrics_before": self.before.metrics,
            "metrics_after": self.after.metrics,
            "timings_s": self.timings,
            "versions": versions(),
            "seed": self.settings.data.seed,
            "splits": {cls: {part: len(getattr(getattr(self.prompts, cls), part)) for part in ("train", "val", "test")}
                       for cls in ("harmful", "harmless")},
        })

    def metadata(self, preset: str | None = None) -> dict:
        """:meth:`record` as a dict (`preset`: another name for the preset)."""
        meta = self.record().model_dump()
        return meta if preset is None else {**meta, "preset": preset}

    def save(self, output: str | Path, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
        """REBIRTH: write the edited model, ``obliteratus.json``, the directions, README.md, the report
        (and the steering files in hook mode) to `output`, atomically (save.save_run); the same files
        as passing ``output=`` to obliterate()."""
        if self.edit is None:
            raise ObliteratusError("a --worker run only ran trials: it has no edit to record or save")
        check_output(output, overwrite, source=self.loaded.source)
        bake = self.bake_source()
        if bake is not None:  # the checkpoint REBIRTH reads: never written, never overlapped
            check_output(output, overwrite, source=bake)
        with timed(self.timings, "rebirth", reporter or Reporter()):
            start = time.perf_counter()

            def record() -> RunRecord:  # called once the weights are on disk: includes their write time
                self.timings["rebirth"] = time.perf_counter() - start
                return self.record()

            self.output = str(save_run(self.loaded.model, self.loaded.saves_with, output, record,
                                       self.choice.tensors(), overwrite, steering=getattr(self.choice, "steering", None),
                                       pca=self.pca, plan=self.edit_plan(), weights=self.baked_weights(bake)))
        return Path(self.output)

    def bake_source(self) -> str | None:
        """The checkpoint directory REBIRTH bakes the edit plan into instead of saving the model in
        memory: ``bake_from`` when given, else the loaded directory when the weights in memory are
        quantized or offloaded (their full-precision values are on disk, not here); None otherwise."""
        if self.bake_from is not None:
            return self.bake_from
        held = weights_held(self.loaded.adapter)
        if held is None:
            return None
        if Path(self.loaded.path).is_dir():
            return self.loaded.path
        raise ConfigError(f"the model's weights are {held}, so REBIRTH bakes the edit into the full-precision "
                          f"checkpoint, and {self.loaded.source!r} is not a local checkpoint directory: pass "
                          "bake_from (--bake-from DIR)")

    def baked_weights(self, source: str | None):
        """save_run's weight writer when the edit is baked into `source` (:meth:`bake_source`), else None.
        The plan's tensor hashes are checked when they are the source's own (the run loaded that directory)."""
        if source is None:
            return None
        plan = self.edit_plan()
        if plan is None and self.edit.variant == "hooks":  # hook mode: the weights unedited, the steering files beside
            plan = EditPlanFile([], {}, {"model_type": getattr(self.loaded.model.config, "model_type", None)})
        if plan is None:
            raise ConfigError(f"the edit is baked into {source}, and it has no plan: "
                              f"{self.edit.ops_missing or 'no weight edit'}")
        prepared = prepare_bake(plan, source)
        same = Path(source).expanduser().resolve() == Path(self.loaded.path).expanduser().resolve()
        return lambda tmp: prepared.fill(tmp, check_hashes=same)

    def edit_plan(self) -> EditPlanFile | None:
        """The edit as a plan to replay on another copy of the model (export/plan.py); None when the
        edit is not a sequence of tensor ops (``edit.ops_missing`` says why). When the run loaded a
        local safetensors checkpoint, the plan holds the sha256 of every edited tensor there."""
        if self.edit is None or not self.edit.ops:
            return None
        if self._plan is None:
            model_type = getattr(getattr(self.loaded.model, "config", None), "model_type", None)
            plan = plan_of(self.loaded.model, self.edit.ops, model_type, self.loaded.source)
            digests = source_digests(plan, self.loaded.path)
            if digests:
                plan.model["sha256"] = digests
            self._plan = plan
        return self._plan


__all__ = ["Reporter", "Run", "timed"]
