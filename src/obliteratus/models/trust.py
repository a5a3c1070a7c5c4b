"""SUMMON's checks on what a model's files hold. A corrupt, incomplete or hostile checkpoint ends in
one error that names the file or tensor and the fix, before any stage runs on it (issue 24).

Before loading: every file of a local directory is readable, the weights are safetensors (pickle
only with ``model.allow_pickle``), a ``.gguf`` file parses and carries a usable tokenizer. After
loading: the weights match ``config.json`` key for key and shape for shape, every parameter and
buffer is finite, the tokenizer can pad, and the chat template renders inside jinja's sandbox.
"""

from __future__ import annotations

import struct
from itertools import chain
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import IntegrityError, ModelNotFoundError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what transformers loads from a directory
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
READ_SUFFIXES = (".json", ".safetensors", ".bin", ".jinja", ".model", ".txt", ".tiktoken", ".py")  # what loading reads
ALLOW_PICKLE = "--set model.allow_pickle=true (or OBLITERATUS_MODEL__ALLOW_PICKLE=true)"
TRUST_CODE = "--set model.trust_remote_code=true (or OBLITERATUS_MODEL__TRUST_REMOTE_CODE=true)"


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def unreadable(paths: list[Path]) -> list[Path]:
    """The files among `paths` that this process may not open. Opening is the test (not os.access,
    which a root process passes), and transformers reports such a file as missing."""
    bad = []
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            bad.append(path)
    return bad


