"""``obliteratus optimize``: SUMMON → PROBE → mean differences → Optuna study (hooks only) → pick →
EXCISE the chosen trial into the weights → VERIFY on the test split → REBIRTH.

The study runs on the validation split (optimize/trial.py), the chosen edit is measured on the
held-out test split exactly as ``obliterate`` measures its edits (pipeline.evaluate_model), and
the saved ``obliteratus.json`` names the study, the storage (password removed) and the trial.
With ``--worker`` the process only runs trials (several workers share a PostgreSQL study) and
exits; any later run without it picks and bakes.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
import sys
from typing import Annotated, Optional

import torch
import typer

from .options import StudyOptions


@dataclass
class OptimizeResult:
    settings: object
    options: StudyOptions
    study_name: str
    storage: str  # redacted
    front: list
    chosen: object | None = None  # optuna FrozenTrial
    before: object | None = None  # evaluate.Evaluation
    after: object | None = None
    edit: object | None = None  # excise.EditReport
    timings: dict[str, float] = field(default_factory=dict)
    output: str | None = None
    n_harmful_val: int = 0
    picked_by: str = ""  # "index" (--pick), "target", "confirmed" or "fewest confirmed refusals"
    checks: list = field(default_factory=list)  # confirmation of the pick (study.pick_confirmed), one dict each
    strength: float = 1.0  # the confirmed strength multiplier the pick is baked at


def study_options(settings, updates: dict | None = None) -> StudyOptions:
    """``settings.optimize.study`` (once config.py mounts it) with `updates` applied, validated."""
    mounted = getattr(settings.optimize, "study", None)
    # field by field (not model_dump), so that the presets test's read spy sees every option used
    base = ({name: getattr(mounted, name) for name in StudyOptions.model_fields} if isinstance(mounted, StudyOptions)
            else dict(mounted or {}))
    from ..config import validated

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


def run_optimize(model: str, preset: str = "optimized", output: str | None = None, overwrite: bool = False,
                 overrides: dict | None = None, study: dict | None = None, run_dir: str | None = None,
                 pick_index: int | None = None, worker: bool = False, reporter=None) -> OptimizeResult:
    """The whole command; an SQLite study stays locked (study.study_lock) until it returns."""
    with ExitStack() as locks:
        return _run_optimize(model, preset, output, overwrite, overrides, study, run_dir, pick_index, worker, reporter,
                             locks)


def _run_optimize(model: str, preset: str, output: str | None, overwrite: bool, overrides: dict | None,
                  study: dict | None, run_dir: str | None, pick_index: int | None, worker: bool, reporter,
                  locks: ExitStack) -> OptimizeResult:
    from ..analysis.pca import run_pca
    from ..config import resolve_settings
    from ..errors import ConfigError
    from ..evaluate import evaluate_model
    from ..excise.apply import excise
    from ..models import ALIASES
    from ..models.load import resolve_source, summon
    from ..batching import max_positions
    from ..pipeline import Reporter, _timed, distill, encode_texts, prepare_prompts, probe, split_prompt_sets
    from ..presets import load_preset
    from ..save import check_output
    from sqlalchemy.exc import SQLAlchemyError

    from . import study as st
    from .trial import Confirmation, Objective, Scorer, scaled_plan, window_params

    reporter = reporter or Reporter()
    settings = resolve_settings(load_preset(preset), overrides)
    options = study_options(settings, study)
    if output is not None and not worker:
        check_output(output, overwrite, source=model)
    name = options.study_name or f"obliteratus-{Path(model).name}-{Path(preset).stem}"
    run = Path(run_dir) if run_dir else (Path(output).with_name(Path(output).name + ".study") if output
                                         else Path("obliteratus-runs") / name)
    if options.storage:
        check_storage(options.storage)
    splits = split_prompt_sets(settings)  # every check that needs no model, before the study folder is made
    confirming = options.confirm_prompts > 0 and ((pick_index is None and not worker) or options.confirm_during)
    if confirming:
        spare = len(splits[0].spare)
        if spare < options.confirm_prompts:
            raise ConfigError(f"optimize.study.confirm_prompts = {options.confirm_prompts}, but only {spare} "
                              "harmful prompts are left outside the train/val/test parts; lower it (0 = off), lower "
                              "--n-train/--n-val/--n-test or add prompts")
    if options.max_directions > 1:
        from ..directions.base import get_direction_method

        cap = get_direction_method(settings.directions.method).max_directions
        if cap is not None and cap < options.max_directions:
            raise ConfigError(f"optimize.study.max_directions = {options.max_directions} needs a direction method "
                              f"that gives that many directions; {settings.directions.method!r} gives {cap} "
                              "(set directions.method, e.g. svd)")
    if model not in ALIASES:
        resolve_source(model)  # a missing model fails before the study folder is made
    url = st.storage_url(options, run)
    locks.enter_context(st.study_lock(url, name))  # before any model is loaded
    timings: dict[str, float] = {}
    with _timed(timings, "summon", reporter):
        loaded = summon(model, settings.model)
    adapter, n_layers = loaded.adapter, loaded.adapter.n_layers
    with _timed(timings, "probe", reporter):
        prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
        cache = probe(loaded, prompts, settings, reporter)
    with _timed(timings, "distill", reporter):
        contrast = train_contrast(loaded, cache, settings, prompts)  # judged once, shared with the basis below
        mean_diffs = mean_differences(loaded, cache, settings, prompts, options.orthogonalize, contrast)  # [L+1, d]
        basis = None
        if options.max_directions > 1:
            wide = settings.model_copy(update={"directions": settings.directions.model_copy(
                update={"n_directions": options.max_directions})})
            basis = distill(loaded, cache, prompts, wide, reporter, contrast=contrast)[0].basis  # [k, d]
    pca = None if output is None else run_pca(cache.harmful[:, -1], cache.harmless[:, -1])  # the report's panels
    del cache
    ex, ev = settings.excise, settings.evaluate
    fingerprint = {"model": Path(loaded.source).name, "n_layers": n_layers, "d_model": adapter.d_model,
                   "space": options.space_fingerprint(), "data": settings.data.model_dump(),
                   "probe": settings.probe.model_dump(), "contrast": settings.directions.contrast,
                   "excise": {k: getattr(ex, k) for k in ("lam", "attention", "mlp", "embeddings", "biases")}}
    try:
        study_ = st.open_study(options, url, name, fingerprint)
    except SQLAlchemyError as err:  # e.g. a PostgreSQL server that is not there
        raise ConfigError(f"cannot open the study storage {st.redact(url)}: "
                          f"{str(getattr(err, 'orig', None) or err).splitlines()[0]}") from None
    _quiet_interrupts()
    st.seed(study_, [window_params(f, n_layers, options) for f in options.seed_windows])
    scorer = Scorer.build(loaded.model, loaded.tokenizer, prompts.encoded["harmful.val"],
                          prompts.encoded["harmless.val"], options, ev.batch_size)
    confirm = None
    if confirming:
        confirm_set = encode_texts(loaded.tokenizer, settings, prompts.harmful.spare[:options.confirm_prompts])
        confirm = Confirmation(adapter, scorer, confirm_set, ev.max_new_tokens, mean_diffs, ex, options.confirm_bar,
                               basis)
    objective = Objective(adapter, scorer, mean_diffs, options, ex, basis, reporter.task("trials", options.n_trials),
                          confirm if options.confirm_during else None)
    with _timed(timings, "study", reporter):
        st.run_study(study_, options.n_trials, objective, url)
    result = OptimizeResult(settings, options, name, st.redact(url), st.pareto_front(study_), timings=timings,
                            n_harmful_val=len(prompts.harmful.val))
    if worker:
        return result
    if pick_index is None and options.confirm_prompts > 0:
        bar = options.confirm_bar
        with _timed(timings, "confirm", reporter):  # verdicts stored during the study are reused
            chosen, result.strength, result.checks = st.pick_confirmed(
                study_, lambda t, strength: confirm(t.params, strength),
                options.target_refusal, options.confirm_trials, bar, options.confirm_strengths,
                recount=lambda t, strength: confirm(t.params, strength, exact=True),
                max_recounts=options.confirm_recounts)
        result.picked_by = "confirmed" if any(c["passed"] for c in result.checks) else "fewest confirmed refusals"
    else:
        chosen = st.pick(study_, pick_index, options.target_refusal)
        result.picked_by = "target" if pick_index is None else "index"
    result.chosen = chosen
    step = reporter.task
    with _timed(timings, "verify_before", reporter):
        before = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                                prompts.part("harmless", "test"), ev, None, step, make_reference=True)
        ref = before.reference
    with _timed(timings, "excise", reporter):
        q, plan = scaled_plan(chosen.params, mean_diffs, n_layers, ex.lam, result.strength, basis)
        edit = excise(adapter, q, ex, plan=plan)
        edit.details.update(trial=chosen.number, strength=result.strength)
    with _timed(timings, "verify_after", reporter):
        after = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                               prompts.part("harmless", "test"), ev, ref, step)
    result.before, result.after, result.edit = before, after, edit
    if output is not None:
        result.output = _save(result, loaded, prompts, preset, output, overwrite, q, plan, mean_diffs, study_, pca)
    return result


def _save(result: OptimizeResult, loaded, prompts, preset: str, output: str, overwrite: bool, q, plan, mean_diffs,
          study_, pca: dict | None = None) -> str:
    from ..models.load import describe
    from ..save import save_run, versions

    chosen, options = result.chosen, result.options
    start = time.perf_counter()
    per_layer = chosen.params["direction_scope"] == "per_layer"
    k = (plan.layer_bases[0] if per_layer else q).shape[0]

    def metadata() -> dict:
        result.timings["rebirth"] = time.perf_counter() - start
        model = describe(loaded)
        model.pop("config")
        index = None if per_layer else chosen.params["direction_index"] + 1.0  # our resid_pre axis
        states = [t.state.name for t in study_.get_trials(deepcopy=False)]
        return {
            "tool": "obliteratus", "preset": preset, "settings": result.settings.model_dump(), "model": model,
            "directions": {"method": "diff_means", "k": k, "scope": chosen.params["direction_scope"], "index": index,
                           "position": -1},
            "selection": {"layer": "per_layer" if per_layer else index, "position": -1, "method": "optuna"},
            "edit": result.edit.to_dict(),
            "metrics_before": result.before.metrics, "metrics_after": result.after.metrics,
            "optimize": {"study_name": result.study_name, "storage": result.storage, "trial": chosen.number,
                         "params": chosen.params, "val_refusal": chosen.values[0], "val_kl_first": chosen.values[1],
                         "picked_by": result.picked_by,
                         "confirm": {"prompts": options.confirm_prompts, "checks": result.checks,
                                     "target": options.confirm_bar, "strength": result.strength},
                         "target_refusal": options.target_refusal,
                         "options": {**options.model_dump(), "storage": result.storage},
                         "trials": {s: states.count(s) for s in sorted(set(states))},
                         "pareto": [asdict(r) for r in result.front]},
            "timings_s": result.timings, "versions": versions(), "seed": result.settings.data.seed,
            "splits": {cls: {part: len(getattr(getattr(prompts, cls), part)) for part in ("train", "val", "test")}
                       for cls in ("harmful", "harmless")},
        }

    tensors = {"mean_diffs": mean_diffs}
    tensors["basis"] = torch.stack([plan.layer_bases[i][0] for i in sorted(plan.layer_bases)]) if per_layer else q
    return str(save_run(loaded.model, loaded.tokenizer, output, metadata, tensors, overwrite, pca=pca))


def optimize(
    model: Annotated[str, typer.Argument(help="Alias, local HF directory, .gguf file or hub id.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Preset name or .toml file.")] = "optimized",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the edited model.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    trials: Annotated[Optional[int], typer.Option(help="Finished trials the study stops at (all workers).")] = None,
    startup_trials: Annotated[Optional[int], typer.Option(help="Random start-up trials before TPE.")] = None,
    study_seed: Annotated[Optional[int], typer.Option(help="TPE seed.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///<run-dir>/study.db); "
                                                        "postgresql://... shares the study between workers.")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Default obliteratus-<model>-<preset>.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where the default SQLite study lives "
                                                         "(default <output>.study).")] = None,
    pick: Annotated[Optional[int], typer.Option(help="Bake this trial number instead of the default pick.")] = None,
    target: Annotated[Optional[float], typer.Option(help="Default pick: lowest KL with val refusal <= target.")] = None,
    refusal_tokens: Annotated[Optional[int], typer.Option(help="Tokens without a refusal marker = answered.")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Only run trials (shared study), then exit.")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Train prompts per class.")] = None,
    n_val: Annotated[Optional[int], typer.Option(help="Validation prompts per class (the study's prompts).")] = None,
    n_test: Annotated[Optional[int], typer.Option(help="Held-out test prompts per class (VERIFY only).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens generated per test prompt.")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Any setting, e.g. --set excise.lam=2")] = None,
) -> None:
    """Search per-layer ablation kernels with a multi-objective Optuna study (refusal, KL) on the
    validation prompts, print the Pareto front, bake the picked trial and verify it on the test split.
    The study resumes from its storage; --storage postgresql://… shares it between workers."""
    from ..cli import RichReporter, gather

    overrides = gather({"model.dtype": dtype, "model.device": device, "data.n_train": n_train, "data.n_val": n_val,
                        "data.n_test": n_test, "evaluate.max_new_tokens": max_new_tokens}, sets)
    study = {"n_trials": trials, "n_startup_trials": startup_trials, "seed": study_seed, "storage": storage,
             "study_name": study_name, "target_refusal": target, "refusal_tokens": refusal_tokens}
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
