"""Command line: a thin shell over the Python API. It only gathers overrides; defaults live in
:mod:`obliteratus.settings` and the presets."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from .cli_options import Opt, settings_options
from .errors import ConfigError, ObliteratusError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Find, study and remove refusal directions in transformer language models.")
console = Console(stderr=True)
out = Console()


class RichReporter:
    def __init__(self):
        self.progress = Progress(TextColumn("  {task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[bold cyan]{name.upper()}[/]")

    def task(self, label: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)

    def done(self, name: str, seconds: float) -> None:
        self.progress.console.print(f"  [dim]{name} done in {seconds:.1f}s[/]")


def gather(pairs: dict[str, object], sets: list[str] | None) -> dict:
    """CLI overrides as a nested dict: only options the user gave, then --set key.path=value."""
    from .settings import deep_merge, nest, parse_value

    flat = {k: v for k, v in pairs.items() if v is not None}
    for item in sets or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        flat[key.strip()] = parse_value(value.strip())
    return deep_merge({}, nest(flat))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metrics_table(before: dict, after: dict | None, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before" if after is not None else "value", justify="right")
    if after is not None:
        table.add_column("after", justify="right")
    rows = [("refusal rate, harmful test", "refusal"), ("over-refusal, harmless test", "over_refusal"),
            ("over-refusal, benign-sensitive", "over_refusal_sensitive"), ("KL first token", "kl_first"),
            ("KL mean, first tokens", "kl_mean"), ("perplexity, held-out text", "perplexity")]
    for label, key in rows:
        if key not in before and (after is None or key not in after):
            continue
        cells = [_fmt(before.get(key))] + ([_fmt(after.get(key))] if after is not None else [])
        table.add_row(label, *cells)
    return table


MODEL_OPTIONS = ("model.dtype", "model.device")  # the CLI options of settings, by settings path (cli_options.py)
DATA_OPTIONS = ("data.harmful", "data.harmless", "data.column", "data.n_train", "data.n_val", "data.n_test",
                "data.seed", "data.chat_template")
JUDGE_OPTION = Opt("evaluate.judge", ("--judge",))


@app.command()
@settings_options(*MODEL_OPTIONS, *DATA_OPTIONS, "probe.positions", "probe.batch_size",
                  Opt("layers.layer", help="Use this source layer (implies layers.method = fixed).",
                      implies={"layers.method": "fixed"}),
                  Opt("layers.method", name="layer_method"), "evaluate.max_new_tokens", JUDGE_OPTION)
def obliterate(
    model: str = typer.Argument(..., help="Alias (demo, smollm2-135m), local HF directory, .gguf file or hub id."),
    method: str = typer.Option("basic", "--method", "-m", help="Preset name or a .toml file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the edited model."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Also write the edit as a PEFT LoRA adapter here."),
    overrides: dict | None = None,
) -> None:
    """Run all six stages: SUMMON, PROBE, DISTILL, EXCISE, VERIFY, REBIRTH. A preset that searches its
    edit with the optimizer study (optimized, heretic) runs it as `obliteratus optimize` does, with its
    settings."""
    from .pipeline import obliterate as run

    with RichReporter() as reporter:
        result = run(model, method, str(output) if output else None, overwrite=overwrite, overrides=overrides,
                     reporter=reporter, lora=str(lora) if lora else None)
    if result.study is not None:
        from .optimize.command import print_result

        out.print(f"preset {method!r} searched its edit with the optimizer study (as `obliteratus optimize`)")
        print_result(result.study, model, method)
        return
    out.print(metrics_table(result.before.metrics, result.after.metrics,
                            f"{model} · {method} · layer {result.directions.layer} · k={result.directions.k}"))
    times = Table(title="stage times (s)")
    for name in result.timings:
        times.add_column(name, justify="right")
    times.add_row(*[f"{t:.1f}" for t in result.timings.values()])
    out.print(times)
    if result.output:
        out.print(f"saved to {result.output}", soft_wrap=True)


@app.command()
@settings_options(*MODEL_OPTIONS, "data.n_test", "evaluate.max_new_tokens", JUDGE_OPTION)
def evaluate(
    model: str = typer.Argument(..., help="Model to evaluate."),
    base: Optional[str] = typer.Option(None, help="Original model: adds KL(base ‖ model). Loaded first, then freed."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Also run lm-evaluation-harness tasks, e.g. "
                                                                  "mmlu,arc_easy (optional: pip install lm-eval)."),
    overrides: dict | None = None,
) -> None:
    """VERIFY alone: refusal, over-refusal, perplexity (and KL with --base) on the held-out test split."""
    from .evaluate import evaluate_model
    from .models.load import summon
    from .batching import max_positions
    from .pipeline import prepare_prompts, split_prompt_sets
    from .settings import resolve_settings

    settings = resolve_settings(None, overrides)
    ev = settings.evaluate
    if json_out:  # before any model is loaded: not inside a model, writable, replacing only earlier metrics
        from .save import check_output_file

        json_out = check_output_file(json_out, sources=(model, base), replaceable=_is_metrics_file,
                                     what="a metrics file written by `obliteratus evaluate --json`")
    if lm_eval is not None:
        import importlib.util

        if not [t for t in lm_eval.split(",") if t.strip()]:
            raise ConfigError("--lm-eval: name at least one task, e.g. --lm-eval arc_easy")
        if "lm_eval" not in sys.modules and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install lm-eval")
    splits = split_prompt_sets(settings)  # a bad prompt file fails before any model loads
    ref = None
    with RichReporter() as reporter:
        if base is not None:
            reporter.stage(f"reference: {base}")
            b = summon(base, settings.model)
            bp = prepare_prompts(b.tokenizer, settings, max_positions(b.model), splits)
            bev = evaluate_model(b.model, b.tokenizer, bp.part("harmful", "test"), bp.part("harmless", "test"),
                                 ev.model_copy(update={"perplexity": False}), None, reporter.task, make_reference=True)
            ref = bev.reference
            vocab = b.model.config.vocab_size
            del b, bp, bev
        reporter.stage(f"evaluate: {model}")
        m = summon(model, settings.model)
        if ref is not None and m.model.config.vocab_size != vocab:
            raise ObliteratusError(f"{model} and {base} have different vocabularies; KL needs the same tokenizer")
        prompts = prepare_prompts(m.tokenizer, settings, max_positions(m.model), splits)
        result = evaluate_model(m.model, m.tokenizer, prompts.part("harmful", "test"), prompts.part("harmless", "test"),
                                ev, ref, reporter.task)
    if lm_eval:
        from .evaluate.lm_eval import run_lm_eval

        result.metrics["lm_eval"] = run_lm_eval(m.model, m.tokenizer, [t for t in lm_eval.split(",") if t])
    out.print(metrics_table(result.metrics, None, f"{model}" + (f" vs {base}" if base else "")))
    if result.metrics.get("lm_eval"):
        out.print(json.dumps(result.metrics["lm_eval"], indent=1))
    if json_out:
        from .save import write_file_atomically

        write_file_atomically(json_out, lambda tmp: tmp.write_text(json.dumps(result.metrics, indent=2)))


def _is_metrics_file(path: Path) -> bool:
    """A JSON object with a refusal rate: what `evaluate --json` writes."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "refusal" in data


