"""PROBE: residual-stream activations at the last k token positions of every layer.

Prompts run in length-sorted, left-padded batches under ``torch.inference_mode()``. Only the
decoder body runs (no ``lm_head``); forward hooks copy the last k positions of the embedding
output and of every decoder layer's output, as float32 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .batching import Encoded
from .errors import ActivationError
from .hook_points import hooked
from .models.adapters import ArchitectureAdapter
from .shared_prefix import can_share_prefix, forward_inputs
from .models.placement import input_device


@dataclass(frozen=True)
class ActivationCache:
    """harmful / harmless: ``[n_prompts, k_positions, n_layers + 1, d]`` float32 on CPU.

    Index j on the layer axis is ``resid_pre`` of layer j (j = 0 is the embedding output) and
    j = n_layers is the final residual (before the final norm)."""

    harmful: torch.Tensor
    harmless: torch.Tensor

    def __post_init__(self):
        for name in ("harmful", "harmless"):
            x = getattr(self, name)
            if x.ndim != 4:
                raise ActivationError(f"{name} activations must be [n, k, layers+1, d], got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                bad = (~torch.isfinite(x)).nonzero()[0].tolist()
                where = "the embedding output" if bad[2] == 0 else f"the output of layer {bad[2] - 1}"
                raise ActivationError(
                    f"{name} activations contain NaN/inf (first at prompt {bad[0]}, position {bad[1]}, {where}): the "
                    "model overflows; in float16 or bfloat16 try --dtype float32, in float32 its weights are broken"
                )
        if self.harmful.shape[1:] != self.harmless.shape[1:]:
            raise ActivationError("harmful and harmless activations differ in shape")

    @property
    def n_positions(self) -> int:
        return self.harmful.shape[1]

    @property
    def n_layers(self) -> int:
        return self.harmful.shape[2] - 1

    def at(self, layer: int, position: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_harmful, d], [n_harmless, d]) at one layer and position."""
        return self.harmful[:, position, layer], self.harmless[:, position, layer]


def auto_batch_size(adapter: ArchitectureAdapter, max_len: int, device: torch.device) -> int:
    """Prompts per forward pass: 32 on CPU; on CUDA, what half the free memory holds."""
    if device.type != "cuda":
        return 32
    free, _ = torch.cuda.mem_get_info(device)
    cfg = adapter.model.config
    d = adapter.d_model
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    heads = getattr(cfg, "num_attention_heads", 1)
    elem = next(adapter.model.parameters()).element_size()
    # live activations of one layer for one sequence: residual/qkv/attn-out (~6d), MLP (~3*inter), scores
    per_seq = max_len * (6 * d + 3 * inter + heads * max_len) * elem
    return int(max(1, min(512, free * 0.5 // max(per_seq, 1))))


def shared_prefix(adapter: ArchitectureAdapter, encoded: Encoded, positions: int) -> list[int] | None:
    """The prompts' common prefix, shortened so that every row keeps its last `positions` tokens
    outside it, when the model gives the same activations with it shared (shared_prefix.py's
    check, once per model); else None."""
    common = encoded.common_prefix()[:max(0, min(len(x) for x in encoded.ids) - positions)]
    return common if common and can_share_prefix(adapter.model, encoded, new_tokens=0) else None


def collect(
    adapter: ArchitectureAdapter,
    encoded: Encoded,
    positions: int = 1,
    batch_size: int = 0,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Activations ``[n, positions, n_layers + 1, d]`` for every encoded prompt, in input order.
    With `share_prefix`, the prompts' common template prefix runs once per batch (its keys and
    values are shared by every row, shared_prefix.py); the positions kept lie after it, and
    their activations are the same as in full left-padded batches up to float rounding."""
    device = input_device(adapter.model)
    n, L, d = len(encoded.ids), adapter.n_layers, adapter.d_model
    shortest = min(len(x) for x in encoded.ids)
    if shortest < positions:
        raise ActivationError(f"--positions {positions} exceeds the shortest prompt ({shortest} tokens)")
    prefix = shared_prefix(adapter, encoded, positions) if share_prefix else None
    bs = batch_size or auto_batch_size(adapter, max(len(x) for x in encoded.ids), device)
    out = torch.empty((n, positions, L + 1, d), dtype=torch.float32)
    buf: dict[int, torch.Tensor] = {}

    def keep(slot: int):
        def fn(h: torch.Tensor):  # h: [b, t, d]
            buf[slot] = h[:, -positions:, :].to("cpu", torch.float32)

        return fn

    names = [("embed", keep(0))] + [(f"layers.{i}.resid_post", keep(i + 1)) for i in range(L)]
    with torch.inference_mode(), hooked(adapter, names):
        for batch in encoded.batches(bs, device, prefix=prefix):
            adapter.body(**forward_inputs(adapter.model, batch, adapter.body))  # the prefix pass fills buf too;
            # this pass overwrites it: [b, positions, L+1, d]
            out[batch.index] = torch.stack([buf[j] for j in range(L + 1)], dim=2)
            if on_batch:
                on_batch(len(batch.index))
    return out
