"""``obliteratus ui``: a local Gradio app over the public Python API (``obliterate``, ``Run``,
``RunRecord``, ``chat.ChatSession``, ``export.plan.apply_plan``, ``models.load.summon``; Gradio, the
``ui`` extra, is imported when the app is built); it holds no
model logic of its own (tests/ui/test_imports_public_api.py checks what it imports).

Tabs:

* **Obliterate**: model, preset, output name (under the app's output root), strength and the main
  options; the run goes off the request thread (jobs.py) with its stage, task count and log shown as
  it goes; the before/after table and ``report.html`` to download at the end. Cancel stops it at the
  next progress step and nothing is written.
* **Chat**: one prompt, two answers, streamed: the original model and the edited one with the run's
  edit at the strength of the slider (the run's edit plan replayed on its weights from the original's,
  ``apply_plan(..., strength, source=original)``: what saving at that strength would give), greedy
  or sampled.
* **Runs** and **Compare**: the saved runs under the output root (``obliteratus.json``), one table;
  a run's report to download; several runs side by side.

Errors read as on the command line (``error: ...``). Bound to 127.0.0.1 by default; no share link
unless asked; Gradio's analytics off.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

from ..chat import ChatOptions, ChatSession
from ..errors import ConfigError, ObliteratusError
from ..export.plan import apply_plan
from ..models.load import summon
from ..pipeline import obliterate
from ..presets import preset_names
from ..record import METRIC_ROWS, RunRecord
from .jobs import Workspace

POLL_S = 0.3
UNREADABLE = (ObliteratusError, OSError, ValueError)  # RunRecord.load: a record from another version, a broken file


def fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(before: dict, after: dict) -> list[list[str]]:
    return [[label, fmt(before.get(key)), fmt(after.get(key))] for label, key in METRIC_ROWS
            if key in before or key in after]


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


def output_dir(root: Path, name: str) -> Path:
    """The run's output directory: `name` under the output root, one plain folder name."""
    name = (name or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"output name {name!r}: give one folder name (it is created under {root})")
    return root / name


