"""Every preset and baseline on the demo model, same held-out prompts, one process.

    python benchmarks/methods_table.py [--presets basic arditi ...] [--n-train 64 --n-val 12 --n-test 40 --tokens 40]
                                       [--json results.json] [--write-results]

SUMMON and VERIFY-before run once (the held-out split depends only on the seed and n_test, so every
method is scored on the same prompts); PROBE runs once per distinct (train split, positions) and
layer selection once per distinct set of the settings it depends on. Then for each method: fit the
directions, optimise/excise, VERIFY-after, restore the weights from a snapshot. A baseline keeps
its own n_train (Sumandora 32, Arditi 128); everything else uses --n-train. A method that fails
(e.g. no layer passes Arditi's filters) gets its error in the table instead of numbers.

The presets that search their edit with the optimizer study (`optimized`, `heretic`) run through
the one driver, pipeline.obliterate, on the same loaded model (a fresh study in a temporary
directory, its own PROBE, DISTILL and VERIFY on the same seeded splits, so the same held-out
prompts; the weights are restored afterwards like every row's) with `--study-trials N` trials
(default: the preset's own, 50 and 200; about 20 s per trial here), or are left out of the table
with `--study-trials 0`.

Prints a markdown table: refusal on held-out harmful prompts, over-refusal on held-out harmless
prompts, KL first token / mean over 16 tokens, perplexity, and the time of each method-specific
stage (shared stages are printed once above the table). With --write-results it also replaces the
"methods-table" section of benchmarks/RESULTS.md (results_md.py) with this run's table in that
section's columns; a run that leaves out a preset (--presets, --study-trials 0) or another model
than the demo model is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import results_md
from obliteratus.settings import deep_merge, nest, parse_value, resolve_settings
from obliteratus.directions.driver import distill
from obliteratus.errors import ObliteratusError
from obliteratus.evaluate import evaluate_model
from obliteratus.models.load import summon
from obliteratus.pipeline import Reporter, edit_model, obliterate, prepare_prompts, probe, uses_study
from obliteratus.presets import load_preset, preset_names

ORDER = ["basic", "advanced", "aggressive", "spectral_cascade", "informed", "surgical", "inverted", "optimized",
         "nuclear", "arditi", "failspy", "gabliteration", "heretic", "rdo", "sumandora"]
SECTION = "methods-table"  # of benchmarks/RESULTS.md
COLUMNS = ("| method | kind | refusal | over-refusal | over-refusal, sensitive | KL first | KL 16 | perplexity "
           "| stage times (s) |")  # the section's table


def selection_key(s) -> str:
    """Everything layer selection depends on."""
    e, d = s.excise, s.directions
    return json.dumps([s.data.model_dump(), s.probe.model_dump(), s.layers.model_dump(), d.contrast, d.label,
                       d.label_tokens, d.refusal_threshold, d.min_group, d.project_harmless, d.index, d.index_relative,
                       e.lam, e.attention, e.mlp, e.embeddings, e.biases], sort_keys=True)


def run_study(args, loaded, preset: str, overrides: dict, row: dict, prompts0) -> None:
    """A preset whose edit the optimizer study chooses, run by pipeline.obliterate on `loaded` (edited
    in place; the caller restores it), its study in a temporary directory, into `row`."""
    import tempfile

    study = None if args.study_trials is None else {"n_trials": args.study_trials}
    with tempfile.TemporaryDirectory(prefix="methods-table-study-") as run_dir:
        run = obliterate(loaded, preset, overrides=overrides, study=study, run_dir=run_dir)
    assert run.prompts.harmful.test == prompts0.harmful.test, "held-out split differs between methods"
    result = run.study
    row["times"].update(run.timings)
    row.update(metrics=run.after.metrics, layer="kernel", k=1, selection="optuna",
               trial={"number": result.chosen.number, "params": result.chosen.params, "strength": result.strength,
                      "picked_by": result.picked_by, "checks": result.checks, "n_trials": result.options.n_trials})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--presets", nargs="+", default=[p for p in ORDER if p in preset_names()])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--json", default=None, help="also write every row (with metadata) to this file")
    parser.add_argument("--study-trials", type=int, default=None,
                        help="trials for the presets that run the optimizer study (default: the preset's; 0: skip them)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="PRESET KEY=VALUE",
                        help="an extra row: a preset with overrides, e.g. --variant basic excise.lam=1.2")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md with this run's table "
                             "(refused unless the run has every preset of the section, on the demo model)")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, partial_run(args))
    start_all = time.perf_counter()

    runs = [(name, name, {}) for name in args.presets]
    for preset, *pairs in args.variant:
        runs.append((f"{preset} ({', '.join(pairs)})", preset, nest({k: parse_value(v) for k, v in
                                                                      (pair.split("=", 1) for pair in pairs)})))
    settings, overrides = {}, {}
    for label, name, extra in runs:
        preset = load_preset(name)
        n_train = preset.get("data", {}).get("n_train", args.n_train) if preset.get("kind") == "baseline" else args.n_train
        cli = {"data": {"n_train": n_train, "n_val": args.n_val, "n_test": args.n_test},
               "evaluate": {"max_new_tokens": args.tokens, "batch_size": args.n_test}}
        overrides[label] = (name, deep_merge(cli, extra))
        settings[label] = resolve_settings(preset, overrides[label][1])
    first = next(iter(settings.values()))
    reporter = Reporter()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = summon(args.model, first.model)
    snapshot = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    t_summon = time.perf_counter() - t0

    prompt_sets, caches, selections = {}, {}, {}
    t0 = time.perf_counter()
    prompts0 = prepare_prompts(loaded.tokenizer, first)
    ev = first.evaluate
    harmful, harmless = prompts0.part("harmful", "test"), prompts0.part("harmless", "test")
    before = evaluate_model(loaded.model, loaded.tokenizer, harmful, harmless, ev, make_reference=True)
    ref = before.reference
    t_before = time.perf_counter() - t0
    rows = [{"method": "unedited", "metrics": before.metrics}]
    print(f"unedited: {before.metrics}", flush=True)
    for name, s in settings.items():
        row: dict = {"method": name, "kind": s.kind, "times": {}}
        rows.append(row)
        times = row["times"]
        try:
            if uses_study(s):
                if args.study_trials == 0:
                    raise ObliteratusError("searches its edit with the optimizer study: left out (--study-trials 0)")
                run_study(args, loaded, *overrides[name], row, prompts0)
            else:
                data_key = json.dumps(s.data.model_dump(), sort_keys=True)
                if data_key not in prompt_sets:
                    prompt_sets[data_key] = prepare_prompts(loaded.tokenizer, s)
                prompts = prompt_sets[data_key]
                assert prompts.harmful.test == prompts0.harmful.test, "held-out split differs between methods"
                cache_key = (data_key, s.probe.positions)
                if cache_key not in caches:
                    start = time.perf_counter()
                    caches[cache_key] = probe(loaded, prompts, s, reporter)
                    times["probe (shared)"] = time.perf_counter() - start
                key = selection_key(s)
                start = time.perf_counter()
                directions, selection = distill(loaded, caches[cache_key], prompts, s, reporter, selections.get(key))
                times["distill" if key not in selections else "fit"] = time.perf_counter() - start
                selections[key] = selection
                used, edit, grid, _ = edit_model(loaded, prompts, s, directions, reporter, times)
                start = time.perf_counter()
                after = evaluate_model(loaded.model, loaded.tokenizer, harmful, harmless, ev, ref)
                times["verify_after"] = time.perf_counter() - start
                row.update(metrics=after.metrics, layer=selection.layer, position=selection.position,
                           selection=selection.method, k=directions.k, contrast=directions.contrast,
                           edit={k: v for k, v in edit.to_dict().items() if k not in ("edited", "writer_weights")},
                           grid=None if grid is None else grid.to_dict()["best"])
        except ObliteratusError as err:
            row["error"] = str(err)
        finally:
            if loaded.steering is not None:
                loaded.steering.remove()
                loaded.steering = None
            with torch.no_grad():
                for k, v in loaded.model.state_dict().items():
                    v.copy_(snapshot[k])
        print(f"{name}: {row.get('metrics', row.get('error'))}", flush=True)

    print(f"\nmodel {args.model}; held-out {args.n_test} + {args.n_test} prompts, {args.tokens} new tokens; "
          f"val {args.n_val} per class; train {args.n_train} per class unless a baseline sets its own; "
          f"summon {t_summon:.0f}s, verify before {t_before:.0f}s")
    print("| method | kind | layer, k | refusal | over-refusal | KL first | KL 16 | perplexity | stage times (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row.get("metrics")
        if m is None:
            print(f"| {row['method']} | {row.get('kind', '')} | — | error: {row['error']} | | | | | |")
            continue
        kl1, kl16 = m.get("kl_first"), m.get("kl_mean")
        where = "—" if "layer" not in row else f"{row['layer']}, {row['k']}"
        times = ", ".join(f"{k} {v:.0f}" for k, v in row.get("times", {}).items())
        print(f"| {row['method']} | {row.get('kind', '')} | {where} | {m['refusal']:.3f} | {m['over_refusal']:.3f} | "
              f"{'—' if kl1 is None else f'{kl1:.3f}'} | {'—' if kl16 is None else f'{kl16:.3f}'} | "
              f"{m.get('perplexity', float('nan')):.2f} | {times} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if args.write_results:
        variants = {label: name for label, name, _ in runs if label != name}
        own = ", ".join(f"{label} {s.data.n_train}" for label, s in settings.items()
                        if s.kind == "baseline" and label not in variants and s.data.n_train != args.n_train)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        what = (f"One process on the {args.model} model, {(time.perf_counter() - start_all) / 60:.0f} min, peak RSS "
                f"{rss:.1f} GiB: the same {args.n_test} + {args.n_test} held-out test prompts for every method, "
                f"{args.n_train} train prompts per class unless a baseline sets its own{f' ({own})' if own else ''}, "
                f"{args.n_val} validation prompts per class, {args.tokens} generated tokens; the study presets with "
                + ("their preset's trials" if args.study_trials is None else f"{args.study_trials} trials")
                + "; refusal by the marker judge; KL to the unedited model on the held-out harmless prompts. "
                "\"(shared)\" marks a PROBE that serves every row with the same train split; \"fit\" is the direction "
                "fit alone where layer selection was shared too.")
        table = results_table(rows, {label: s.kind for label, s in settings.items()}, variants,
                              f"summon {t_summon:.0f}, VERIFY before {t_before:.0f} (shared by every row)")
        results_md.write_section(SECTION, results_md.section_text(
            what, table, device=str(loaded.device), dtype=str(next(loaded.model.parameters()).dtype)))


def partial_run(args) -> list[str]:
    """Why this run does not cover the whole methods-table section (empty: it does)."""
    why = []
    missing = [name for name in ORDER if name in preset_names() and name not in args.presets]
    if missing:
        why.append(f"--presets leaves out {', '.join(missing)}")
    if args.study_trials == 0:
        why.append("--study-trials 0 leaves out the study presets")
    if args.model != "demo":
        why.append(f"--model {args.model}: the section is the demo model's")
    return why


def stage_times(times: dict[str, float]) -> str:
    """A row's stage times as the section writes them: "verify BEFORE + AFTER" for a run with its own
    VERIFY before (the study presets), "verify AFTER" otherwise."""
    parts = []
    for key, seconds in times.items():
        if key == "verify_before":
            continue
        if key == "verify_after":
            before = f"{times['verify_before']:.0f} + " if "verify_before" in times else ""
            parts.append(f"verify {before}{seconds:.0f}")
        else:
            parts.append(f"{key} {seconds:.0f}")
    return ", ".join(parts)


def results_table(rows: list[dict], kinds: dict[str, str], variants: dict[str, str], shared: str) -> str:
    """The rows in the columns of RESULTS.md's methods table (COLUMNS); `kinds`: each label's preset
    kind, `variants`: the label of each --variant row -> its preset, `shared`: the unedited row's times."""

    def number(value, digits: int) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    def line(*cells: str) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    lines = [COLUMNS, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = row["method"]
        if label == "unedited":
            method, kind, times = "unedited", "", shared
        elif label in variants:
            preset = variants[label]
            method, kind, times = f"`{preset}`{label[len(preset):]}", "variant", stage_times(row.get("times", {}))
        else:
            method, kind, times = f"`{label}`", kinds.get(label, ""), stage_times(row.get("times", {}))
        m = row.get("metrics")
        if m is None:
            error = " ".join(str(row["error"]).split()).replace("|", "\\|")
            lines.append(line(method, kind, f"error: {error}", "", "", "", "", "", times))
            continue
        lines.append(line(method, kind, f"{m['refusal']:.3f}", f"{m['over_refusal']:.3f}",
                          number(m.get("over_refusal_sensitive"), 3), number(m.get("kl_first"), 3),
                          number(m.get("kl_mean"), 3), number(m.get("perplexity"), 2), times))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
