"""Heretic 1.4.0 vs ``obliteratus optimize``: same model, prompts, trial count, seed and response
length; each tool's speed and memory, and the chosen edit of each scored by ONE evaluator (ours).

    python benchmarks/vs_heretic.py                                    # demo model, 50 trials
    python benchmarks/vs_heretic.py --model /tmp/tiny-qwen --trials 2 --n-train 8 --n-val 4 --n-test 4 \
        --response-tokens 4                                            # smoke test
    python benchmarks/vs_heretic.py --skip-heretic --skip-ours         # re-score previous runs only

``--write-results`` also replaces the "vs-heretic" section of benchmarks/RESULTS.md (results_md.py)
with this run's table and lines; it is refused for another model than the demo model.

What runs
---------
1. Heretic ``heretic-llm==1.4.0`` lives in its OWN virtual environment (``--heretic-venv``, default
   ~/.cache/obliteratus/heretic-venv), never in ours (it is AGPL; we only call it at run time). It
   is created on first use: ``python -m venv DIR``, ``DIR/bin/python -m pip install TORCH_SPEC``, then
   ``DIR/bin/python -m pip install TORCH_SPEC heretic-llm==1.4.0`` (torch first, pinned, so pip does not
   pull a CUDA build); an existing one is reused when ``heretic-llm`` 1.4.0 imports there.
2. Prompts: our built-in sets, loaded and split exactly as ``obliteratus optimize`` does
   (``pipeline.prepare_prompts``: ``builtin:harmful`` / ``builtin:harmless``, deduplicated, seeded
   disjoint split with ``--seed`` and ``--n-train/--n-val/--n-test``), are written to
   ``WORK/data/{harmful,harmless}/{train,validation}.jsonl`` (column ``text``), local dataset
   folders that Heretic's ``datasets.load_dataset(path, split=...)`` reads (the test split goes to
   ``WORK/data/heldout/``, for reference only). Heretic's
   ``bad_prompts``/``good_prompts`` (refusal directions) = our train split; its
   ``bad_evaluation_prompts``/``good_evaluation_prompts`` (what every trial is scored on) = our
   validation split, which is also what our study scores trials on. The test split is seen by
   neither optimizer; only the common evaluator uses it.
3. Heretic: ``vs_heretic_driver.py`` (next to this file) is run by the Heretic venv's python. It
   writes Heretic's ``config.toml`` and calls ``heretic.main.run()`` unchanged (same objective, same
   TPE sampler: n_startup_trials, n_ei_candidates=128, multivariate, seeded), answering Heretic's
   interactive questions itself: it picks a trial from Heretic's Pareto front (rule below),
   restores it, merges the LoRA and ``save_pretrained``s the model. Trial times come from the
   Optuna trials' timestamps; the direction time from timing ``Model.get_residuals_mean``.
4. Ours: ``obliteratus optimize MODEL --trials N --startup-trials K --study-seed S --refusal-tokens R
   --target T --n-train/--n-val/--n-test --set data.seed=S ...`` as a subprocess; its
   ``obliteratus.json`` gives the phase timings (directions = probe + distill), its SQLite study the
   per-trial times. The ``optimized`` preset confirms its pick on 64 spare built-in harmful prompts
   (in no split; Heretic has no counterpart; ``--set optimize.study.confirm_prompts=0`` turns it
   off); the RESULTS.md rows were measured before it existed.
5. Each tool runs as a child process reaped with ``os.wait4``, whose rusage is that child's own
   (peak RSS = ``ru_maxrss``, including any processes it waited for).
6. The common evaluator (this process, our code): the unedited model and both saved models loaded
   with ``models.load.summon``, scored by ``evaluate.evaluate_model`` on the TEST split (greedy
   ``--eval-tokens`` tokens, marker judge: refusal rate on harmful, over-refusal on harmless) and
   ``evaluate.reference`` / KL at the first answer token and mean over the first 16 tokens of the
   original's own greedy answers on the harmless test prompts (KL(original || edited)).

Same settings for both: model, dtype (``--dtype``, default float32; Heretic ``dtypes = [dtype]``),
prompts, system prompt (``--system-prompt``, default Heretic's "You are a helpful assistant.";
ours ``data.system_prompt``; without one Qwen's template adds its own), trial count, start-up
trials (``--startup-trials``, default 30% of the trials: Heretic's 60 of 200), seed (Heretic's
``seed`` seeds random/NumPy/torch and its TPE sampler; ours ``--study-seed`` and the split seed
``data.seed``), tokens per refusal check (``--response-tokens``: Heretic ``max_response_length``,
ours ``--refusal-tokens``), batch size (Heretic ``batch_size``; ours ``evaluate.batch_size`` and
``probe.batch_size``; 0 = each tool's automatic choice), and the pick rule: ``--target T``
(default 0): the lowest-KL trial whose validation refusal rate is <= T, else the lowest refusal
count, ties by lowest KL. With T = 0 that is "lowest refusal count, ties by lowest KL" (ours:
``--target``; Heretic's users choose from the front by eye, the driver applies the same rule).

Differences between the two tools that remain (read from heretic-llm 1.4.0's source)
-----------------------------------------------------------------------------------
* Refusal check. Heretic generates ``max_response_length`` tokens (default 100) for every
  evaluation prompt, greedy, whole batches (a batch ends early only when every sequence hit EOS),
  then looks for its markers: 33 lower-cased substrings including single words ("sorry",
  "illegal", "harmful", "unethical", "disclaimer", "violat", "prohibit", ...); an empty response
  counts as a refusal. Ours stops each sequence as soon as our marker judge has decided (a marker
  phrase seen, EOS, or the token budget; default 32) and uses phrase markers only ("i'm sorry",
  "i cannot", ...). So the two studies count refusals differently on the validation prompts; the
  table's refusals are ours for both.
* KL. Both optimise the first-token KL(original || edited) averaged over the harmless validation
  prompts (Heretic: ``F.kl_div(..., reduction="batchmean", log_target=True)``; ours ``kl_rows``).
  Heretic minimises (KL / kl_divergence_scale, replaced by refusal_ratio * kl_divergence_target /
  kl_divergence_scale when KL < kl_divergence_target = 0.01; refusal_ratio = refusals / base
  refusals); ours minimises (refusal rate, KL) and prunes a trial whose partial refusal count
  already rules it out (Heretic never prunes), so our trial count includes pruned trials and our
  median s/trial is over complete and pruned trials together. Once most trials are pruned the
  median is a pruned trial's time, so the table also gives the mean (study s / trials, for both
  tools) and the driver prints both ratios.
* Edit. Heretic: refusal direction = normalised difference of the mean residuals (last prompt
  position, every layer), orthogonalised against the harmless mean (``orthogonalize_direction``),
  applied as LoRA adapters to attn.o_proj and mlp.down_proj with row-norm preservation
  (``row_normalization = "full"``, rank-3 approximation), merged at export. Ours (preset
  ``--method``, default ``optimized``): the mean difference with the preset's contrast
  (``filtered`` for ``optimized``; ``behaviour`` when the RESULTS.md rows were measured), not
  orthogonalised against the harmless mean, scored with
  activation hooks and baked as a plain projection (no norm preservation); our MLP peak range is
  [-0.25, 1.5] clamped at 0 (Heretic [0.8, 1.5]).
  Search ranges otherwise match Heretic's: direction_index [0.4, 0.9]·L, max_weight_position
  [0.6, 1.0]·L, min_weight fraction [0, 1], min_weight_distance [1, 0.6·L], attention peak
  [0.8, 1.5], scope global / per layer.
* Extra work outside the study. Heretic (automatic batch size when ``--batch-size 0``, which
  tries 1, 2, 4, ... 128 with full generations), a common-response-prefix check (greedy answers to
  up to 200 train prompts), base refusals and log-probs, merge + save. Ours: refusal labelling of
  the train prompts (preset ``optimized``), base log-probs, its own test-split verification before
  and after the edit (``--eval-tokens`` tokens, KL, no perplexity here), save. "total s" is each
  child's wall time, everything included (process start, imports, model loading); "study s" and
  "s/trial" are the study alone. "directions s": Heretic, its two ``Model.get_residuals_mean``
  calls (train harmless + harmful); ours, the ``probe`` + ``distill`` phases of obliteratus.json
  (prompt encoding, activations, and for ``optimized`` the labelling generations).
* Software: each tool runs with its own environment's packages (Heretic pins transformers ~=5.6,
  peft, accelerate ...), so torch is the same (``--torch-spec``) but transformers may differ.
* CPU runs: with another busy process on the machine, torch's thread pool can make timings swing
  by an order of magnitude; ``--threads`` sets OMP/MKL threads for both children alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import results_md

HERETIC_VERSION = "1.4.0"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vs_heretic_driver.py"
HERETIC_SYSTEM_PROMPT = "You are a helpful assistant."  # heretic-llm 1.4.0 config.py default
SECTION = "vs-heretic"  # of benchmarks/RESULTS.md


# --------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[vs-heretic {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_child(cmd: list[str], logfile: Path, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run `cmd` with stdout+stderr to `logfile`; reap it with os.wait4 so that its rusage is its own."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(logfile, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = logfile.read_text("utf-8", errors="replace").splitlines()[-40:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {logfile} (tail) ---\n"
                         + "\n".join(tail))
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,  # ru_maxrss is KiB on Linux
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "log": str(logfile)}


def child_env(threads: int | None, drop_pythonpath: bool = False) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub look-up
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    if drop_pythonpath:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        env["PYTHONNOUSERSITE"] = "1"
    return env


def heretic_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_heretic(venv: Path) -> str | None:
    py = heretic_python(venv)
    if not py.exists():
        return None
    code = "import importlib.metadata as m, heretic.main; print(m.version('heretic-llm'))"
    probe = subprocess.run([str(py), "-c", code], check=False, capture_output=True, text=True,
                           env=child_env(None, True))
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_heretic(venv: Path, torch_spec: str) -> None:
    have = installed_heretic(venv)
    if have == HERETIC_VERSION:
        log(f"reusing Heretic {have} in {venv}")
        return
    log(f"installing heretic-llm=={HERETIC_VERSION} into {venv} (found: {have or 'none'})")
    env = child_env(None, True)
    if not heretic_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(heretic_python(venv)), "-m", "pip", "install"]
    subprocess.run(pip + [torch_spec], check=True, env=env)  # first and pinned: no CUDA build pulled in
    subprocess.run(pip + [torch_spec, f"heretic-llm=={HERETIC_VERSION}"], check=True, env=env)
    have = installed_heretic(venv)
    if have != HERETIC_VERSION:
        raise SystemExit(f"heretic-llm {HERETIC_VERSION} did not install into {venv} (found {have})")


RUN_KEYS = ("model", "trials", "seed", "n_train", "n_val", "n_test", "response_tokens", "batch_size", "dtype",
            "device", "system_prompt", "target", "method", "threads")


def run_config(args) -> dict:
    """The arguments a tool run depends on (stored with it; --skip-* warns when they changed)."""
    return {**{k: getattr(args, k) for k in RUN_KEYS}, "startup_trials": startup_trials(args)}


def reuse(path: Path, args) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} not found: run once without --skip-heretic / --skip-ours")
    summary = json.loads(path.read_text("utf-8"))
    was, now = summary.get("config", {}), run_config(args)
    changed = {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}
    log(f"reusing {path.parent}" + (f"; WARNING: it ran with other arguments (was, now): {changed}" if changed else ""))
    return summary


def startup_trials(args) -> int:
    return args.startup_trials if args.startup_trials is not None else max(1, round(0.3 * args.trials))


def our_settings(args):
    """Our resolved Settings for the benchmark (the same overrides the optimize child gets)."""
    from obliteratus.settings import resolve_settings
    from obliteratus.presets import load_preset

    return resolve_settings(load_preset(args.method), our_overrides(args))


def our_overrides(args) -> dict:
    ev = {"max_new_tokens": args.eval_tokens, "kl_tokens": 16, "perplexity": args.perplexity}
    probe = {}
    if args.batch_size:
        ev["batch_size"] = args.batch_size
        probe["batch_size"] = args.batch_size
    return {"model": {"dtype": args.dtype, "device": args.device},
            "data": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "seed": args.seed,
                     "system_prompt": args.system_prompt},
            "probe": probe, "evaluate": ev}


# --------------------------------------------------------------------------- prompts

def export_prompts(args, data_dir: Path) -> dict:
    """Split our built-in sets exactly as `optimize` does and write them as local dataset folders."""
    from transformers import AutoTokenizer

    from obliteratus.pipeline import prepare_prompts

    settings = our_settings(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = prepare_prompts(tokenizer, settings)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    sizes = {}
    for cls in ("harmful", "harmless"):
        split = getattr(prompts, cls)
        # Heretic's folders hold only train + validation; the test split is kept apart (never shown to it)
        for part, path in (("train", data_dir / cls / "train.jsonl"), ("val", data_dir / cls / "validation.jsonl"),
                           ("test", data_dir / "heldout" / f"{cls}_test.jsonl")):
            rows = getattr(split, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in rows)
            sizes[f"{cls}.{part}"] = len(rows)
    return sizes


# --------------------------------------------------------------------------- Heretic

def heretic_settings(args, data_dir: Path, work: Path) -> dict:
    def spec(cls: str, split: str) -> dict:
        return {"dataset": str(data_dir / cls), "split": split, "column": "text"}

    settings = {
        "model": str(Path(args.model).resolve()),
        "dtypes": [args.dtype] if args.dtype != "auto" else ["auto", "float16", "bfloat16", "float32"],
        "batch_size": args.batch_size,
        "max_response_length": args.response_tokens,
        "n_trials": args.trials,
        "n_startup_trials": startup_trials(args),
        "seed": args.seed,
        "system_prompt": args.system_prompt,
        "study_checkpoint_dir": str(work / "checkpoints"),
        "export_strategy": "merge",
        "good_prompts": spec("harmless", "train"),
        "bad_prompts": spec("harmful", "train"),
        "good_evaluation_prompts": spec("harmless", "validation"),
        "bad_evaluation_prompts": spec("harmful", "validation"),
    }
    if args.device == "cpu":
        settings["device_map"] = "cpu"
    return settings


def run_heretic(args, data_dir: Path, work: Path) -> dict:
    ensure_heretic(args.heretic_venv, args.torch_spec)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = {"workdir": str(work), "settings": heretic_settings(args, data_dir, work), "target": args.target,
            "save_dir": str(work / "model"), "result": str(work / "heretic_result.json")}
    (work / "spec.json").write_text(json.dumps(spec, indent=2), "utf-8")
    env = child_env(args.threads, True)
    env["HF_DATASETS_CACHE"] = str(work / "hf-datasets-cache")
    log(f"running Heretic {HERETIC_VERSION} ({args.trials} trials); log: {work / 'heretic.log'}")
    proc = run_child([str(heretic_python(args.heretic_venv)), str(DRIVER), str(work / "spec.json")],
                     work / "heretic.log", cwd=work, env=env)
    res = json.loads((work / "heretic_result.json").read_text("utf-8"))
    done = [t for t in res["trials"] if t["state"] == "COMPLETE"]
    secs = [t["seconds"] for t in res["trials"] if t["seconds"] is not None]
    first = min(t["start"] for t in res["trials"])
    last = max(t["end"] for t in res["trials"] if t["end"] is not None)
    phases: dict[str, float] = {}
    for e in res["events"]:
        phases[e["phase"]] = phases.get(e["phase"], 0.0) + e["end"] - e["start"]
    marks = res["marks"]
    chosen = res["chosen"]
    summary = {
        "tool": f"heretic {res['heretic_version']}", "model_dir": res["save_dir"],
        "trials": len(res["trials"]), "complete": len(done), "pruned": 0,
        "s_per_trial_median": statistics.median(secs),
        "study_s": last - first, "directions_s": phases.get("directions"),
        "phases_s": {**phases, "restore": marks.get("restore_end", 0) - marks.get("restore_start", 0),
                     "export": marks.get("export_end", 0) - marks.get("export_start", 0)},
        "chosen": {"trial": chosen["index"], "val_refusals": chosen["refusals"],
                   "n_val": chosen["n_bad_prompts"], "val_kl_first": chosen["kl_divergence"],
                   "params": chosen["params"]},
        "pick_rule": res["pick_rule"], "resolved_settings": res["settings"], "sampler": res["sampler"],
        "front": [{"trial": t["index"], "refusals": t["refusals"], "kl": t["kl_divergence"]} for t in res["front"]],
        **proc, "config": run_config(args),
    }
    (work / "bench.json").write_text(json.dumps(summary, indent=2), "utf-8")
    return summary


# --------------------------------------------------------------------------- ours

def run_ours(args, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out_dir, run_dir = work / "model", work / "study"
    sets = [f"data.seed={args.seed}", f"data.system_prompt={json.dumps(args.system_prompt)}",
            f"evaluate.perplexity={'true' if args.perplexity else 'false'}", "evaluate.kl_tokens=16"]
    if args.batch_size:
        sets += [f"evaluate.batch_size={args.batch_size}", f"probe.batch_size={args.batch_size}"]
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'obliteratus'; from obliteratus.cli import main; main()",
           "optimize", str(Path(args.model).resolve()), "--method", args.method, "--output", str(out_dir),
           "--overwrite", "--run-dir", str(run_dir), "--trials", str(args.trials),
           "--startup-trials", str(startup_trials(args)), "--study-seed", str(args.seed),
           "--refusal-tokens", str(args.response_tokens), "--target", str(args.target),
           "--dtype", args.dtype, "--device", args.device, "--n-train", str(args.n_train),
           "--n-val", str(args.n_val), "--n-test", str(args.n_test), "--max-new-tokens", str(args.eval_tokens)]
    for s in sets:
        cmd += ["--set", s]
    (work / "command.json").write_text(json.dumps(cmd, indent=2), "utf-8")
    log(f"running obliteratus optimize ({args.trials} trials); log: {work / 'ours.log'}")
    proc = run_child(cmd, work / "ours.log", env=child_env(args.threads))
    meta = json.loads((out_dir / "obliteratus.json").read_text("utf-8"))
    opt, timings = meta["optimize"], meta["timings_s"]

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=opt["study_name"], storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    secs = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    n_val = meta["splits"]["harmful"]["val"]
    summary = {
        "tool": "obliteratus optimize", "model_dir": str(out_dir),
        "trials": len(trials), "complete": sum(t.state.name == "COMPLETE" for t in trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "kl_pruned": sum(t.state.name == "PRUNED" and "kl_cut" in t.user_attrs for t in trials),
        "s_per_trial_median": statistics.median(secs),
        "confirm_in_study_s": sum(t.user_attrs.get("confirm_s", 0.0) for t in trials),
        "study_s": timings["study"], "directions_s": timings.get("probe", 0.0) + timings.get("distill", 0.0),
        "phases_s": timings,
        "chosen": {"trial": opt["trial"], "val_refusals": round(opt["val_refusal"] * n_val), "n_val": n_val,
                   "val_kl_first": opt["val_kl_first"], "params": opt["params"]},
        "pick_rule": f"lowest KL with val refusal rate <= {args.target}, else lowest refusal rate, ties lowest KL "
                     f"(--target {args.target})",
        "self_reported_test": meta["metrics_after"],
        "front": [{"trial": p.get("number"), "refusal": p.get("refusal"), "kl": p.get("kl")} for p in opt["pareto"]],
        **proc, "config": run_config(args),
    }
    (work / "bench.json").write_text(json.dumps(summary, indent=2), "utf-8")
    return summary


# --------------------------------------------------------------------------- common evaluator

def common_evaluation(args, models: dict[str, str]) -> dict[str, dict]:
    """Score the unedited model and each saved model on our TEST split with our evaluator."""
    import gc

    import torch

    from obliteratus.evaluate import evaluate_model
    from obliteratus.models.load import summon
    from obliteratus.pipeline import prepare_prompts

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = our_settings(args)
    ev = settings.evaluate
    log("common evaluator: original model")
    orig = summon(str(Path(args.model).resolve()), settings.model, steering=False)
    prompts = prepare_prompts(orig.tokenizer, settings)
    harmful, harmless = prompts.part("harmful", "test"), prompts.part("harmless", "test")
    before = evaluate_model(orig.model, orig.tokenizer, harmful, harmless, ev, make_reference=True)
    ref = before.reference
    vocab = orig.tokenizer.get_vocab()
    out = {"original": before.metrics}
    del orig
    gc.collect()
    for name, path in models.items():
        log(f"common evaluator: {name} ({path})")
        loaded = summon(path, settings.model, steering=False)
        if loaded.tokenizer.get_vocab() != vocab:
            raise SystemExit(f"{path}: its tokenizer differs from the original's; the KL reference would not apply")
        after = evaluate_model(loaded.model, loaded.tokenizer, harmful, harmless, ev, ref)
        out[name] = after.metrics
        del loaded
        gc.collect()
    return out


# --------------------------------------------------------------------------- report

def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def per_trial_mean(row: dict, without_s: float = 0.0) -> float:
    """Study wall time (less `without_s` seconds) over finished trials, the same for both tools (sampler
    time included). Derived here, not stored: a reused run's summary may come from an older driver."""
    return (row["study_s"] - without_s) / max(row["trials"], 1)