def build(model: str = "demo", output_root: str | os.PathLike = "obliteratus-runs"):
    """The app, a ``gradio.Blocks`` (not started): :func:`launch` serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry
    import gradio as gr  # the `ui` extra

    root = Path(output_root).expanduser().resolve()
    ws = Workspace()

    def start_run(model_id, preset, name, lam, harmful, harmless, dtype, device, quantization, overwrite):
        blank = gr.update(value=None, visible=False)
        try:
            out = output_dir(root, name)
            sections = {"excise": {"lam": float(lam)}, "data": {"harmful": harmful.strip(), "harmless": harmless.strip()},
                        "model": {"dtype": dtype, "device": device, "quantization": quantization}}
            job = ws.start(lambda progress: obliterate(model_id.strip(), preset, str(out), overwrite=bool(overwrite),
                                                       reporter=progress, **sections))
        except ObliteratusError as err:  # Busy, a bad output name
            yield f"error: {err}", "", [], blank
            return
        while job.running:
            yield job.progress.status(), "\n".join(job.progress.lines), [], blank
            time.sleep(POLL_S)
        log = "\n".join(job.progress.lines)
        if job.error:
            yield job.error, log, [], blank
            return
        run = job.result
        with ws.lock:
            ws.run, ws.original = run, None
        report = Path(run.output) / "report.html"
        yield (f"done: {run.output}", log, metrics_table(run.metrics["before"], run.metrics["after"]),
               gr.update(value=str(report) if report.is_file() else None, visible=report.is_file()))

    def cancel_run():
        job = ws.job
        if job is None or not job.running:
            return "no run in progress"
        job.cancel()
        return "cancelling…"

    def ask(prompt, strength, temperature, max_new_tokens):
        run = ws.run
        if run is None:
            yield "", "", "error: no edited model yet: run Obliterate first"
            return
        if not (prompt or "").strip():
            yield "", "", "error: type a prompt"
            return
        if ws.job is not None and ws.job.running:
            yield "", "", "error: a run is in progress: chat when it is done"
            return
        texts = {"original": "", "edited": ""}
        failed: queue.Queue = queue.Queue()

        def answer() -> None:
            try:
                with ws.lock:  # one chat at a time: the slider rewrites the edited model's weights
                    if ws.original is None:
                        ws.original = summon(run.loaded.source, run.settings.model)
                    plan = run.edit_plan()
                    if plan is not None:
                        apply_plan(run.loaded.model, plan, float(strength), source=ws.original.model)
                    elif float(strength) != 1.0:
                        raise ConfigError("this run's edit has no plan (not a projection edit): the slider needs "
                                          "one; set it to 1 to chat with the edit as saved")
                    options = ChatOptions(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                          system=run.settings.data.system_prompt)
                    for key, loaded in (("original", ws.original), ("edited", run.loaded)):
                        ChatSession(loaded.model, loaded.tokenizer, options).reply(
                            prompt, lambda piece, k=key: texts.__setitem__(k, texts[k] + piece))
            except ObliteratusError as err:
                failed.put(f"error: {err}")
            except Exception as err:  # a bug: shown, the app stays up
                failed.put(f"internal error: {type(err).__name__}: {err}")

        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        while worker.is_alive():
            yield texts["original"], texts["edited"], f"answering at strength {float(strength):g}…"
            time.sleep(POLL_S)
        if not failed.empty():
            yield "", "", failed.get()
            return
        yield texts["original"], texts["edited"], f"answered at strength {float(strength):g}"

    def refresh():
        runs = saved_runs(root)
        names = [p.name for p in runs]
        return (runs_rows(runs), gr.update(choices=names, value=names[0] if names else None),
                gr.update(choices=names, value=names[:2]))

    def open_report(name):
        if not name:
            return gr.update(value=None, visible=False), ""
        path = root / name
        report = path / "report.html"
        try:
            record = RunRecord.load(path)
        except UNREADABLE as err:
            return gr.update(value=None, visible=False), f"error: {err}"
        before, after = record.metrics_before, record.metrics_after
        table = "\n".join(f"- {label}: {fmt(before.get(k))} → {fmt(after.get(k))}" for label, k in METRIC_ROWS
                          if k in after)
        return gr.update(value=str(report) if report.is_file() else None, visible=report.is_file()), table

    def compare(names):
        return runs_rows([root / n for n in names or [] if (root / n / "obliteratus.json").is_file()])

    with gr.Blocks(title="obliteratus", analytics_enabled=False) as app:
        gr.Markdown(f"# obliteratus\nRuns are written under `{root}`.")
        with gr.Tab("Obliterate", id="obliterate"):
            with gr.Row():
                model_box = gr.Textbox(model, label="model (alias, local dir, .gguf file or hub id)", elem_id="model")
                preset_box = gr.Dropdown(preset_names(), value="basic", label="preset", elem_id="preset")
                name_box = gr.Textbox("run-1", label="output name", elem_id="output-name")
            with gr.Row():
                lam_box = gr.Number(1.0, label="strength (excise.lam)", elem_id="lam")
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
            status = gr.Markdown("", elem_id="status")
            log = gr.Textbox(label="log", lines=8, elem_id="log")
            table = gr.Dataframe(headers=["metric", "before", "after"], label="held-out test split", elem_id="metrics")
            report_file = gr.File(label="report.html", visible=False, elem_id="report")
            start.click(start_run, [model_box, preset_box, name_box, lam_box, harmful_box, harmless_box, dtype_box,
                                    device_box, quant_box, overwrite_box], [status, log, table, report_file])
            stop.click(cancel_run, None, status)
        with gr.Tab("Chat", id="chat"):
            prompt_box = gr.Textbox(label="prompt", elem_id="prompt")
            with gr.Row():
                strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="edit strength λ", elem_id="strength")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
                tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens", elem_id="max-new-tokens")
            send = gr.Button("Ask both", variant="primary", elem_id="ask")
            chat_status = gr.Markdown("", elem_id="chat-status")
            with gr.Row():
                original_out = gr.Textbox(label="original", lines=8, elem_id="original-answer")
                edited_out = gr.Textbox(label="edited", lines=8, elem_id="edited-answer")
            send.click(ask, [prompt_box, strength, temperature, tokens], [original_out, edited_out, chat_status])
        with gr.Tab("Runs", id="runs"):
            refresh_button = gr.Button("Refresh", elem_id="refresh")
            runs_table = gr.Dataframe(headers=RUNS_HEADERS, label="saved runs", elem_id="runs-table")
            pick = gr.Dropdown([], label="run", elem_id="run-pick")
            picked_report = gr.File(label="report.html", visible=False)
            picked_metrics = gr.Markdown()
            pick.change(open_report, pick, [picked_report, picked_metrics])
        with gr.Tab("Compare", id="compare"):
            chosen = gr.Dropdown([], multiselect=True, label="runs", elem_id="compare-pick")
            compared = gr.Dataframe(headers=RUNS_HEADERS, label="side by side", elem_id="compare-table")
            chosen.change(compare, chosen, compared)
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
               inbrowser=False, show_error=True, allowed_paths=[str(Path(output_root).expanduser().resolve())])
    return app


__all__ = ["build", "launch", "metrics_table", "output_dir", "runs_rows", "saved_runs"]
