"""CLI options generated from the typed models: a verb names the settings it exposes by their path
(``data.n_train``, ``optimize.study.n_trials``, ``compare.batch_size``) and :func:`settings_options`
builds each typer option from the pydantic field (type, help text = its description, the choices of
a ``Literal``) and hands the verb the values the user gave as one nested dict.

Paths starting with a verb's own options model (:data:`COMMAND_OPTIONS`: ``chat``, ``compare``,
``judge``, ``analyze``) are that model's fields; every other path is a field of
:class:`obliteratus.settings.Settings`. Defaults stay in the models: a generated option defaults to
None (not given), so the CLI holds no default of its own. Range checks stay in the models too: a bad
setting is reported by its settings path (settings.resolve_settings), a bad command option by its flag
and field (:func:`command_options`).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import typer
from pydantic import BaseModel, ValidationError

from ..analysis.options import AnalyzeOptions
from ..chat import ChatOptions, CompareOptions
from ..errors import ConfigError, PromptError
from ..evaluate.judges.rows import JudgeCommandOptions
from ..settings import Settings, parse_value
from .common import gather


@dataclass(frozen=True)
class Opt:
    """One generated option: the field at `path`, under the flag names `decls` (default
    ``--<field-name>``, ``--x/--no-x`` for a bool); `name` is the Python parameter name (default the
    field name), `help` replaces the field's description, and `implies` sets other paths when this
    option is given and they are not (``--layer`` implies ``layers.method = fixed``)."""

    path: str
    decls: tuple[str, ...] = ()
    name: str | None = None
    help: str | None = None
    implies: dict[str, Any] = field(default_factory=dict)


COMMAND_MODELS: dict[str, type[BaseModel]] = {"chat": ChatOptions, "compare": CompareOptions,
                                               "judge": JudgeCommandOptions, "analyze": AnalyzeOptions}
COMMAND_OPTIONS = tuple(COMMAND_MODELS)  # option models of verbs that have no settings of their own


def _command_model(name: str) -> type[BaseModel]:
    """The options model of verb `name`."""
    return COMMAND_MODELS[name]


def root_of(path: str) -> tuple[type[BaseModel], list[str]]:
    """The model a path starts in and the field names below it."""
    parts = path.split(".")
    if parts[0] in COMMAND_OPTIONS:
        return _command_model(parts[0]), parts[1:]
    return Settings, parts


def field_at(path: str):
    """The pydantic FieldInfo at a dotted path (nested models walked)."""
    model, parts = root_of(path)
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            raise KeyError(f"no setting {path!r}")
        info = model.model_fields[part]
        if i == len(parts) - 1:
            return info
        model = next(a for a in (info.annotation, *typing.get_args(info.annotation))
                     if isinstance(a, type) and issubclass(a, BaseModel))
    raise KeyError(path)


def _strip_none(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def cli_type(annotation) -> tuple[Any, str | None]:
    """(the scalar or list type typer parses, a metavar listing a Literal's choices)."""
    annotation = _strip_none(annotation)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), "[" + "|".join(map(str, choices)) + "]"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return list[_strip_none(item)], None
    if annotation in (int, float, str, bool):
        return annotation, None
    raise TypeError(f"no CLI option for a setting of type {annotation}")


def option_parameter(opt: Opt) -> inspect.Parameter:
    """The typer option of one setting, defaulting to None (= not given)."""
    info = field_at(opt.path)
    kind, metavar = cli_type(info.annotation)
    name = opt.name or opt.path.rsplit(".", 1)[-1]
    flag = name.replace("_", "-")
    decls = opt.decls or ((f"--{flag}/--no-{flag}",) if kind is bool else (f"--{flag}",))
    text = opt.help if opt.help is not None else (info.description or "")
    text = f"{text} (setting {opt.path})".strip()
    option = typer.Option(None, *decls, help=text, metavar=metavar, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def sets_parameter() -> inspect.Parameter:
    option = typer.Option(None, "--set", help="Any setting, e.g. --set excise.lam=2 (section.field=value; "
                                              "`obliteratus config` lists them all).")
    return inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[list[str]])


def settings_options(*specs: str | Opt, sets: bool = True, into: str = "overrides") -> Callable:
    """Decorator: add one typer option per setting path in `specs` (and ``--set`` with `sets`) to the
    verb's signature; the verb receives the given values as the nested dict `into` (only the options
    the user gave, then the ``--set`` items: common.gather)."""
    opts = [s if isinstance(s, Opt) else Opt(s) for s in specs]

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != into]
        generated = [option_parameter(o) for o in opts] + ([sets_parameter()] if sets else [])
        names = [p.name for p in own + generated]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: two options share a parameter name ({names})")
        by_name = {p.name: o for p, o in zip(generated, opts)}

        @functools.wraps(fn)
        def verb(*args, **kwargs):
            pairs: dict[str, Any] = {}
            for name, opt in by_name.items():
                value = kwargs.pop(name, None)
                if value is not None and value != []:
                    pairs[opt.path] = value
            for name, opt in by_name.items():
                if opt.path in pairs:
                    for path, value in opt.implies.items():
                        pairs.setdefault(path, value)
            given = gather(pairs, kwargs.pop("sets", None) if sets else None)
            return fn(*args, **kwargs, **{into: given})

        verb.__signature__ = signature.replace(parameters=own + generated)
        verb.__annotations__ = {p.name: p.annotation for p in own + generated}
        return verb

    return decorate


def command_options(given: dict, name: str, extra: dict | None = None):
    """The verb's options model `name` validated from the given values; an error names each flag."""
    model = _command_model(name)
    try:
        return model.model_validate({**given.get(name, {}), **(extra or {})})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            flag = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else ""
            lines.append(f"  {flag} ({name}.{where}): {e['msg']}")
        raise ConfigError(f"invalid {name} options:\n" + "\n".join(lines)) from None


def parse_option_args(items: list[str] | None, flag: str = "--option") -> dict:
    """``key=value`` items as a dict (a judge's ``--option``, chat's ``--template-kwarg``); values as TOML."""
    options = {}
    for item in items or []:
        if "=" not in item:
            raise PromptError(f"{flag} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_value(value.strip())
    return options


MODEL_OPTIONS = ("model.dtype", "model.device", "model.quantization")  # the CLI options of settings, by settings path
DATA_OPTIONS = ("data.harmful", "data.harmless", "data.column", "data.n_train", "data.n_val", "data.n_test",
                "data.seed", "data.chat_template")
JUDGE_OPTION = Opt("evaluate.judge", ("--judge",))


__all__ = ["COMMAND_OPTIONS", "DATA_OPTIONS", "JUDGE_OPTION", "MODEL_OPTIONS", "Opt", "command_options", "field_at",
           "parse_option_args", "settings_options"]
