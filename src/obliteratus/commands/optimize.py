"""``obliteratus optimize``: the CLI of pipeline.obliterate's study strategy (optimize/strategy.py):
SUMMON → PROBE → mean differences → Optuna study (hooks only) → pick → VERIFY before → EXCISE the
chosen trial into the weights → VERIFY after on the test split → REBIRTH, with the study's options
(--trials, --storage, --pick, --worker, ...); :func:`print_result` prints the study's outcome (also
for a study preset run by ``obliterate``).

With ``--worker`` the process only runs trials (several workers share a PostgreSQL study) and
exits; any later run without it picks and bakes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import Interrupted
from ..optimize.base import OptimizeResult
from ..optimize.study import front_table
from ..pipeline import obliterate
from .common import RichReporter, metrics_table, out
from .options import Opt, settings_options

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
    study = {}  # the study's CLI options are settings (optimize.study.*, in overrides); {} runs the study strategy
    try:
        with RichReporter() as reporter:
            result = obliterate(model, method, str(output) if output else None, overwrite=overwrite, reporter=reporter,
                                overrides=overrides, study=study, run_dir=str(run_dir) if run_dir else None,
                                pick=pick, worker=worker).study
    except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM, cli.main): finished trials are in the storage
        raise Interrupted(f"{str(err) or 'interrupted'}: the study keeps its finished trials; run the same "
                          "command again to resume it") from None
    print_result(result, model, method)


def print_result(result: OptimizeResult, model: str, method: str) -> None:
    """The study's Pareto front, then (unless a worker) the before/after table of the baked trial."""
    out.print(f"study {result.study_name} in {result.storage}")
    chosen = None if result.chosen is None else result.chosen.number
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
