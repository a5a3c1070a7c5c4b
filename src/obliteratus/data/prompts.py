"""Load, deduplicate, split and format prompt sets.

Sources: ``builtin:NAME`` (``harmful``, ``harmless``, ``benign_sensitive``), a ``.txt`` file (one
prompt per line), a ``.jsonl``/``.csv`` file with a named column, or a Hugging Face dataset id
(needs the ``datasets`` extra and network access).
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..batching import Encoded, encode_plain, encode_prompts, encode_rendered, has_special
from ..errors import ConfigError, PromptError

if TYPE_CHECKING:
    from ..settings import Settings

BUILTIN = ("harmful", "harmless", "benign_sensitive")


def builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise PromptError(f"unknown built-in prompt set {name!r}; built-in sets: {', '.join(BUILTIN)}")
    return Path(str(resources.files("obliteratus.data") / "prompts" / f"{name}.txt"))


def heldout_text() -> str:
    """The built-in held-out prose for perplexity (never used to find directions)."""
    return (Path(str(resources.files("obliteratus.data") / "prompts" / "heldout_text.txt"))).read_text("utf-8")


def read_text(path: str | Path, error: type[Exception] = PromptError, what: str = "file") -> str:
    """A UTF-8 text file's contents (a leading byte-order mark dropped), or `error` naming the file and
    what is wrong with it: missing, a directory, unreadable, not UTF-8, or binary (NUL bytes)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                    "save it as UTF-8") from None
    if "\x00" in text:
        raise error(f"{what} {path} holds NUL bytes: a binary file, not text")
    return text


def _read_column(rows: list[dict], column: str, source: str) -> list[str]:
    if rows and column not in rows[0]:
        raise PromptError(f"{source}: no column {column!r}; columns: {', '.join(rows[0])} (set data.column)")
    return [str(row.get(column) or "") for row in rows]


def _read_source(source: str, column: str) -> list[str]:
    if source.startswith("builtin:"):
        return builtin_path(source.split(":", 1)[1]).read_text("utf-8").splitlines()
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".csv"):
        text = read_text(path, PromptError, "prompt file")
        if path.suffix == ".txt":
            return text.splitlines()
        if path.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise PromptError(f"{source}: invalid JSON on line {lineno}: {err.msg}") from None
                    if not isinstance(rows[-1], dict):
                        raise PromptError(f"{source}: line {lineno} is not a JSON object with a {column!r} field "
                                          f"(got {type(rows[-1]).__name__} {line.strip()[:40]!r})")
            return _read_column(rows, column, source)
        try:
            return _read_column(list(csv.DictReader(text.splitlines())), column, source)
        except csv.Error as err:
            raise PromptError(f"{source}: invalid CSV ({err})") from None
    if path.is_dir():
        raise PromptError(f"prompt file {source} is a directory; give a .txt, .jsonl or .csv file")
    if path.exists():
        raise PromptError(f"{source}: unsupported prompt file type {path.suffix!r} (use .txt, .jsonl or .csv)")
    try:
        import datasets
    except ImportError:
        raise PromptError(
            f"{source!r} is not a file; loading it as a Hugging Face dataset needs `pip install 'obliteratus[datasets]'`"
        ) from None
    try:
        ds = datasets.load_dataset(source, split="train")
    except (OSError, ValueError) as err:  # not found, offline, bad config name
        raise PromptError(f"cannot load dataset {source!r}: {str(err).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise PromptError(f"dataset {source}: no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [str(x) for x in ds[column]]


def dedupe(prompts: list[str]) -> list[str]:
    """Strip, drop empty lines, and drop repeats (case- and whitespace-insensitive), keeping order."""
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        text = " ".join(prompt.split())
        key = text.casefold()
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def load_prompts(source: str, column: str = "prompt") -> list[str]:
    prompts = dedupe(_read_source(source, column))
    if not prompts:
        raise PromptError(f"{source}: no prompts (the set is empty)")
    if len(prompts) < 2:
        raise PromptError(f"{source}: only one distinct prompt; at least 2 are needed to split and estimate a mean")
    return prompts


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]
    test: list[str]
    spare: list[str] = field(default_factory=list)  # the rest, in shuffled order: in no part (see split_prompts)


