"""Choosing the edit, the study strategy (pipeline.obliterate; the ``optimized`` and ``heretic``
presets, ``obliteratus optimize``): mean differences in DISTILL, the multi-objective Optuna study on
the validation split (hooks only, optimize/trial.py), the pick (confirmed on spare harmful prompts),
and the chosen trial excised into the weights. The driver then verifies it on the test split exactly
as it verifies every other edit, and the record names the study, the storage (password removed) and
the trial. A ``worker`` only runs trials (several workers share a PostgreSQL study); any later run
without it picks and bakes.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from ..analysis.pca import run_pca
from ..data.prompts import encode_texts
from ..directions.base import get_direction_method
from ..directions.driver import distill
from ..errors import ConfigError
from ..excise.apply import excise
from ..excise.dispatch import edit_held
from ..models import ALIASES
from ..models.load import resolve_source
from ..run import timed
from ..settings_file import saved_settings
from . import study as st
from .base import (OptimizeResult, _quiet_interrupts, check_storage, mean_differences, study_options,
                   train_contrast)
from .interrupts import GATE
from .trial import Confirmation, Objective, Scorer, scaled_plan, window_params


def default_study_name(source: str, preset: str) -> str:
    """The study's name when optimize.study.study_name is not set: one per model directory and preset."""
    return f"obliteratus-{Path(source).name}-{Path(preset).stem}"