def refuse_unreadable(paths: list[Path]) -> None:
    bad = unreadable(paths)
    if bad:
        names = ", ".join(str(p) for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ModelNotFoundError(f"permission denied reading {names}: the file exists but this user may not read it; "
                                 "give it read access (chmod a+r) or run as its owner")


def check_local_dir(path: Path, allow_pickle: bool) -> None:
    """A local HF directory: readable files, weights present, no pickle unless allowed."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    refuse_unreadable([p for p in files if p.suffix in READ_SUFFIXES])
    names = {p.name for p in files}
    if names & set(SAFE_WEIGHTS):
        return
    pickled = sorted(names & set(PICKLE_WEIGHTS))
    if pickled and not allow_pickle:
        raise ModelNotFoundError(
            f"{path} holds its weights only as a PyTorch pickle ({pickled[0]}); unpickling a file can run any code "
            f"hidden in it, so it is refused. Convert it to safetensors, or, if you trust its source, pass "
            f"{ALLOW_PICKLE}"
        )
    if not pickled:
        raise ModelNotFoundError(f"{path} has config.json but no weights ({SAFE_WEIGHTS[0]} or {SAFE_WEIGHTS[1]}); "
                                 "copy or download the whole checkpoint")


def check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table (memory-mapped, no tensor data is read) and check that
    the tokenizer metadata transformers builds the tokenizer from is there."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelNotFoundError("loading a .gguf file needs the gguf package: pip install gguf") from None
    refuse_unreadable([path])
    try:
        fields = GGUFReader(path).fields
    # gguf-py parses with numpy and struct: a short or garbled file fails in any of these
    except (ValueError, IndexError, struct.error) as err:
        raise IntegrityError(f"{path} is not a valid GGUF file ({first_line(err)}): it is truncated or corrupt; "
                             "download or convert it again") from None
    kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
    needs = ["tokenizer.ggml.model", "tokenizer.ggml.tokens"]
    if kind == "t5" or "tokenizer.ggml.merges" not in fields:  # merges are derived from the scores
        needs.append("tokenizer.ggml.scores")
    lacking = [key for key in needs if key not in fields]
    if lacking:
        raise IntegrityError(f"{path} has no {', '.join(lacking)} (tokenizer type {kind!r}): its tokenizer cannot be "
                             "rebuilt; convert the model again with llama.cpp's convert_hf_to_gguf.py")


def corrupt_safetensors(where: str, err: Exception) -> str:
    """The message for a safetensors file that does not parse, naming it when it is local."""
    bad = []
    if Path(where).is_dir():
        for path in sorted(Path(where).glob("*.safetensors")):
            try:
                with safe_open(str(path), "pt"):
                    pass
            except SafetensorError:
                bad.append(path.name)
    what = f"{where}/{bad[0]}" if bad else f"a weights file of {where}"
    return f"{what} is not a valid safetensors file ({first_line(err)}): it is truncated or corrupt; download it again"


def explain_load_error(err: Exception, where: str, trust_remote_code: bool) -> str:
    """transformers' message for a config, tokenizer or model it cannot build, plus our fix."""
    text = str(err)
    line = first_line(err)
    if "trust_remote_code" in text and not trust_remote_code:
        return (f"{where} ships its own modelling code (auto_map in its config), which transformers would have to "
                f"run, with your permissions, to load it. Read that code first; if you trust its source, pass "
                f"{TRUST_CODE}")
    if "does not recognize this architecture" in text:
        return (f"{line} Upgrade transformers (installed: {transformers.__version__}) or check config.json's "
                "model_type")
    return line


def check_loading_info(info: dict, source: str) -> None:
    """Refuse weights that do not match the model config.json builds: tensors missing (transformers
    would fill them with random values), left over, or of another shape. Tied weights are not
    listed as missing."""
    parts = []
    for kind, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys"))):
        keys = sorted(keys or ())
        if keys:
            parts.append(f"{len(keys)} tensors {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, wanted = mismatched[0]
        parts.append(f"{len(mismatched)} tensors of another shape ({key}: {tuple(stored)} in the file, {tuple(wanted)} "
                     "by config.json)")
    if parts:
        raise IntegrityError(f"the weights of {source!r} do not match its config.json: {'; '.join(parts)}. "
                             "The checkpoint is incomplete or its config belongs to another model; download it again")


def is_finite(t: torch.Tensor, chunk: int = 1 << 26) -> bool:
    """Whether every element is finite. A NaN or inf element makes the sum NaN or inf, so a finite
    sum settles it in one read (about 40x faster than isfinite on the CPU); a non-finite sum (a bad
    element, or finite values that overflow it) is settled by isfinite, `chunk` elements at a time
    (the bool mask of a whole embedding matrix would take a gigabyte of GPU memory)."""
    t = t.detach()
    if bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else None))):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite(model: nn.Module, source: str, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer is finite (one pass; the first bad tensor is named).
    Tensors offloaded by device_map (on the meta device) have no values here and are skipped."""
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not is_finite(t):
            n_bad = int((~torch.isfinite(t)).sum())
            hint = ("; in float16, values beyond ±65504 become inf: try --dtype bfloat16 or float32"
                    if dtype == torch.float16 else "")
            raise IntegrityError(f"{source!r}: {name} holds {n_bad} NaN/inf of its {t.numel()} values, as loaded and "
                                 f"before any edit{hint}; the checkpoint is corrupt: download or convert it again")


def check_tokenizer(tokenizer, source: str) -> None:
    """Give the tokenizer a pad token (its eos: the pad id only fills masked positions) and make
    sure its chat template renders in jinja's sandbox. A config's eos_token_id is no safe stand-in
    for a missing eos token: transformers fills an absent one with the model class's default."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelNotFoundError(
                f"the tokenizer of {source!r} has neither a pad nor an eos token, so prompts cannot be batched; "
                "set \"eos_token\" (and \"pad_token\") in its tokenizer_config.json to tokens of its vocabulary"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        check_chat_template(tokenizer, source)


def check_chat_template(tokenizer, source: str) -> None:
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    except SecurityError as err:
        raise ModelNotFoundError(
            f"the chat template of {source!r} does what jinja's sandbox forbids ({first_line(err)}), as a hostile "
            "template would; fix or delete it (chat_template.jinja, or chat_template in tokenizer_config.json)"
        ) from None
    except TemplateError as err:
        raise ModelNotFoundError(
            f"the chat template of {source!r} cannot render a one-message chat ({type(err).__name__}: "
            f"{first_line(err)}); fix or delete it (chat_template.jinja, or chat_template in tokenizer_config.json)"
        ) from None
