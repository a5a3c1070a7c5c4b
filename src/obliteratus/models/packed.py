"""CPU fast path: ``nn.Linear`` layers that multiply with a oneDNN-packed copy of their weight.

On a CPU, generation multiplies a few dozen rows (one new token per sequence) by every weight
matrix, a shape MKL's plain GEMM handles poorly: on the 2-core box of benchmarks/RESULTS.md a
[32 × 896] · [896 × 151936] product (the demo model's unembedding) runs at 43–65 GFLOP/s through
``F.linear`` and about 100 through oneDNN with the weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the kernels PyTorch's own
inductor uses for CPU inference). On the demo model an optimizer trial's refusal count ran 1.23×
faster and VERIFY 1.08× (benchmarks/packed_linear.py), and the optimizer's complete trials took
22.0 s instead of 30.9 (median), with the same answers and verdicts.

:func:`pack_linears` gives each float32 CPU ``nn.Linear`` of a model a forward that uses such a
packed copy, and :func:`unpack_linears` takes it away again. Weights are never written, so the
model's parameters and state dict are unchanged. The packed copy is made at the first call and
made again whenever the weight changed since (its storage or its version counter, which every
in-place write such as EXCISE's ``param.copy_`` bumps), so an edited model is never run on a
stale copy. A call falls back to ``F.linear`` when gradients are needed (RDO), when the input is
not float32 on the CPU, or when it has more than :data:`MAX_ROWS` rows (long prefills, where
plain GEMM is as fast). The price is memory: one packed copy of every Linear weight that runs
(about 2 GB for the 0.5B demo model in float32); ``model.cpu_pack = "off"`` turns it off.
"""

from __future__ import annotations

import logging
import types
import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 512  # above this many rows plain GEMM is as fast (benchmarks/packed_linear.py)
HINT_ROWS = 32  # the batch size oneDNN chooses the packed layout for


def _packable(module: nn.Module) -> bool:
    """A plain nn.Linear (not a subclass such as a bitsandbytes layer) with a float32 CPU weight."""
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"


def available() -> bool:
    """Whether this PyTorch build has the oneDNN packed-linear kernels and they compute F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, b, x = torch.randn(8, 16), torch.randn(8), torch.randn(3, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, HINT_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        log.info("oneDNN packed linear unavailable: %s", err)
        return False
    return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4))


_STATE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # module -> (key, packed)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward on the packed copy of ``self.weight`` (bound to a module by
    :func:`pack_linears`; a bound method, so a deep copy of the model runs its own weights)."""
    w, b = self.weight, self.bias
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu"
            or x.numel() > MAX_ROWS * x.shape[-1]
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return F.linear(x, w, b)
    key = (w.data_ptr(), w._version)
    state = _STATE.get(self)
    if state is None or state[0] != key:  # first call, or the weight was written since it was packed
        state = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), HINT_ROWS))
        _STATE[self] = state
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), state[1], b, "none", [], "")


def is_packed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _packed_forward


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the float32 CPU Linear weights (each shared weight once): what packing copies."""
    return sum({m.weight.data_ptr(): m.weight.numel() * 4 for m in model.modules() if _packable(m)}.values())


def free_memory() -> int | None:
    """Bytes of memory available now (Linux /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pack_linears(model: nn.Module, check_memory: bool = True) -> int:
    """Give every plain float32 CPU ``nn.Linear`` of `model` the packed forward (module docstring);
    returns how many modules have it. Subclasses (e.g. bitsandbytes layers) and other layer types
    keep theirs. With `check_memory`, nothing is packed when the copies would take more than half
    of the memory available now. Does nothing (with a warning) where the kernels are missing."""
    targets = [m for m in model.modules() if _packable(m) and not is_packed(m)]
    if not targets:
        return sum(is_packed(m) for m in model.modules())
    if not available():
        warnings.warn("this PyTorch build lacks oneDNN's packed linear kernels; CPU generation runs on plain "
                      "GEMM (slower, same results)", stacklevel=2)
        return 0
    need, free = linear_bytes(model), free_memory() if check_memory else None
    if free is not None and need > free // 2:
        log.info("not packing Linear weights: %.1f GB of copies, %.1f GB free", need / 1e9, free / 1e9)
        return 0
    for module in targets:
        module.forward = types.MethodType(_packed_forward, module)
    return sum(is_packed(m) for m in model.modules())


def unpack_linears(model: nn.Module) -> None:
    """Restore the class forward of every packed Linear (the packed copies are freed with it)."""
    for module in model.modules():
        if is_packed(module):
            del module.forward
            _STATE.pop(module, None)
