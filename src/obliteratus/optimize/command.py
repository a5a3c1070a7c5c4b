"""``obliteratus optimize``: the CLI of pipeline.obliterate's study strategy (optimize/strategy.py):
SUMMON → PROBE → mean differences → Optuna study (hooks only) → pick → VERIFY before → EXCISE the
chosen trial into the weights → VERIFY after on the test split → REBIRTH, with the study's options
(--trials, --storage, --pick, --worker, ...), and the helpers the strategy uses.

With ``--worker`` the process only runs trials (several workers share a PostgreSQL study) and
exits; any later run without it picks and bakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import sys
from typing import Annotated, Optional

import torch
import typer

from ..cli_options import Opt, settings_options
from .options import StudyOptions


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
    from ..settings import validated

    return validated(StudyOptions, {**base, **{k: v for k, v in (updates or {}).items() if v is not None}},
                     "optimize.study options")


def check_storage(url: str) -> None:
    """A bad --storage URL fails before any model loads: it must parse, name a database whose driver is
    installed and, for SQLite, a file in an existing folder."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from ..errors import ConfigError
    from .study import redact

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
    import logging

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
    from ..directions.diff_means import mean_difference

    if contrast is None:
        contrast = train_contrast(loaded, cache, settings, prompts)
    diffs = mean_difference(contrast.positive, contrast.negative)[-1]  # [L+1, d]
    if not orthogonalize:
        return diffs
    return orthogonal_to(diffs, contrast.negative[:, -1].double().mean(0))


def train_contrast(loaded, cache, settings, prompts):
    """The contrast groups (directions/driver.py) of the train activations in `cache`."""
    from ..directions.driver import contrast_groups

    train = {cls: prompts.encoded[f"{cls}.train"] for cls in ("harmful", "harmless")}
    return contrast_groups(loaded.adapter, loaded.tokenizer, cache, settings, train)


def orthogonal_to(diffs: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Row-wise: r̂ − (r̂·ĝ)ĝ, renormalised, for r = `diffs` [L+1, d] and g = `means` [L+1, d]."""
    r = torch.nn.functional.normalize(diffs.double(), dim=-1)
    g = torch.nn.functional.normalize(means.double(), dim=-1)
    r = r - (r * g).sum(-1, keepdim=True) * g
    return torch.nn.functional.normalize(r, dim=-1).to(diffs.dtype)


def run_optimize(model, preset: str = "optimized", output: str | None = None, overwrite: bool = False,
                 overrides: dict | None = None, study: dict | None = None, run_dir: str | None = None,
                 pick_index: int | None = None, worker: bool = False, reporter=None) -> OptimizeResult:
    """pipeline.obliterate with the study strategy, whatever the preset (an SQLite study stays locked,
    study.study_lock, until it returns); the study's outcome, its run in ``.run``."""
    from ..pipeline import obliterate

    run = obliterate(model, preset, output, overwrite=overwrite, reporter=reporter, overrides=overrides,
                     study=study or {}, run_dir=run_dir, pick=pick_index, worker=worker)
    return run.study


STUDY = "optimize.study."


@settings_options(Opt(STUDY + "n_trials", ("--trials",), name="trials"),
                  Opt(STUDY + "n_startup_trials", ("--startup-trials",), name="startup_trials"),
                  Opt(STUDY + "seed", ("--study-seed",), name="study_seed"), STUDY + "storage", STUDY + "study_name",
                  Opt(STUDY + "target_refusal", ("--target",), name="target"), STUDY + "refusal_tokens",
                  "model.dtype", "model.device", "data.n_train", "data.n_val", "data.n_test",
                  "evaluate.max_new_tokens")
def optimize(
    model: Annotated[str, typer.Argument(help="Alias, local HF directory, .gguf file or hub id.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Preset name or .toml file.")] = "optimized",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the edited model.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where the default SQLite study lives "
                                                         "(default <output>.study).")] = None,
    pick: Annotated[Optional[int], typer.Option(help="Bake this trial number instead of the default pick.")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Only run trials (shared study), then exit.")] = False,
    overrides: dict | None = None,
) -> None:
    """Search per-layer ablation kernels with a multi-objective Optuna study (refusal, KL) on the
    validation prompts, print the Pareto front, bake the picked trial and verify it on the test split.
    The study resumes from its storage; --storage postgresql://… shares it between workers."""
    from ..cli import RichReporter

    study = {}  # the study's CLI options are settings (optimize.study.*, in overrides); {} runs the study strategy
    from ..errors import Interrupted

    try:
        with RichReporter() as reporter:
            result = run_optimize(model, method, str(output) if output else None, overwrite, overrides, study,
                                  str(run_dir) if run_dir else None, pick, worker, reporter)
    except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM, cli.main): finished trials are in the storage
        raise Interrupted(f"{str(err) or 'interrupted'}: the study keeps its finished trials; run the same "
                          "command again to resume it") from None
    print_result(result, model, method)


def print_result(result: OptimizeResult, model: str, method: str) -> None:
    """The study's Pareto front, then (unless a worker) the before/after table of the baked trial."""
    from ..cli import metrics_table, out

    out.print(f"study {result.study_name} in {result.storage}")
    chosen = None if result.chosen is None else result.chosen.number
    from .study import front_table

    out.print(front_table(result.front, chosen, result.n_harmful_val))
    if result.chosen is None:
        return
    options = result.options
    for c in result.checks:
        out.print(f"confirm trial {c['number']} at strength {c.get('strength', 1.0):g} (val refusal "
                  f"{c['val_refusal']:.3f}, KL {c['kl']:.3f}) on {options.confirm_prompts} spare harmful prompts: "
                  f"refusal {'' if c['passed'] else '>= '}{c['confirm_refusal']:.3f} "
                  f"-> {'pass' if c['passed'] else 'fail'} (<= {options.confirm_bar:g})")
    at = "" if result.strength == 1.0 else f" at strength {result.strength:g}"
    out.print(f"picked trial {chosen}{at} ({result.picked_by})")
    out.print(metrics_table(result.before.metrics, result.after.metrics, f"{model} · {method} · trial {chosen}"))
    if result.output:
        out.print(f"saved to {result.output}", soft_wrap=True)


def _typer_main() -> None:
    """`python -m obliteratus.optimize.command MODEL …`: the command alone, with the CLI's error handling."""
    from ..cli import app, main as cli_main

    if not any("optimize" in (c.name, getattr(c.callback, "__name__", None)) for c in app.registered_commands):
        app.command(name="optimize")(optimize)
    sys.argv[1:1] = ["optimize"]
    cli_main()


if __name__ == "__main__":
    _typer_main()
