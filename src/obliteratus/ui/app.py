"""``obliteratus ui``: a local Gradio app over the public Python API (``obliterate``, ``Run``,
``RunRecord``, ``chat.ChatSession``, ``export.plan.apply_plan``, ``models.load.summon``, the study's
``StudyReader``, the report's figures; Gradio, the ``ui`` extra, is imported when the app is built); it
holds no model logic of its own (tests/ui/test_public_api.py checks what it imports).

Tabs:

* **Obliterate**: model, preset, output name (under the app's output root), strength and the main
  options; the run goes off the request thread (jobs.py) with its stage, a progress bar and the log
  shown as it goes; the before/after table, the report's figures and ``report.html`` to download at
  the end. Cancel stops it at the next progress step and nothing is written.
* **Optimize**: the Optuna study as a worker run (``obliterate(..., worker=True)``: trials only), its
  completed trials read from the study's storage as they finish and drawn against the Pareto front
  (refusal vs KL); pick a trial (or the default, confirmed pick) and bake it
  (``obliterate(..., pick=N)``, what ``obliteratus optimize --pick N`` runs). The study lives where the
  CLI keeps it (``<output>.study/study.db``, the CLI's default study name), so either can resume it.
* **Chat**: a conversation with two models at once, streamed: the original model and the edited one
  with the run's edit at the strength of the slider (the run's edit plan replayed on its weights from
  the original's, ``apply_plan(..., strength, source=original)``: what saving at that strength would
  give), greedy or sampled; each model keeps its own side of the conversation until "New conversation".
* **Runs** and **Compare**: the saved runs under the output root (``obliteratus.json``), one table;
  a run's report and figures; several runs side by side with their figures.

Errors read as on the command line (``error: ...``). Bound to 127.0.0.1 by default; no share link
unless asked; Gradio's analytics off.
"""

from __future__ import annotations

import html
import io
import os
import queue
import threading
import time
from pathlib import Path

from ..chat import ChatOptions, ChatSession
from ..errors import ConfigError, ObliteratusError
from ..export.plan import apply_plan
from ..models.load import summon
from ..optimize.strategy import default_study_name
from ..optimize.study import StudyReader, storage_url
from ..pipeline import obliterate
from ..presets import preset_names
from ..record import METRIC_ROWS, RunRecord
from ..report import figures
from ..report.plots import pareto_front, ready
from .jobs import Workspace

POLL_S = 0.3
STUDY_POLL_S = 1.0  # how often a running study's storage is read
UNREADABLE = (ObliteratusError, OSError, ValueError)  # RunRecord.load: a record from another version, a broken file
DEFAULT_PICK = "default"  # the Optimize tab's pick: the study's own (confirmed) choice
CSS = ".ob-status{white-space:pre-wrap}.ob-status progress{width:100%;height:.9rem}"


def fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(before: dict, after: dict) -> list[list[str]]:
    return [[label, fmt(before.get(key)), fmt(after.get(key))] for label, key in METRIC_ROWS
            if key in before or key in after]


def given(value, label: str, kind=float):
    """A number field's value as `kind`, or the one-line error an empty or non-numeric field deserves."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: give a number") from None


def status_html(text: str, done: int = 0, total: int = 0) -> str:
    """The status line, with a progress bar while a task with a known count runs."""
    bar = f'<progress value="{done}" max="{total}"></progress>' if total else ""
    return f'<div class="ob-status">{html.escape(text)}{bar}</div>'


def job_status(job) -> str:
    p = job.progress
    return status_html(p.status(), p.done_n, p.total)


def saved_runs(root: Path) -> list[Path]:
    """Run directories directly under `root` (those with an obliteratus.json), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "obliteratus.json").is_file()]
    return sorted(found, key=lambda p: (p / "obliteratus.json").stat().st_mtime, reverse=True)


def runs_rows(runs: list[Path]) -> list[list[str]]:
    rows = []
    for path in runs:
        try:
            record = RunRecord.load(path)
        except UNREADABLE as err:
            rows.append([path.name, "unreadable", str(err)[:80], "", "", "", "", ""])
            continue
        b, a = record.metrics_before, record.metrics_after
        rows.append([path.name, record.preset, record.model.source, fmt(b.get("refusal")),
                     fmt(a.get("refusal")), fmt(a.get("kl_first")), fmt(a.get("kl_mean")), fmt(a.get("capability"))])
    return rows


