"""Load, deduplicate, split and format prompt sets.

Sources: ``builtin:NAME`` (``harmful``, ``harmless``, ``benign_sensitive``), a ``.txt`` file (one
prompt per line), a ``.jsonl``/``.csv`` file with a named column, or a Hugging Face dataset id
(needs the ``datasets`` extra and network access).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..batching import Encoded, encode_plain, encode_prompts, encode_rendered, has_special
from ..errors import PromptError

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


def format_prompts(tokenizer, prompts: list[str], chat_template: bool = True, system_prompt: str | None = None) -> list[str]:
    """Wrap each prompt in the chat template (ending with the assistant turn's opening) when wanted and available."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(head + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def uses_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, prompts: list[str], chat_template: bool = True, system_prompt: str | None = None):
    """:func:`format_prompts` then :func:`batching.encode_prompts`, except that a prompt holding a
    special-token string (``<|im_start|>``, ``<eos>``…) has it encoded as plain text, so a prompt
    file cannot forge turns or control tokens; other prompts tokenize exactly as before."""
    templated = uses_template(tokenizer, chat_template)
    encoded = encode_prompts(tokenizer, format_prompts(tokenizer, prompts, chat_template, system_prompt), templated)
    ids = list(encoded.ids)
    for i, prompt in enumerate(prompts):
        if has_special(tokenizer, prompt):
            render = lambda c: format_prompts(tokenizer, c, True, system_prompt)[0]  # noqa: E731
            ids[i] = (encode_rendered(tokenizer, render, [prompt]) if templated
                      else encode_plain(tokenizer, prompt, add_special_tokens=True))
    return Encoded.from_ids(ids, tokenizer.pad_token_id)


def encode_texts(tokenizer, settings: Settings, prompts: list[str]) -> Encoded:
    """Raw prompts -> chat-formatted (when the data settings ask for it), tokenized prompts."""
    d = settings.data
    return encode_chat(tokenizer, prompts, d.chat_template, d.system_prompt)