class StudyEdit:
    """One run's study: built (options validated, storage URL checked) before any work, then called by
    the driver stage by stage."""

    def __init__(self, settings, source: str, preset: str, output: str | None, study: dict | None,
                 run_dir: str | None, pick: int | None, worker: bool):
        self.settings, self.pick_index, self.worker = settings, pick, worker
        self.options = options = study_options(settings, study)
        self.name = options.study_name or default_study_name(source, preset)
        self.run_dir = Path(run_dir) if run_dir else (Path(output).with_name(Path(output).name + ".study") if output
                                                      else Path("obliteratus-runs") / self.name)
        if options.storage:
            check_storage(options.storage)
        self.result: OptimizeResult | None = None
        self.study = self.confirm = None

    def prepare(self, splits, source: str, given: bool, locks: ExitStack) -> None:
        """Every check that needs no model, before the study folder is made; then the study's lock."""
        options = self.options
        self.confirming = options.confirm_prompts > 0 and ((self.pick_index is None and not self.worker)
                                                           or options.confirm_during)
        if self.confirming:
            spare = len(splits[0].spare)
            if spare < options.confirm_prompts:
                raise ConfigError(f"optimize.study.confirm_prompts = {options.confirm_prompts}, but only {spare} "
                                  "harmful prompts are left outside the train/val/test parts; lower it (0 = off), "
                                  "lower --n-train/--n-val/--n-test or add prompts")
        if options.max_directions > 1:
            cap = get_direction_method(self.settings.directions.method).max_directions
            if cap is not None and cap < options.max_directions:
                raise ConfigError(f"optimize.study.max_directions = {options.max_directions} needs a direction "
                                  f"method that gives that many directions; {self.settings.directions.method!r} "
                                  f"gives {cap} (set directions.method, e.g. svd)")
        if not given and source not in ALIASES:
            resolve_source(source)  # a missing model fails before the study folder is made
        self.url = st.storage_url(options.storage, self.run_dir)
        locks.enter_context(st.study_lock(self.url, self.name))  # before any model is loaded

    def distill(self, loaded, cache, prompts, reporter) -> None:
        """The per-layer mean differences [L+1, d] (and with max_directions > 1 a wider basis [k, d])."""
        settings, options = self.settings, self.options
        contrast = train_contrast(loaded, cache, settings, prompts)  # judged once, shared with the basis below
        self.mean_diffs = mean_differences(loaded, cache, settings, prompts, options.orthogonalize, contrast)
        self.basis = None
        if options.max_directions > 1:
            wide = settings.model_copy(update={"directions": settings.directions.model_copy(
                update={"n_directions": options.max_directions})})
            self.basis = distill(loaded, cache, prompts, wide, reporter, contrast=contrast)[0].basis  # [k, d]

    def pca(self, cache) -> dict:
        return run_pca(cache.harmful[:, -1], cache.harmless[:, -1])  # the report's panels

    def choose(self, loaded, prompts, reporter, timings: dict[str, float]) -> None:
        """Run the study (resumed from its storage) and, unless a worker, pick the trial to bake. Ctrl-C
        is held while a storage call runs (optimize/interrupts.py)."""
        with GATE.installed():
            self._choose(loaded, prompts, reporter, timings)

    def _choose(self, loaded, prompts, reporter, timings: dict[str, float]) -> None:
        from sqlalchemy.exc import SQLAlchemyError  # optional extra (optuna's storage)

        settings, options, url, name = self.settings, self.options, self.url, self.name
        adapter, n_layers = loaded.adapter, loaded.adapter.n_layers
        ex, ev = settings.excise, settings.evaluate
        fingerprint = {"model": Path(loaded.source).name, "n_layers": n_layers, "d_model": adapter.d_model,
                       "space": options.space_fingerprint(), "data": settings.data.model_dump(),
                       "probe": settings.probe.model_dump(), "contrast": settings.directions.contrast,
                       "excise": {k: getattr(ex, k) for k in ("lam", "attention", "mlp", "embeddings", "biases")}}
        try:
            self.study = st.open_study(options, url, name, fingerprint)
        except SQLAlchemyError as err:  # e.g. a PostgreSQL server that is not there
            raise st.storage_error("cannot open", url, err) from None
        _quiet_interrupts()
        st.seed(self.study, [window_params(f, n_layers, options) for f in options.seed_windows])
        scorer = Scorer.build(loaded.model, loaded.tokenizer, prompts.encoded["harmful.val"],
                              prompts.encoded["harmless.val"], options, ev.batch_size)
        confirm = None
        if self.confirming:
            confirm_set = encode_texts(loaded.tokenizer, settings, prompts.harmful.spare[:options.confirm_prompts])
            confirm = Confirmation(adapter, scorer, confirm_set, ev.max_new_tokens, self.mean_diffs, ex,
                                   options.confirm_bar, self.basis)
        with timed(timings, "study", reporter):  # the trials' task inside the stage, so its count shows under it
            trials = reporter.task("trials", options.n_trials)
            resumed = min(st.finished_count(self.study), options.n_trials)
            if resumed:  # a resumed study: the bar starts at the trials it already has
                trials(resumed)
            objective = Objective(adapter, scorer, self.mean_diffs, options, ex, self.basis, trials,
                                  confirm if options.confirm_during else None)
            st.run_study(self.study, options.n_trials, objective, url)
        result = self.result = OptimizeResult(settings, options, name, st.redact(url), st.pareto_front(self.study),
                                              timings=timings, n_harmful_val=len(prompts.harmful.val))
        if self.worker:
            return
        if self.pick_index is None and options.confirm_prompts > 0:
            with timed(timings, "confirm", reporter):  # verdicts stored during the study are reused
                chosen, result.strength, result.checks = st.pick_confirmed(
                    self.study, lambda t, strength: confirm(t.params, strength),
                    options.target_refusal, options.confirm_trials, options.confirm_bar, options.confirm_strengths,
                    recount=lambda t, strength: confirm(t.params, strength, exact=True),
                    max_recounts=options.confirm_recounts)
            result.picked_by = "confirmed" if any(c["passed"] for c in result.checks) else "fewest confirmed refusals"
        else:
            chosen = st.pick(self.study, self.pick_index, options.target_refusal)
            result.picked_by = "target" if self.pick_index is None else "index"
        result.chosen = chosen

    def excise(self, loaded, prompts, reporter):
        """The chosen trial's plan at its confirmed strength, excised into the weights."""
        result, ex = self.result, self.settings.excise
        chosen = result.chosen
        self.q, self.plan = scaled_plan(chosen.params, self.mean_diffs, loaded.adapter.n_layers, ex.lam,
                                        result.strength, self.basis)
        edit = edit_held(loaded.adapter, self.q, ex, self.plan) or excise(loaded.adapter, self.q, ex, plan=self.plan)
        edit.details.update(trial=chosen.number, strength=result.strength)
        return edit

    @property
    def per_layer(self) -> bool:
        return self.result.chosen.params["direction_scope"] == "per_layer"

    def sections(self) -> dict:
        """The record's directions, selection and optimize sections (trial counts read now)."""
        result, options = self.result, self.options
        chosen, per_layer = result.chosen, self.per_layer
        k = (self.plan.layer_bases[0] if per_layer else self.q).shape[0]
        index = None if per_layer else chosen.params["direction_index"] + 1.0  # our resid_pre axis
        states = [t.state.name for t in self.study.get_trials(deepcopy=False)]
        return {
            "directions": {"method": "diff_means", "k": k, "scope": chosen.params["direction_scope"], "index": index,
                           "position": -1},
            "selection": {"layer": "per_layer" if per_layer else index, "position": -1, "method": "optuna"},
            "optimize": {"study_name": result.study_name, "storage": result.storage, "trial": chosen.number,
                         "params": chosen.params, "val_refusal": chosen.values[0], "val_kl_first": chosen.values[1],
                         "picked_by": result.picked_by,
                         "confirm": {"prompts": options.confirm_prompts, "checks": result.checks,
                                     "target": options.confirm_bar, "strength": result.strength},
                         "target_refusal": options.target_refusal,
                         "options": {**saved_settings(options), "storage": result.storage},
                         "trials": {s: states.count(s) for s in sorted(set(states))},
                         "pareto": [asdict(r) for r in result.front]},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """What directions.safetensors holds: the mean differences and the chosen basis."""
        plan = self.plan
        basis = torch.stack([plan.layer_bases[i][0] for i in sorted(plan.layer_bases)]) if self.per_layer else self.q
        return {"mean_diffs": self.mean_diffs, "basis": basis}


__all__ = ["StudyEdit", "default_study_name"]
