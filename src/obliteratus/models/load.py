"""SUMMON: load a causal LM (alias, local directory, .gguf file or hub id) with its adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from ..errors import ConfigError, IntegrityError, ModelNotFoundError, UnsupportedArchitectureError
from ..steering import attach_steering, has_steering, load_steering
from .adapters import ArchitectureAdapter
from .aliases import ALIASES, prepare, strip_gguf_quantizer
from .options import ModelSettings
from .packed import pack_linears
from .quantized import quantization_config, track_modules
from .trust import (check_finite, check_gguf, check_loading_info, check_local_dir, check_tokenizer,
                    corrupt_safetensors, explain_load_error)
from .placement import input_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    source: str  # what the user asked for
    path: str  # what was loaded (local dir, gguf file or hub id)
    steering: object | None = None  # steering.SteeringHandle attached from the model dir, if any
    processor: object | None = None  # a multimodal model's processor (tokenizer + image processor), saved with it

    @property
    def saves_with(self):
        """What REBIRTH saves beside the weights: the processor when there is one (its tokenizer,
        image processor and chat template), else the tokenizer."""
        return self.processor if self.processor is not None else self.tokenizer

    @property
    def device(self) -> torch.device:
        return input_device(self.model)


def resolve_source(source: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None). Raises when a local-looking path is missing."""
    if source in ALIASES:
        return str(prepare(source)), None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {source}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{source} is a directory without config.json, not a Hugging Face model")
        return str(path), None
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(
            f"model not found: {source!r} is neither an alias ({', '.join(ALIASES)}), a local directory, "
            "a .gguf file, nor a hub id of the form org/name"
        )
    return source, None  # hub id


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("--device cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(dtype: str, device: str, config) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device == "cpu":
        return torch.float32  # bf16/fp16 matmuls are slow or unsupported on most CPUs
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = DTYPES.get(str(stored).replace("torch.", ""), None) if stored is not None else None
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def read_config(where: str, gguf_file: str | None, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(where, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot load the model config of {where!r}: "
                                 f"{explain_load_error(err, where, trust_remote_code)}") from None


def model_class(config, trust_remote_code: bool = False) -> type:
    """The Auto class `config` is loaded and saved with, decided before any weight is read:
    ``AutoModelForImageTextToText`` when the checkpoint is the image-text-to-text class of its type
    (Gemma 3, Llama 4, Qwen2.5-VL, ...: loading them as a causal LM would drop or refuse the vision
    tower), else ``AutoModelForCausalLM``. Encoder-decoder and encoder-only models, and types that
    neither mapping of the installed transformers knows, are refused with the reason."""
    model_type = config.model_type
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: an encoder-decoder model; obliteratus edits decoder-only "
            "language models (and the text decoder of image-text-to-text models)")
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM
    if trust_remote_code and "AutoModelForImageTextToText" in auto_map:
        return AutoModelForImageTextToText
    archs = list(getattr(config, "architectures", None) or [])
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    image_text = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if image_text is not None and (causal is None or (archs and archs[0] == image_text)):
        return AutoModelForImageTextToText
    if causal is None:
        remote = " (its auto_map names custom code: pass --set model.trust_remote_code=true to use it)" \
            if auto_map and not trust_remote_code else ""
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: transformers {transformers.__version__} has no causal-LM "
            f"or image-text-to-text class for it{remote}")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(text, "is_decoder", False):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: an encoder-only model (config.is_decoder is false); "
            "obliteratus edits decoder-only language models")
    return AutoModelForCausalLM