RUNS_HEADERS = ["run", "preset", "model", "refusal before", "refusal after", "KL first", "KL 16", "capability after"]
TRIAL_HEADERS = ["trial", "refusal (val)", "KL first token", "Pareto front"]


def output_dir(root: Path, name: str) -> Path:
    """The run's output directory: `name` under the output root, one plain folder name."""
    name = (name or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"output name {name!r}: give one folder name (it is created under {root})")
    return root / name


def gallery(runs: list[Path], named: bool = False) -> list[tuple[str, str]]:
    """(png path, caption) of the report figures of `runs`, captions prefixed with the run's name when `named`."""
    return [(str(path), f"{run.name}: {title}" if named else title) for run in runs for path, title in figures(run)]


def study_place(root: Path, model_id: str, preset: str, name: str, storage: str) -> tuple[Path, dict, str]:
    """(output dir, the study's location as ``obliterate`` options, storage URL) of the Optimize tab's
    study: where the CLI keeps it for the same output (``<output>.study/study.db``, the default study
    name) unless a storage URL is given. Nothing is made on disk here."""
    out = output_dir(root, name)
    run_dir, storage = out.with_name(out.name + ".study"), (storage or "").strip() or None
    study_name = default_study_name(model_id.strip(), preset)
    where = {"study": {"study_name": study_name, "storage": storage}, "run_dir": None if storage else str(run_dir)}
    return out, where, storage_url(storage, run_dir, make=False)


def trial_rows(state) -> list[list[str]]:
    """The study's completed trials, newest first, those on the Pareto front marked."""
    front = {r.number for r in state.front}
    return [[str(r.number), f"{r.refusal:.3f}", f"{r.kl:.4f}", "yes" if r.number in front else ""]
            for r in sorted(state.trials, key=lambda r: -r.number)]


def pick_choices(state) -> list[tuple[str, str]]:
    """The Optimize tab's pick: the default (confirmed) pick, then the front's trials, then the others."""
    front = state.front
    on_front = {r.number for r in front}
    rest = sorted((r for r in state.trials if r.number not in on_front), key=lambda r: (r.refusal, r.kl))
    return [("default: the study's own pick (confirmed where the preset says so)", DEFAULT_PICK)] + [
        (f"trial {r.number} · refusal {r.refusal:.3f} · KL {r.kl:.4f}{' · front' if r.number in on_front else ''}",
         str(r.number)) for r in front + rest]


def pareto_image(state, picked: int | None = None):
    """The study so far as a PIL image (completed trials grey, the front joined), or None before any
    trial completes."""
    if not state.trials:
        return None
    from PIL import Image  # Gradio's own dependency

    rows = lambda rs: [{"number": r.number, "refusal": r.refusal, "kl": r.kl} for r in rs]  # noqa: E731
    return Image.open(io.BytesIO(pareto_front(rows(state.front), picked, trials=rows(state.trials))))


def study_summary(state, study_name: str, url: str) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state.states.items())) or "no trials yet"
    return f"study {study_name} in {url}: {counts}"


