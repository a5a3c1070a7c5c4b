"""``obliteratus chat MODEL`` and ``obliteratus compare A B``: the verbs (the conversation and the
answers: chat.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..chat import ChatSession, chat_loop, compare_models
from ..data.prompts import load_prompts
from ..errors import ConfigError
from ..evaluate.judges import get_judge
from ..models.load import summon
from ..settings import ModelSettings, validated
from .options import command_options, parse_option_args, settings_options


def _model_settings(given: dict) -> ModelSettings:
    return validated(ModelSettings, given.get("model", {}), "model settings")


TEMPLATE_KWARG_HELP = ("Chat-template keyword argument key=value (repeatable), as data.template_kwargs: "
                       "enable_thinking=false, reasoning_effort=low.")


@settings_options("chat.system", "chat.max_new_tokens", "chat.temperature", "chat.top_p", "chat.seed",
                  "chat.response_prefix", "model.dtype", "model.device", "model.quantization", sets=False,
                  into="given")
def chat(
    model: str = typer.Argument(..., help="Alias, local directory, .gguf file or hub id."),
    template_kwarg: Annotated[Optional[list[str]], typer.Option("--template-kwarg", help=TEMPLATE_KWARG_HELP)] = None,
    given: dict | None = None,
) -> None:
    """Talk to a model in the terminal (streamed replies; /reset clears the history, /exit quits)."""
    options = command_options(given, "chat", {"template_kwargs": parse_option_args(template_kwarg, "--template-kwarg")})
    loaded = summon(model, _model_settings(given))

    def read() -> Optional[str]:
        try:
            return input("you> ")
        except EOFError:
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    print(f"chatting with {model} (/reset clears the history, /exit quits)")
    chat_loop(ChatSession(loaded.model, loaded.tokenizer, options), read, write)


def compare_table(prompts: list[str], name_a: str, a: list[str], va: list[bool], name_b: str, b: list[str],
                  vb: list[bool], judge: str) -> Table:
    table = Table(title=f"{name_a} vs {name_b} · judge: {judge}", show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column(f"A: {name_a}", ratio=3)
    table.add_column("A", justify="center")
    table.add_column(f"B: {name_b}", ratio=3)
    table.add_column("B", justify="center")
    mark = lambda r: "[red]refusal[/]" if r else "[green]answer[/]"  # noqa: E731
    for p, ta, ra, tb, rb in zip(prompts, a, va, b, vb):
        table.add_row(escape(p), escape(ta), mark(ra), escape(tb), mark(rb))
    return table


@settings_options("compare.judge", "compare.column", "compare.max_new_tokens", "compare.batch_size",
                  "compare.response_prefix", "model.dtype", "model.device", "model.quantization", sets=False,
                  into="given")
def compare(
    model_a: str = typer.Argument(..., help="First model."),
    model_b: str = typer.Argument(..., help="Second model."),
    prompts: Path = typer.Option(..., "--prompts", help=".txt (one per line), .jsonl or .csv file, or builtin:NAME."),
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Judge option key=value, e.g. "
                                                        "model=PATH for --judge llm (as in obliteratus judge).")] = None,
    template_kwarg: Annotated[Optional[list[str]], typer.Option("--template-kwarg", help=TEMPLATE_KWARG_HELP)] = None,
    given: dict | None = None,
) -> None:
    """Both models' greedy answers to the same prompts, side by side, with the judge's verdicts."""
    opts = command_options(given, "compare", {"template_kwargs": parse_option_args(template_kwarg, "--template-kwarg")})
    judge, max_new_tokens, batch_size = opts.judge, opts.max_new_tokens, opts.batch_size
    spec = get_judge(judge)  # fail on a bad name or bad options before loading anything
    judge_options = parse_option_args(option)
    spec.parse_options(judge_options)
    texts = load_prompts(str(prompts), opts.column)
    if not texts:
        raise ConfigError(f"{prompts} holds no prompts")
    settings = _model_settings(given)
    answers_a, answers_b, va, vb = compare_models(model_a, model_b, texts, settings, spec, judge_options,
                                                  max_new_tokens, batch_size, opts.template_kwargs, opts.response_prefix)
    console = Console()
    console.print(compare_table(texts, model_a, answers_a, va, model_b, answers_b, vb, judge))
    console.print(f"refusals: A {sum(va)}/{len(texts)}, B {sum(vb)}/{len(texts)}")