def load_processor(where: str, auto: type, trust_remote_code: bool):
    """The processor of an image-text-to-text checkpoint that has one (None otherwise), so the saved
    model keeps its image processor and chat template. One that cannot be built is an error: saving
    without it would lose files the source has."""
    if auto is not AutoModelForImageTextToText or not Path(where).is_dir() or not any(
            (Path(where) / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        return None
    try:
        return AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise ModelNotFoundError(f"cannot load the processor of {where!r} (its image processor would not be "
                                 f"saved with the edited model): {str(err).splitlines()[0]}") from None


def placement(settings: ModelSettings, device: str, dtype: torch.dtype, gguf_file: str | None,
              where: str | None = None) -> dict:
    """from_pretrained's device map, memory limits and quantization for `settings` (models/quantized.py):
    one device by default, accelerate's ``auto`` map over several GPUs or with ``max_memory``, and
    bitsandbytes for ``quantization`` (on the CPU too: bitsandbytes >= 0.45 has a CPU backend)."""
    out: dict = {}
    if settings.quantization != "none":
        if gguf_file:
            raise ConfigError(f"model.quantization = {settings.quantization!r}: a GGUF file is dequantized by "
                              "transformers; quantize a safetensors checkpoint instead")
        out["quantization_config"] = quantization_config(settings.quantization, dtype)
        out["device_map"] = device  # bitsandbytes quantizes while loading onto the device
    if settings.max_memory is not None:
        out["device_map"] = "auto"
        out["max_memory"] = settings.device_max_memory()
        if settings.offload_dir is not None:
            folder = Path(settings.offload_dir).expanduser().resolve()
            model_dir = Path(where).resolve() if where is not None and Path(where).is_dir() else None
            if model_dir is not None and (folder == model_dir or model_dir in folder.parents
                                          or folder in model_dir.parents):
                raise ConfigError(f"model.offload_dir {folder} overlaps the model's directory {where}: offloaded "
                                  "weights are written there; give a scratch directory outside it")
            out["offload_folder"] = str(folder)
    elif settings.offload_dir is not None:
        raise ConfigError("model.offload_dir is where model.max_memory offloads to: set max_memory too")
    elif device == "cuda" and torch.cuda.device_count() > 1:
        out["device_map"] = "auto"
    return out


def summon(source: str, settings: ModelSettings | None = None, *, steering: bool = True) -> Loaded:
    """Load `source` for inference (eval mode, no grad) with its architecture adapter.

    A local model directory with ``steering.json`` + ``steering.safetensors`` (see
    :mod:`obliteratus.steering`) gets those hooks attached, so the model evaluated is the model that
    was saved (``Loaded.steering`` holds the handle); ``steering=False`` loads the bare weights."""
    if settings is None:
        settings = ModelSettings()
    where, gguf_file = resolve_source(source)
    if gguf_file:
        check_gguf(Path(where) / gguf_file)
    elif Path(where).is_dir():
        check_local_dir(Path(where), settings.allow_pickle)
    config = read_config(where, gguf_file, settings.trust_remote_code)
    auto = model_class(config, settings.trust_remote_code)  # fail before loading any weights
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, config)
    # mismatched shapes are reported in the loading info and refused below, with the tensor named
    kwargs: dict = dict(dtype=dtype, trust_remote_code=settings.trust_remote_code, output_loading_info=True,
                        ignore_mismatched_sizes=True, use_safetensors=None if settings.allow_pickle else True)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    kwargs.update(placement(settings, device, dtype, gguf_file, where))
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:  # no tokenizer files, or ones it cannot build
        needs = "" if gguf_file else " (a model directory needs tokenizer.json or the files it is built from)"
        raise ModelNotFoundError(f"cannot load the tokenizer of {source!r}: "
                                 f"{explain_load_error(err, where, settings.trust_remote_code)}{needs}") from None
    try:
        model, info = auto.from_pretrained(where, **kwargs)
    except SafetensorError as err:
        raise IntegrityError(corrupt_safetensors(where, err)) from None
    except OSError as err:
        hint = ("; only safetensors weights are loaded unless you pass --set model.allow_pickle=true"
                if not settings.allow_pickle and "safetensors" in str(err) else "")
        raise ModelNotFoundError(f"cannot load {source!r}: {str(err).splitlines()[0]}{hint}") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ModelNotFoundError(f"cannot load {source!r}: "
                                 f"{explain_load_error(err, where, settings.trust_remote_code)}") from None
    check_loading_info(info, source)
    if gguf_file:
        strip_gguf_quantizer(model)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    track_modules(model)  # bitsandbytes 8-bit weights: their scales move into the module at the first forward
    check_finite(model, source, dtype)  # before packing: the packed copies are made from these weights
    if device == "cpu" and settings.cpu_pack == "auto" and "device_map" not in kwargs:
        pack_linears(model)
    processor = None if gguf_file else load_processor(where, auto, settings.trust_remote_code)
    check_tokenizer(tokenizer, source)  # pad = eos when it has no pad token; the chat template renders
    tokenizer.padding_side = "left"
    loaded = Loaded(model, tokenizer, ArchitectureAdapter(model), source,
                    gguf_file and str(Path(where) / gguf_file) or where, processor=processor)
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer = tokenizer  # one tokenizer object: the padding side and pad token set above
    if not gguf_file and Path(where).is_dir():
        if has_steering(where):
            if steering:
                loaded.steering = attach_steering(loaded.adapter, load_steering(where), source=where)
                log.info("attached %d steering entries from %s", len(loaded.steering.spec.entries), where)
            else:
                log.info("%s has steering files; not attached (steering=False)", where)
    return loaded


def describe(loaded: Loaded) -> dict:
    cfg = loaded.model.config
    return {
        "source": loaded.source,
        "path": loaded.path,
        "family": loaded.adapter.family,
        "model_type": cfg.model_type,
        "n_layers": loaded.adapter.n_layers,
        "d_model": loaded.adapter.d_model,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "tied_lm_head": loaded.adapter.tied_lm_head,
        "steering": None if loaded.steering is None else loaded.steering.describe(),
        "config": json.loads(cfg.to_json_string()),
    }