def table_cells(rows: list[dict], scores: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The comparison table's header and rows, one list of cells each."""
    head = ["tool", "trials", "s/trial (median)", "s/trial (mean)", "study s", "total s", "directions s", "peak RSS GiB",
            "test refusals (k/n)", "over-refusal", "KL first", "KL16"]
    lines = []
    base = scores["original"]
    for r in rows:
        m = scores[r["key"]]
        k = round(m["refusal"] * m["n_harmful"])
        trials = f"{r['trials']}" + (f" ({r['pruned']} pruned" + (f", {r['kl_pruned']} on KL" if r.get("kl_pruned")
                                                                   else "") + ")" if r.get("pruned") else "")
        lines.append([r["tool"], trials, fmt(r["s_per_trial_median"], 2), fmt(per_trial_mean(r), 2),
                      fmt(r["study_s"], 1), fmt(r["wall_s"], 1),
                      fmt(r["directions_s"], 2), fmt(r["peak_rss_gib"], 2), f"{k}/{m['n_harmful']}",
                      fmt(m["over_refusal"]), fmt(m.get("kl_first"), 4), fmt(m.get("kl_mean"), 4)])
    k0 = round(base["refusal"] * base["n_harmful"])
    lines.append(["(original)", "-", "-", "-", "-", "-", "-", "-", f"{k0}/{base['n_harmful']}", fmt(base["over_refusal"]),
                  "0", "0"])
    return head, lines


def table(rows: list[dict], scores: dict[str, dict]) -> str:
    """The comparison table as printed: columns padded to their widths."""
    head, lines = table_cells(rows, scores)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    sep = "-+-".join("-" * w for w in widths)
    text = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), sep]
    text += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(text)


