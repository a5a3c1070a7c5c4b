"""A safetensors checkpoint's tensors (tests/export/test_bake.py, tests/models/test_quantized.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from obliteratus.export.bake import shards_of


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory `path` (one file or sharded), by name."""
    out = {}
    for shard in shards_of(path):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