@app.command()
@settings_options("probe.positions", "probe.batch_size", "data.n_train", *MODEL_OPTIONS)
def probe(
    model: str = typer.Argument(...),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for activations.safetensors and norms.json."),
    overwrite: bool = typer.Option(False),
    overrides: dict | None = None,
) -> None:
    """PROBE alone: save train-split activations and the per-layer difference-of-means norms."""
    from safetensors.torch import save_file

    from .settings import resolve_settings
    from .directions.diff_means import mean_difference
    from .models.load import summon
    from .batching import max_positions
    from .pipeline import prepare_prompts, split_prompt_sets
    from .pipeline import probe as run_probe
    from .save import check_output, write_atomically

    settings = resolve_settings(None, overrides)
    check_output(output, overwrite, source=model)
    splits = split_prompt_sets(settings)  # a bad prompt file fails before the model loads
    with RichReporter() as reporter:
        start = time.perf_counter()
        loaded = summon(model, settings.model)
        prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
        cache = run_probe(loaded, prompts, settings, reporter)
        seconds = time.perf_counter() - start
    diffs = mean_difference(cache.harmful, cache.harmless)  # [k, L+1, d]
    norms = diffs.norm(dim=-1)  # [k, L+1]

    def fill(tmp: Path) -> None:
        save_file({"harmful": cache.harmful, "harmless": cache.harmless, "mean_diff": diffs},
                  str(tmp / "activations.safetensors"))
        (tmp / "norms.json").write_text(json.dumps({"model": model, "layer_norms": norms.tolist(),
                                                    "shape": list(cache.harmful.shape), "seconds": seconds}, indent=2))

    write_atomically(output, overwrite, fill)
    table = Table(title=f"‖mean(harmful) − mean(harmless)‖ per layer (last position) · {model}")
    table.add_column("layer", justify="right")
    table.add_column("norm", justify="right")
    for i, v in enumerate(norms[-1].tolist()):
        table.add_row("embed" if i == 0 else str(i), f"{v:.3f}")
    out.print(table)
    out.print(f"saved to {output}", soft_wrap=True)


@app.command()
def models(prepare: Optional[str] = typer.Option(None, "--prepare", help="Assemble and convert an alias now.")) -> None:
    """List model aliases and supported architectures; --prepare NAME builds an alias's local cache."""
    from .models import ALIASES, supported_families
    from .models.aliases import cache_root, is_prepared
    from .models.aliases import prepare as do_prepare

    if prepare:
        path = do_prepare(prepare)
        out.print(f"{prepare}: {path}", soft_wrap=True)
        return
    table = Table(title="model aliases (offline)")
    for col in ("alias", "model", "prepared", "install"):
        table.add_column(col)
    for alias in ALIASES.values():
        table.add_row(alias.name, alias.description, "yes" if is_prepared(alias.name) else "no", escape(alias.install))
    out.print(table)
    out.print(f"cache: {cache_root()}")
    out.print("supported architectures: " + ", ".join(supported_families()))