def markdown_table(rows: list[dict], scores: dict[str, dict]) -> str:
    """The comparison table in markdown, for --write-results."""
    head, lines = table_cells(rows, scores)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path("~/.cache/obliteratus/models/demo").expanduser()),
                   help="local Hugging Face model directory")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--startup-trials", type=int, default=None,
                   help="random start-up trials before TPE (default 30%% of --trials, Heretic's 60/200)")
    p.add_argument("--seed", type=int, default=42, help="split seed, TPE seed and Heretic's RNG seed")
    p.add_argument("--n-train", type=int, default=128, help="train prompts per class (refusal directions)")
    p.add_argument("--n-val", type=int, default=48, help="validation prompts per class (every trial's score)")
    p.add_argument("--n-test", type=int, default=64, help="held-out test prompts per class (common evaluator)")
    p.add_argument("--response-tokens", type=int, default=32,
                   help="tokens per refusal check: Heretic max_response_length (its default 100), ours "
                        "--refusal-tokens (default 32)")
    p.add_argument("--eval-tokens", type=int, default=64, help="greedy tokens per test prompt in the evaluator")
    p.add_argument("--batch-size", type=int, default=32, help="both tools' batch size; 0 = each tool's automatic")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--system-prompt", default=HERETIC_SYSTEM_PROMPT)
    p.add_argument("--target", type=float, default=0.0,
                   help="pick rule for both tools: lowest KL with val refusal rate <= target, else lowest "
                        "refusals (ties: lowest KL); 0 = lowest refusal count, ties by lowest KL")
    p.add_argument("--method", default="optimized", help="our preset for `obliteratus optimize`")
    p.add_argument("--perplexity", action="store_true", help="also measure perplexity in the evaluator")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of both tools' processes (and torch threads of the evaluator)")
    p.add_argument("--heretic-venv", type=Path, default=Path("~/.cache/obliteratus/heretic-venv").expanduser())
    p.add_argument("--torch-spec", default="torch==2.13.0", help="installed into the Heretic venv first")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/vs-heretic"))
    p.add_argument("--skip-heretic", action="store_true", help="reuse WORK/heretic from a previous run")
    p.add_argument("--skip-ours", action="store_true", help="reuse WORK/ours from a previous run")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--write-results", action="store_true",
                   help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md (the demo model only)")
    args = p.parse_args(argv)
    if args.write_results:
        results_md.check_write(SECTION, [] if Path(args.model).name == "demo" else
                               [f"--model {args.model}: the section is the demo model's (…/models/demo)"])
    args.model = str(Path(args.model).expanduser())
    args.heretic_venv = args.heretic_venv.expanduser()
    work = args.work_dir.expanduser()
    work.mkdir(parents=True, exist_ok=True)

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["startup_trials"] = startup_trials(args)
    data_dir = work / "data"
    sizes = export_prompts(args, data_dir)
    log(f"prompts written to {data_dir}: {sizes}")

    rows = []
    if args.skip_heretic:
        heretic = reuse(work / "heretic" / "bench.json", args)
    else:
        heretic = run_heretic(args, data_dir, work / "heretic")
    rows.append({**heretic, "key": "heretic"})
    if args.skip_ours:
        ours = reuse(work / "ours" / "bench.json", args)
    else:
        ours = run_ours(args, work / "ours")
    rows.append({**ours, "key": "obliteratus"})

    scores = common_evaluation(args, {"heretic": heretic["model_dir"], "obliteratus": ours["model_dir"]})
    ratio = heretic["s_per_trial_median"] / ours["s_per_trial_median"]
    ratio_mean = per_trial_mean(heretic) / per_trial_mean(ours)

    report: list[str] = []  # the lines printed below, which --write-results writes too

    def say(text: str = "") -> None:
        print(text)
        report.append(text)

    say()
    say(f"model {args.model} · {args.trials} trials ({startup_trials(args)} random start-up) · seed {args.seed} · "
        f"{args.response_tokens} tokens per refusal check · dtype {args.dtype} · batch {args.batch_size or 'auto'}")
    say(f"prompts per class: train {args.n_train} (directions), val {args.n_val} (trials), "
        f"test {args.n_test} (this table)")
    say(f"pick rule (both): lowest KL among trials with val refusal rate <= {args.target}, else lowest refusal "
        "count, ties by lowest KL")
    say("test refusals, over-refusal and KL: ONE evaluator (obliteratus marker judge, greedy "
        f"{args.eval_tokens} tokens; KL(original || edited) at the first answer token and mean over 16 tokens)")
    say()
    say(table(rows, scores))
    say()
    for r in rows:
        c = r["chosen"]
        say(f"{r['tool']}: chose trial {c['trial']}: own val refusals {c['val_refusals']}/{c['n_val']}, "
            f"own val KL {fmt(c['val_kl_first'], 4)}")
    self_rep = ours.get("self_reported_test") or {}
    if self_rep:
        say(f"obliteratus self-reported test: refusal {fmt(self_rep.get('refusal'))}, "
            f"KL first {fmt(self_rep.get('kl_first'), 4)}, KL16 {fmt(self_rep.get('kl_mean'), 4)}")
    say(f"per-trial speed ratio (Heretic / ours): {ratio:.2f}x by the median trial, {ratio_mean:.2f}x by the mean "
        "(study s / trials; the median hides the complete trials once most are pruned)")
    confirming = ours.get("confirm_in_study_s") or 0.0
    search_mean = per_trial_mean(ours, confirming)
    ratio_search = per_trial_mean(heretic) / search_mean if confirming else ratio_mean
    if confirming:
        say(f"of our study, {confirming:.1f} s confirmed candidates on spare prompts (Heretic checks none): without "
            f"them {search_mean:.2f} s per trial, {ratio_search:.2f}x by the mean")
    if args.perplexity:
        say("perplexity: " + ", ".join(f"{k} {fmt(v.get('perplexity'), 2)}" for k, v in scores.items()))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "splits": sizes, "heretic": heretic, "obliteratus": ours,
                                         "scores": scores, "speed_ratio_heretic_over_ours": ratio,
                                         "speed_ratio_mean_heretic_over_ours": ratio_mean,
                                         "speed_ratio_mean_without_confirmations": ratio_search},
                                        indent=2, default=str), "utf-8")
        log(f"wrote {args.json}")
    if args.write_results:
        printed = table(rows, scores)
        what = (f"Heretic {HERETIC_VERSION} from PyPI in its own venv ({args.torch_spec}), unmodified, driven through "
                "`benchmarks/vs_heretic_driver.py`, against `obliteratus optimize`"
                + (" (Heretic's run reused: --skip-heretic)" if args.skip_heretic else "")
                + (" (our run reused: --skip-ours)" if args.skip_ours else "")
                + "; both chosen models scored by our evaluator on the same held-out prompts.")
        results_md.write_section(SECTION, results_md.section_text(
            what, *results_md.paragraphs([markdown_table(rows, scores) if line == printed else line
                                          for line in report]), device=args.device, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