def split_prompts(prompts: list[str], n_train: int, n_val: int, n_test: int, seed: int, name: str = "prompts") -> Split:
    """Deterministic (seeded) disjoint split. The test part is for VERIFY only. Test prompts are taken
    first from the shuffled order, then validation, then train, so the held-out set depends only on
    the seed and n_test: runs with different training sizes are scored on the same prompts. The
    prompts left over after train (``spare``) belong to no part; the optimizer may confirm its pick
    on them."""
    need = n_train + n_val + n_test
    if len(prompts) < need:
        raise PromptError(
            f"{name}: {len(prompts)} distinct prompts, but n_train + n_val + n_test = "
            f"{n_train} + {n_val} + {n_test} = {need}; lower --n-train/--n-val/--n-test or add prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    picked = [prompts[i] for i in order]
    return Split(picked[n_test + n_val:need], picked[n_test:n_test + n_val], picked[:n_test], picked[need:])


def check_template_kwargs(tokenizer, template_kwargs: dict) -> dict:
    """`template_kwargs` for the tokenizer's chat template, or a ConfigError naming a key that is an
    argument of ``apply_chat_template`` itself (``tokenize``, ``tools``…) or that the template never
    reads: jinja ignores an unknown variable, so a misspelt ``enable_thinkng`` would leave the
    model thinking without a word."""
    source = tokenizer.chat_template
    source = source if isinstance(source, str) else " ".join(map(str, dict(source).values()))
    own = {name for name, p in inspect.signature(tokenizer.apply_chat_template).parameters.items()
           if p.kind is not inspect.Parameter.VAR_KEYWORD}
    for key in template_kwargs:
        if key in own:
            raise ConfigError(f"data.template_kwargs: {key!r} is an argument of apply_chat_template itself, not a "
                              "variable of the chat template; remove it")
        if not re.search(rf"(?<!\w){re.escape(key)}(?!\w)", source):  # the name as a whole word
            raise ConfigError(f"data.template_kwargs: the chat template never reads {key!r} (misspelt, or not a "
                              "switch of this model's template: docs/thinking.md); remove it for this model")
    return dict(template_kwargs)


def apply_template(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """The chat template applied to `messages`, ending with the assistant turn's opening, with
    `template_kwargs` (checked: :func:`check_template_kwargs`) passed to it. When the template fails
    only with them, a ConfigError names the key that makes it fail."""
    render = functools.partial(tokenizer.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
    if not template_kwargs:
        return render()
    from jinja2.exceptions import TemplateError

    kwargs = check_template_kwargs(tokenizer, template_kwargs)
    failures = (TemplateError, TypeError, ValueError)
    try:
        return render(**kwargs)
    except failures as err:
        try:
            render()
        except failures:
            raise err from None  # it fails without them too: not theirs to explain
        bad = []
        for key, value in kwargs.items():
            try:
                render(**{key: value})
            except failures:
                bad.append(f"{key} = {value!r}")
        reason = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"data.template_kwargs: the chat template fails with {' and '.join(bad) or kwargs} "
                          f"({type(err).__name__}: {reason}); fix or remove it") from None


def format_prompts(tokenizer, prompts: list[str], chat_template: bool = True, system_prompt: str | None = None,
                   template_kwargs: dict | None = None, response_prefix: str = "") -> list[str]:
    """Wrap each prompt in the chat template (ending with the assistant turn's opening) when wanted and
    available, with `template_kwargs` passed to the template (``enable_thinking=False``…), then append
    `response_prefix` (to the raw prompt when no template is used). Template kwargs without a
    template to take them are a ConfigError."""
    if not uses_template(tokenizer, chat_template):
        if template_kwargs:
            why = "this tokenizer has none" if chat_template else "data.chat_template is off"
            raise ConfigError(f"data.template_kwargs {template_kwargs} are for a chat template, and {why}; remove them")
        return [p + response_prefix for p in prompts]
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [apply_template(tokenizer, head + [{"role": "user", "content": p}], template_kwargs) + response_prefix
            for p in prompts]


def uses_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, prompts: list[str], chat_template: bool = True, system_prompt: str | None = None,
                template_kwargs: dict | None = None, response_prefix: str = ""):
    """:func:`format_prompts` then :func:`batching.encode_prompts`, except that a prompt holding a
    special-token string (``<|im_start|>``, ``<eos>``…) has it encoded as plain text, so a prompt
    file cannot forge turns or control tokens; other prompts tokenize exactly as before. The
    response prefix is configuration, not prompt text: its control tokens stay control tokens."""
    templated = uses_template(tokenizer, chat_template)
    texts = format_prompts(tokenizer, prompts, chat_template, system_prompt, template_kwargs, response_prefix)
    encoded = encode_prompts(tokenizer, texts, templated)
    ids = list(encoded.ids)
    for i, prompt in enumerate(prompts):
        if has_special(tokenizer, prompt):
            render = lambda c: format_prompts(tokenizer, c, True, system_prompt, template_kwargs,  # noqa: E731
                                              response_prefix)[0]
            ids[i] = (encode_rendered(tokenizer, render, [prompt]) if templated
                      else encode_plain(tokenizer, prompt, add_special_tokens=True)
                      + (tokenizer(response_prefix, add_special_tokens=False)["input_ids"] if response_prefix else []))
    return Encoded.from_ids(ids, tokenizer.pad_token_id)


def encode_texts(tokenizer, settings: Settings, prompts: list[str]) -> Encoded:
    """Raw prompts -> chat-formatted (when the data settings ask for it), tokenized prompts."""
    d = settings.data
    return encode_chat(tokenizer, prompts, d.chat_template, d.system_prompt, d.template_kwargs, d.response_prefix)