@app.command()
def presets() -> None:
    """List the presets and what each does."""
    from .presets import load_preset, preset_names

    table = Table(title="presets")
    table.add_column("preset")
    table.add_column("kind")
    table.add_column("what it does")
    for name in preset_names():
        data = load_preset(name)
        text = " ".join(data.get("description", "").split())
        if data.get("source"):
            text += f" [source: {data['source']}]"
        table.add_row(name, data.get("kind", "preset"), text)
    out.print(table)


@app.command()
def config(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="A preset name or .toml file to resolve "
                                                                      "(default: none, the defaults)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any setting, e.g. --set excise.lam=2"),
) -> None:
    """Print every setting as a commented TOML file: the settings a run with --method and --set would
    use (OBLITERATUS_* environment variables applied, secrets redacted); with none of them, the
    defaults, i.e. the shipped default.toml."""
    from .settings import resolve_settings
    from .presets import load_preset
    from .settings_file import HEADER, settings_toml

    settings = resolve_settings(load_preset(method) if method else None, gather({}, sets))
    from .settings import Settings

    header = HEADER if settings == Settings() else (
        f"# obliteratus settings: {'preset ' + method if method else 'the defaults'}, the OBLITERATUS_* "
        f"environment variables{' and --set' if sets else ''} applied (secrets redacted).\n"
        "# Run with them: --method THIS_FILE.toml\n")
    sys.stdout.write(settings_toml(settings, header))


@app.command()
@settings_options(Opt("analyze.preset", ("--method", "-m")), "analyze.n_train", "analyze.n_test", "analyze.layers",
                  "analyze.layer", "analyze.probe_method", "analyze.patch_prompts", "analyze.patch_layers",
                  "analyze.top_k")
def analyze(
    model: str = typer.Argument(..., help="Alias, local directory, .gguf file or hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for analysis.json."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    overrides: dict | None = None,
) -> None:
    """Probe accuracy/AUROC per layer, logit lens, activation patching, projections, concept cones, PCA."""
    from .analysis.command import analyze as run
    from .cli_options import command_options

    options = command_options(overrides, "analyze")  # its defaults: analysis/options.py
    overrides = {k: v for k, v in overrides.items() if k != "analyze"}
    result = run(model, str(output), **options.model_dump(), overwrite=overwrite, overrides=overrides)
    direction = result["direction"]
    out.print(f"analysis of {model} (direction from layer {direction['layer']}, chosen by {direction['chosen_by']}) "
              f"written to {output}/analysis.json")


def _register() -> None:
    """Verbs whose code lives with their stage (imported lazily when the command runs)."""
    from .chat import chat, compare
    from .evaluate.judges.command import judge
    from .optimize.command import optimize
    from .report.command import report
    from .studies.command import study

    for fn in (optimize, judge, study, report, chat, compare):
        app.command()(fn)


_register()


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain text: never wrapped or styled
    sys.exit(code)


def main() -> None:
    """Every failure the user can fix ends in one ``error: ...`` line on stderr: our own errors (exit 2),
    typer's usage errors such as an option out of its range (exit 2) and Ctrl-C (exit 130)."""
    try:
        from typer._click import exceptions as click  # typer >= 0.24 bundles its own click
    except ImportError:  # pragma: no cover
        from click import exceptions as click

    _quiet_transformers()
    previous = signal.signal(signal.SIGTERM, _terminated)  # `kill PID` cleans up like Ctrl-C
    try:
        code = app(standalone_mode=False)  # click's errors come back as exceptions, not a styled panel
    except ObliteratusError as err:
        fail(str(err), err.exit_code)
    except click.NoArgsIsHelpError:
        sys.exit(2)  # typer has printed the help
    except click.UsageError as err:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        fail(f"{err.format_message()}{where}", err.exit_code)
    except click.ClickException as err:
        fail(err.format_message(), err.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130 and not isinstance(code, bool):  # typer's exit code for a KeyboardInterrupt (Ctrl-C, SIGTERM)
        fail("interrupted", 130)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


def _quiet_transformers() -> None:
    """Our own bars are enough: no transformers/hub progress bars (without importing transformers
    here, which would add a second to every command's start)."""
    import os

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported


def _terminated(signum, frame) -> None:
    """SIGTERM is handled as SIGINT: the KeyboardInterrupt unwinds the stack, so a half-written output
    (save.write_atomically) is removed before the process exits."""
    raise KeyboardInterrupt(f"terminated by signal {signum}")


if __name__ == "__main__":
    main()
