"""Weights that are not plain tensors: bitsandbytes 4-bit (nf4) and 8-bit (int8) parameters, and
parameters that accelerate offloaded to the CPU or disk (``model.quantization``, ``model.max_memory``,
``model.offload_dir``).

A packed parameter is never edited as bytes. EXCISE reads it with :func:`float_weight` (the
dequantized matrix, in its logical shape), edits that with the same ``edit_tensor`` as any weight, and
writes it back with :func:`store_weight`, which quantizes the edited matrix with the parameter's own
settings (block size, nf4/fp4, storage; int8: per-row absmax), keeping its block scales in float32
rather than quantizing them again (double quantization would move them by its own rounding each
time). Dequantizing and quantizing again an unedited matrix gives the same codes and the same
values (tests/models/test_quantized.py), so only the edit's own change is re-quantized. The edit plan records the logical shape (:func:`logical_shape`),
so a plan made on a 4-bit load bakes into the full-precision checkpoint (export/bake.py).

An offloaded parameter lives on the ``meta`` device and is streamed in by accelerate's hooks from a
CPU copy or from disk, possibly from the source checkpoint's own files: it is not edited at all
(:func:`offloaded`); such a run scores its edit with hooks and REBIRTH bakes the plan into the source.

bitsandbytes is imported with the ``kernels`` package hidden: on CPUs with AVX512-BF16 its CPU backend
would otherwise fetch a kernel from the Hugging Face Hub at import (no network unless asked for).
"""

from __future__ import annotations

import importlib
import logging
import sys

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ..errors import ConfigError

log = logging.getLogger(__name__)

_BNB = None


def bitsandbytes():
    """The bitsandbytes module, imported once without its hub kernel fetch; a clear error without it."""
    global _BNB
    if _BNB is None:
        hidden = "kernels" not in sys.modules
        if hidden:
            sys.modules["kernels"] = None  # `from kernels import get_kernel` fails: bitsandbytes falls back
        quiet = logging.getLogger("bitsandbytes")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its "failed to load the hub kernel" warning is the fallback we asked for
        try:
            _BNB = importlib.import_module("bitsandbytes")
            importlib.import_module("bitsandbytes.functional")
        except ImportError as err:
            raise ConfigError("model.quantization needs bitsandbytes: pip install 'obliteratus[quant]' "
                              f"(bitsandbytes >= 0.45; {err})") from None
        finally:
            quiet.setLevel(level)
            if hidden:
                del sys.modules["kernels"]
    return _BNB


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``model.quantization`` = nf4 | int8."""
    bitsandbytes()
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"model.quantization = {kind!r}: one of none, nf4, int8")


def _kind(param: torch.Tensor) -> str | None:
    name = type(param).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params" and param.dtype == torch.int8:
        return "int8"
    return None


def is_packed(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit or 8-bit parameter (its bytes are codes, not values)."""
    return _kind(param) is not None


def offloaded(param: torch.Tensor) -> bool:
    """A parameter accelerate keeps elsewhere (CPU or disk) and streams in per forward."""
    return param.device.type == "meta"


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the matrix a parameter stands for (a 4-bit parameter is stored as [n·m/2, 1])."""
    if _kind(param) == "4bit":
        return tuple(param.quant_state.shape)
    return tuple(param.shape)


def float_weight(param: torch.Tensor) -> torch.Tensor:
    """The values of `param`: the tensor itself, or the dequantized matrix of a packed parameter (in
    the dtype it was quantized from: the compute dtype of the load)."""
    kind = _kind(param)
    if kind is None:
        if offloaded(param):
            raise ConfigError("an offloaded parameter (model.max_memory / model.offload_dir) has no values in "
                              "memory to edit")
        return param.detach()
    functional = bitsandbytes().functional
    if kind == "4bit":
        _canonical(param)
        return functional.dequantize_4bit(param.data, param.quant_state)
    return functional.int8_vectorwise_dequant(param.data, _int8_scales(param))


def _int8_scales(param: torch.Tensor) -> torch.Tensor:
    """An 8-bit weight's per-row scales: on the parameter until its first forward, then in its
    module's state (:func:`track_modules` links the two)."""
    if getattr(param, "SCB", None) is not None:
        return param.SCB
    state = getattr(param, "_obliteratus_state", None)
    if state is None or state.SCB is None:
        raise ConfigError("an 8-bit weight whose scales are in its module's state: call "
                          "models.quantized.track_modules(model) after loading it")
    return state.SCB


def track_modules(model: nn.Module) -> None:
    """Link every bitsandbytes 8-bit weight to its module's state, where its scales move at the
    first forward (summon and the edit call this)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and _kind(weight) == "int8" and hasattr(module, "state"):
            weight._obliteratus_state = module.state


def _canonical(param: torch.Tensor) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight (done at its first forward on CPUs with
    AVX512-BF16, and undone the same way when it saves): the next forward packs it again."""
    if getattr(param.quant_state, "packing_format_for_cpu", False):
        param.data, param.quant_state = bitsandbytes().functional._convert_weight_packed_for_cpu_inverse(
            param.data, param.quant_state)


@torch.no_grad()
def store_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write `value` (the matrix in its logical shape) into `param`: copied as is, or quantized with the
    packed parameter's own settings."""
    kind = _kind(param)
    if kind is None:
        param.copy_(value)
        return
    functional = bitsandbytes().functional
    if tuple(value.shape) != logical_shape(param):
        raise ValueError(f"a {list(value.shape)} value for a {list(logical_shape(param))} packed parameter")
    if kind == "4bit":
        _canonical(param)
        state = param.quant_state
        packed, new_state = functional.quantize_4bit(
            value.to(state.dtype), blocksize=state.blocksize, quant_type=state.quant_type,
            compress_statistics=False, quant_storage=param.quant_storage)
        param.data = packed
        param.quant_state = new_state
        return
    codes, scales, _ = functional.int8_vectorwise_quant(value.to(torch.float16))
    param.data = codes
    param.CB, param.SCB = codes, scales  # the module's next forward moves them into its state
    state = getattr(param, "_obliteratus_state", None)
    if state is not None:
        state.CB, state.SCB = codes, scales


def quantized(model: nn.Module) -> str | None:
    """'nf4' / 'fp4' / 'int8' when some parameter of `model` is packed by bitsandbytes, else None."""
    for p in model.parameters():
        kind = _kind(p)
        if kind == "int8":
            return "int8"
        if kind == "4bit":
            return p.quant_state.quant_type
    return None


def has_offload(model: nn.Module) -> bool:
    return any(offloaded(p) for p in model.parameters())


__all__ = ["bitsandbytes", "float_weight", "has_offload", "is_packed", "logical_shape", "offloaded",
           "quantization_config", "quantized", "store_weight", "track_modules"]
