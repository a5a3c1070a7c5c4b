"""Run Heretic's own optimisation non-interactively (helper of benchmarks/vs_heretic.py).

Executed by the python of the SEPARATE Heretic virtual environment (never by ours), as

    <heretic-venv>/bin/python vs_heretic_driver.py SPEC.json

It does not reimplement anything of Heretic: it writes Heretic's documented ``config.toml`` into
the work directory named by the spec, then calls ``heretic.main.run()`` -- the exact code path of
the ``heretic`` command (model loading, batch size, response prefix, refusal directions, the
Optuna study with its own objective and TPE sampler, trial restoration, merge and save). Only the
interactive questions are answered by this script instead of a person, through the
``prompt_select`` / ``prompt_path`` / ``prompt_text`` names that heretic.main calls:

* "Which trial do you want to use?" -> from the Pareto front Heretic offers, the lowest-KL trial
  whose refusal rate (refusals / evaluation prompts) is at most ``target``; when none is, the
  lowest refusal count, ties by the lowest KL (with target 0 this is simply "lowest refusal count,
  ties by lowest KL"); asked again after saving -> "" (exit).
* "What do you want to do with the decensored model?" -> "Save the model to a local folder", then
  "" (back to the trial menu); the folder is the spec's ``save_dir``; the export strategy is
  ``merge`` (set in config.toml, so Heretic does not ask).
* Any other question raises, so the run can never hang waiting for input.

Timings are taken by wrapping methods of Heretic's classes (Model.__init__, Model.get_residuals_*,
Evaluator.__init__) with wall-clock timers, and from the Optuna trials' own datetime_start /
datetime_complete (the study object and the sampler's arguments are captured by wrapping ``optuna.create_study`` and
the ``TPESampler`` name in heretic.main). Everything
is written to the spec's ``result`` JSON file.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time


def _timed(owner, name: str, label: str, events: list) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            events.append({"phase": label, "start": start, "end": time.time()})

    setattr(owner, name, wrapper)


def _pick(front: list, target: float):
    def rate(t) -> float:
        return t.user_attrs["refusals"] / max(int(t.user_attrs["n_bad_prompts"]), 1)

    within = [t for t in front if rate(t) <= target + 1e-12]
    if within:
        return min(within, key=lambda t: (t.user_attrs["kl_divergence"], t.user_attrs["refusals"],
                                          t.user_attrs["index"]))
    return min(front, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"],
                                     t.user_attrs["index"]))


def _trial_row(t) -> dict:
    start, end = t.datetime_start, t.datetime_complete
    return {
        "number": t.number, "index": t.user_attrs.get("index"), "state": t.state.name,
        "start": start.timestamp() if start else None, "end": end.timestamp() if end else None,
        "seconds": (end - start).total_seconds() if start and end else None,
        "refusals": t.user_attrs.get("refusals"), "n_bad_prompts": t.user_attrs.get("n_bad_prompts"),
        "base_refusals": t.user_attrs.get("base_refusals"), "kl_divergence": t.user_attrs.get("kl_divergence"),
        "values": list(t.values) if t.values else None, "params": dict(t.params),
    }


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    t0 = time.time()
    os.makedirs(spec["workdir"], exist_ok=True)
    os.chdir(spec["workdir"])  # Heretic reads ./config.toml and writes its checkpoints relative to cwd

    import tomli_w  # a dependency of heretic-llm

    with open("config.toml", "wb") as fh:
        tomli_w.dump(spec["settings"], fh)
    # Heretic's Settings parse the command line (pydantic-settings CliSettingsSource): leave it empty.
    sys.argv = ["heretic"]

    from importlib.metadata import version

    import heretic.evaluator as h_evaluator
    import heretic.main as h_main
    import heretic.model as h_model
    import optuna

    events: list[dict] = []
    _timed(h_model.Model, "__init__", "load", events)
    _timed(h_model.Model, "get_residuals_mean", "directions", events)
    _timed(h_model.Model, "get_residuals_batched", "directions", events)
    _timed(h_evaluator.Evaluator, "__init__", "base_evaluation", events)

    captured: dict = {}
    create_study = optuna.create_study
    tpe_sampler = h_main.TPESampler

    def capture_study(*args, **kwargs):
        study = create_study(*args, **kwargs)
        captured["study"] = study
        return study

    def capture_sampler(*args, **kwargs):
        captured["sampler"] = {"class": tpe_sampler.__name__, **{k: repr(v) for k, v in kwargs.items()}}
        return tpe_sampler(*args, **kwargs)

    optuna.create_study = capture_study
    h_main.TPESampler = capture_sampler

    target = float(spec["target"])
    state: dict = {"chosen": None, "front": [], "saved": False, "marks": {}}

    def mark(name: str) -> None:
        state["marks"].setdefault(name, time.time())

    def select(message: str, choices: list):
        values = [getattr(c, "value", c) for c in choices]
        if message.startswith("How would you like to proceed"):
            return "restart"  # a stale checkpoint (the caller deletes it beforehand anyway)
        if message.startswith("Which trial do you want to use"):
            if state["chosen"] is not None:
                return ""
            mark("study_done")
            front = [v for v in values if not isinstance(v, str)]
            state["front"] = front
            state["chosen"] = _pick(front, target)
            mark("restore_start")
            return state["chosen"]
        if message.startswith("What do you want to do with the decensored model"):
            if not state["saved"]:
                mark("restore_end")
                state["saved"] = True
                return "Save the model to a local folder"
            mark("export_end")
            return ""
        raise RuntimeError(f"vs_heretic_driver: unexpected Heretic question {message!r}")

    def path(message: str) -> str:
        mark("export_start")
        return spec["save_dir"]

    def text(message: str, *args, **kwargs) -> str:
        raise RuntimeError(f"vs_heretic_driver: unexpected Heretic question {message!r}")

    h_main.prompt_select = select
    h_main.prompt_path = path
    h_main.prompt_text = text

    h_main.run()
    t_end = time.time()

    study = captured.get("study")
    if study is None or state["chosen"] is None:
        raise SystemExit("vs_heretic_driver: Heretic finished without running a study / choosing a trial")
    chosen = state["chosen"]
    result = {
        "heretic_version": version("heretic-llm"),
        "started": t0, "finished": t_end,
        "events": events, "marks": state["marks"],
        "sampler": captured.get("sampler"),
        # the settings Heretic actually used (batch size and response prefix resolved)
        "settings": json.loads(study.user_attrs["settings"]),
        "trials": [_trial_row(t) for t in study.trials],
        "front": [_trial_row(t) for t in state["front"]],
        "chosen": _trial_row(chosen),
        "pick_rule": f"Pareto front; lowest KL with refusals/n <= {target}, else lowest refusals, ties lowest KL",
        "save_dir": spec["save_dir"],
    }
    with open(spec["result"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