def build(model: str = "demo", output_root: str | os.PathLike = "obliteratus-runs"):
    """The app, a ``gradio.Blocks`` (not started): :func:`launch` serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry
    import gradio as gr  # the `ui` extra

    root = Path(output_root).expanduser().resolve()
    ws = Workspace()
    has_plots = ready()  # matplotlib imported now, not by two threads at once

    hidden = gr.update(value=None, visible=False)

    def draw(state, picked: int | None = None):
        return pareto_image(state, picked) if has_plots else None

    def model_sections(lam, dtype, device, quantization) -> dict:
        return {"excise": {"lam": given(lam, "strength (excise.lam)")},
                "model": {"dtype": dtype, "device": device, "quantization": quantization}}

    def finished_run(run, picked_by: str = ""):
        """(status, table, report file, figures) of a finished run; it becomes the chat's run."""
        ws.finished(run)
        report = Path(run.output) / "report.html"
        table = metrics_table(run.metrics["before"], run.metrics["after"])
        return (status_html(f"done: {run.output}{picked_by}"), table,
                gr.update(value=str(report) if report.is_file() else None, visible=report.is_file()),
                gallery([Path(run.output)]))

    def start_run(model_id, preset, name, lam, layer, harmful, harmless, dtype, device, quantization, overwrite):
        try:
            out = output_dir(root, name)
            sections = model_sections(lam, dtype, device, quantization)
            sections["data"] = {"harmful": harmful.strip(), "harmless": harmless.strip()}
            if layer not in (None, ""):  # as --layer on the command line: that source layer, fixed
                sections["layers"] = {"layer": given(layer, "source layer", int), "method": "fixed"}
            job = ws.start(lambda progress: obliterate(model_id.strip(), preset, str(out), overwrite=bool(overwrite),
                                                       reporter=progress, **sections))
        except ObliteratusError as err:  # Busy, a bad output name
            yield status_html(f"error: {err}"), "", [], hidden, []
            return
        while job.running:
            yield job_status(job), "\n".join(job.progress.lines), [], hidden, []
            time.sleep(POLL_S)
        log = "\n".join(job.progress.lines)
        if job.error:
            yield status_html(job.error), log, [], hidden, []
            return
        status, table, report, figs = finished_run(job.result)
        yield status, log, table, report, figs

    def cancel_run():
        job = ws.job
        if job is None or not job.running:
            return status_html("no run in progress")
        job.cancel()
        return status_html("cancelling…")

    # -- Optimize ----------------------------------------------------------------------------------

    def run_study(model_id, preset, name, trials, storage, lam, dtype, device, quantization):
        """The study's trials as a worker run, its storage read as trials finish."""
        no_pick = gr.update(choices=[], value=None)
        try:
            _, where, url = study_place(root, model_id, preset, name, storage)
            n_trials = None if trials in (None, "") else given(trials, "trials", int)  # None: the preset's
            study, study_name = {**where["study"], "n_trials": n_trials}, where["study"]["study_name"]
            sections = model_sections(lam, dtype, device, quantization)
            reader = StudyReader(url, study_name)
            job = ws.start(lambda progress: obliterate(model_id.strip(), preset, reporter=progress, study=study,
                                                       run_dir=where["run_dir"], worker=True, **sections))
        except ObliteratusError as err:
            yield status_html(f"error: {err}"), "", None, [], no_pick
            return
        seen, image, rows = -1, None, []
        state = None
        while job.running:
            try:
                state = reader.read()
            except ObliteratusError as err:  # the storage cannot be read (the run will say why too)
                yield job_status(job), f"error: {err}", image, rows, no_pick
                time.sleep(STUDY_POLL_S)
                continue
            if len(state.trials) != seen:  # redraw only when a trial completed
                seen, image, rows = len(state.trials), draw(state), trial_rows(state)
            yield job_status(job), study_summary(state, study_name, url), image, rows, no_pick
            time.sleep(STUDY_POLL_S)
        try:
            state = reader.read()
        except ObliteratusError as err:
            yield status_html(job.error or f"error: {err}"), f"error: {err}", image, rows, no_pick
            return
        summary = study_summary(state, study_name, url)
        choices = gr.update(choices=pick_choices(state), value=DEFAULT_PICK)
        if job.error:
            message = job.error
            if job.progress.cancel.is_set():  # a study cancelled keeps what it did, as Ctrl-C in the CLI
                message = (f"cancelled: the study keeps its {state.finished} finished trials; Run study resumes it, "
                           "Bake bakes one of them")
            yield status_html(message), summary, draw(state), trial_rows(state), choices
            return
        yield (status_html(f"study done: {state.finished} finished trials; pick one and bake it"), summary,
               draw(state), trial_rows(state), choices)

    def show_study(model_id, preset, name, storage):
        try:
            _, where, url = study_place(root, model_id, preset, name, storage)
            study_name = where["study"]["study_name"]
            state = StudyReader(url, study_name).read()
        except ObliteratusError as err:
            return status_html(f"error: {err}"), "", None, [], gr.update(choices=[], value=None)
        return (status_html(f"{len(state.trials)} completed trials"), study_summary(state, study_name, url),
                draw(state), trial_rows(state), gr.update(choices=pick_choices(state), value=DEFAULT_PICK))

    def bake(model_id, preset, name, storage, picked, lam, dtype, device, quantization, overwrite):
        """The picked trial (or the default pick) excised, verified and saved: ``obliterate(..., pick=N)``."""
        try:
            out, where, url = study_place(root, model_id, preset, name, storage)
            study_name = where["study"]["study_name"]
            state = StudyReader(url, study_name).read()
            if not state.trials:
                raise ConfigError(f"study {study_name} in {url} has no completed trial yet: run the study first")
            study = {**where["study"], "n_trials": state.finished}  # the finished count: baking runs no more trials
            pick = None if picked in (None, "", DEFAULT_PICK) else int(picked)
            sections = model_sections(lam, dtype, device, quantization)
            job = ws.start(lambda progress: obliterate(model_id.strip(), preset, str(out), overwrite=bool(overwrite),
                                                       reporter=progress, study=study, run_dir=where["run_dir"],
                                                       pick=pick, **sections))
        except ObliteratusError as err:
            yield status_html(f"error: {err}"), [], hidden, [], gr.update()
            return
        while job.running:
            yield job_status(job), [], hidden, [], gr.update()
            time.sleep(POLL_S)
        if job.error:
            yield status_html(job.error), [], hidden, [], gr.update()
            return
        run = job.result
        chosen = run.study.chosen.number
        status, table, report, figs = finished_run(run, f" · trial {chosen} ({run.study.picked_by})")
        yield status, table, report, figs, draw(state, chosen)

    # -- Chat --------------------------------------------------------------------------------------

    def ask(prompt, strength, temperature, max_new_tokens, histories):
        histories = histories or {"original": [], "edited": []}
        shown = [histories["original"], histories["edited"]]
        run = ws.run
        if run is None:
            yield *shown, status_html("error: no edited model yet: run Obliterate first"), histories
            return
        if not (prompt or "").strip():
            yield *shown, status_html("error: type a prompt"), histories
            return
        if ws.job is not None and ws.job.running:
            yield *shown, status_html("error: a run is in progress: chat when it is done"), histories
            return
        texts = {"original": "", "edited": ""}
        new = {key: list(h) for key, h in histories.items()}
        failed: queue.Queue = queue.Queue()

        def answer() -> None:
            try:
                with ws.chat_lock:  # one answer at a time: the slider rewrites the edited model's weights
                    if ws.original is None or ws.original[0] is not run:
                        ws.original = None  # the previous run's original, freed before the next loads
                        ws.original = (run, summon(run.loaded.source, run.settings.model))
                    original = ws.original[1]
                    plan = run.edit_plan()
                    if plan is not None:
                        apply_plan(run.loaded.model, plan, float(strength), source=original.model)
                    elif float(strength) != 1.0:
                        raise ConfigError("this run's edit has no plan (not a projection edit): the slider needs "
                                          "one; set it to 1 to chat with the edit as saved")
                    options = ChatOptions(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                          system=run.settings.data.system_prompt)
                    for key, loaded in (("original", original), ("edited", run.loaded)):
                        session = ChatSession(loaded.model, loaded.tokenizer, options, new[key])
                        session.reply(prompt, lambda piece, k=key: texts.__setitem__(k, texts[k] + piece))
            except ObliteratusError as err:
                failed.put(f"error: {err}")
            except Exception as err:  # a bug: shown, the app stays up
                failed.put(f"internal error: {type(err).__name__}: {err}")

        def partial(key: str) -> list[dict]:
            return histories[key] + [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts[key]}]

        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        while worker.is_alive():
            yield (partial("original"), partial("edited"), status_html(f"answering at strength {float(strength):g}…"),
                   histories)
            time.sleep(POLL_S)
        if not failed.empty():
            yield *shown, status_html(failed.get()), histories
            return
        yield new["original"], new["edited"], status_html(f"answered at strength {float(strength):g}"), new

    def new_conversation():
        return [], [], status_html("new conversation"), {"original": [], "edited": []}

    # -- Runs and Compare --------------------------------------------------------------------------

    def refresh():
        runs = saved_runs(root)
        names = [p.name for p in runs]
        return (runs_rows(runs), gr.update(choices=names, value=names[0] if names else None),
                gr.update(choices=names, value=names[:2]))

    def open_report(name):
        if not name:
            return hidden, "", []
        path = root / name
        report = path / "report.html"
        try:
            record = RunRecord.load(path)
        except UNREADABLE as err:
            return hidden, f"error: {err}", []
        before, after = record.metrics_before, record.metrics_after
        table = "\n".join(f"- {label}: {fmt(before.get(k))} → {fmt(after.get(k))}" for label, k in METRIC_ROWS
                          if k in after)
        return (gr.update(value=str(report) if report.is_file() else None, visible=report.is_file()), table,
                gallery([path]))

    def compare(names):
        runs = [root / n for n in names or [] if (root / n / "obliteratus.json").is_file()]
        return runs_rows(runs), gallery(runs, named=True)

    def figure_gallery(label: str, elem_id: str):
        return gr.Gallery(label=label, columns=3, height="auto", object_fit="contain", elem_id=elem_id)

    with gr.Blocks(title="obliteratus", analytics_enabled=False) as app:
        gr.Markdown(f"# obliteratus\nRuns are written under `{root}`.")
        with gr.Tab("Obliterate", id="obliterate"):
            with gr.Row():
                model_box = gr.Textbox(model, label="model (alias, local dir, .gguf file or hub id)", elem_id="model")
                preset_box = gr.Dropdown(preset_names(), value="basic", label="preset", elem_id="preset")
                name_box = gr.Textbox("run-1", label="output name", elem_id="output-name")
            with gr.Row():
                lam_box = gr.Number(1.0, label="strength (excise.lam)", elem_id="lam")
                layer_box = gr.Number(None, label="source layer (empty: the preset's selection)", precision=0,
                                      minimum=0, elem_id="layer")
                harmful_box = gr.Textbox("builtin:harmful", label="harmful prompts")
                harmless_box = gr.Textbox("builtin:harmless", label="harmless prompts")
            with gr.Row():
                dtype_box = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype")
                device_box = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="device")
                quant_box = gr.Dropdown(["none", "nf4", "int8"], value="none", label="quantization")
                overwrite_box = gr.Checkbox(False, label="replace an existing output")
            with gr.Row():
                start = gr.Button("Obliterate", variant="primary", elem_id="start")
                stop = gr.Button("Cancel", elem_id="cancel")
            status = gr.HTML("", elem_id="status")
            log = gr.Textbox(label="log", lines=8, elem_id="log")
            table = gr.Dataframe(headers=["metric", "before", "after"], label="held-out test split", elem_id="metrics")
            report_file = gr.File(label="report.html", visible=False, elem_id="report")
            run_figures = figure_gallery("the report's figures", "figures")
            start.click(start_run, [model_box, preset_box, name_box, lam_box, layer_box, harmful_box, harmless_box,
                                    dtype_box, device_box, quant_box, overwrite_box],
                        [status, log, table, report_file, run_figures])
            stop.click(cancel_run, None, status)
        with gr.Tab("Optimize", id="optimize"):
            gr.Markdown("The Optuna study (refusal vs KL on the validation prompts) runs as trials only; then pick "
                        "a trial and bake it. The study is kept in `<output name>.study` and resumes.")
            with gr.Row():
                s_model = gr.Textbox(model, label="model", elem_id="study-model")
                s_preset = gr.Dropdown(preset_names(), value="optimized", label="preset", elem_id="study-preset")
                s_name = gr.Textbox("study-1", label="output name", elem_id="study-name")
                s_trials = gr.Number(None, label="trials (empty: the preset's)", precision=0, minimum=1,
                                     elem_id="trials")
            with gr.Row():
                s_storage = gr.Textbox("", label="storage URL (empty: SQLite next to the output)")
                s_lam = gr.Number(1.0, label="strength (excise.lam)")
                s_dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype")
                s_device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="device")
                s_quant = gr.Dropdown(["none", "nf4", "int8"], value="none", label="quantization")
            with gr.Row():
                s_start = gr.Button("Run study", variant="primary", elem_id="study-start")
                s_show = gr.Button("Show study", elem_id="study-show")
                s_cancel = gr.Button("Cancel", elem_id="study-cancel")
            s_status = gr.HTML("", elem_id="study-status")
            s_summary = gr.Markdown("", elem_id="study-summary")
            with gr.Row():
                s_plot = gr.Image(label="Pareto front: refusal vs KL (validation)", type="pil", elem_id="pareto")
                s_table = gr.Dataframe(headers=TRIAL_HEADERS, label="completed trials", elem_id="trials-table")
            with gr.Row():
                s_pick = gr.Dropdown([], label="trial to bake", elem_id="pick")
                s_overwrite = gr.Checkbox(False, label="replace an existing output")
                s_bake = gr.Button("Bake", variant="primary", elem_id="bake")
            b_status = gr.HTML("", elem_id="bake-status")
            b_table = gr.Dataframe(headers=["metric", "before", "after"], label="held-out test split",
                                   elem_id="bake-metrics")
            b_report = gr.File(label="report.html", visible=False, elem_id="bake-report")
            b_figures = figure_gallery("the report's figures", "bake-figures")
            where = [s_model, s_preset, s_name]
            model_opts = [s_lam, s_dtype, s_device, s_quant]
            s_start.click(run_study, where + [s_trials, s_storage] + model_opts,
                          [s_status, s_summary, s_plot, s_table, s_pick])
            s_show.click(show_study, where + [s_storage], [s_status, s_summary, s_plot, s_table, s_pick])
            s_cancel.click(cancel_run, None, s_status)
            s_bake.click(bake, where + [s_storage, s_pick] + model_opts + [s_overwrite],
                         [b_status, b_table, b_report, b_figures, s_plot])
        with gr.Tab("Chat", id="chat"):
            histories = gr.State({"original": [], "edited": []})
            prompt_box = gr.Textbox(label="message", elem_id="prompt")
            with gr.Row():
                strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="edit strength λ", elem_id="strength")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
                tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens", elem_id="max-new-tokens")
            with gr.Row():
                send = gr.Button("Ask both", variant="primary", elem_id="ask")
                clear = gr.Button("New conversation", elem_id="new-conversation")
            chat_status = gr.HTML("", elem_id="chat-status")
            with gr.Row():
                original_out = gr.Chatbot(label="original", elem_id="original-chat", height=360)
                edited_out = gr.Chatbot(label="edited", elem_id="edited-chat", height=360)
            send.click(ask, [prompt_box, strength, temperature, tokens, histories],
                       [original_out, edited_out, chat_status, histories])
            clear.click(new_conversation, None, [original_out, edited_out, chat_status, histories])
        with gr.Tab("Runs", id="runs"):
            refresh_button = gr.Button("Refresh", elem_id="refresh")
            runs_table = gr.Dataframe(headers=RUNS_HEADERS, label="saved runs", elem_id="runs-table")
            pick = gr.Dropdown([], label="run", elem_id="run-pick")
            picked_report = gr.File(label="report.html", visible=False)
            picked_metrics = gr.Markdown()
            picked_figures = figure_gallery("the run's figures", "run-figures")
            pick.change(open_report, pick, [picked_report, picked_metrics, picked_figures])
        with gr.Tab("Compare", id="compare"):
            chosen = gr.Dropdown([], multiselect=True, label="runs", elem_id="compare-pick")
            compared = gr.Dataframe(headers=RUNS_HEADERS, label="side by side", elem_id="compare-table")
            compared_figures = figure_gallery("their figures", "compare-figures")
            chosen.change(compare, chosen, [compared, compared_figures])
        refresh_button.click(refresh, None, [runs_table, pick, chosen])
        app.load(refresh, None, [runs_table, pick, chosen])
    app.workspace = ws  # for tests and embedding
    return app


def launch(model: str = "demo", output_root: str | os.PathLike = "obliteratus-runs", host: str = "127.0.0.1",
           port: int = 7860, auth: tuple[str, str] | None = None, share: bool = False, block: bool = True):
    """Build and serve the app; with `block` False it returns once the server is up."""
    app = build(model, output_root)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=not block,
               inbrowser=False, show_error=True, css=CSS,
               allowed_paths=[str(Path(output_root).expanduser().resolve())])
    return app


__all__ = ["build", "launch", "metrics_table", "output_dir", "pick_choices", "runs_rows", "saved_runs", "study_place",
           "trial_rows"]
