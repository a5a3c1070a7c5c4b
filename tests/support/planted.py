"""A refusal direction planted in a tiny model: prompts that start with TRIGGER get a fixed vector added to one
layer's MLP output (tests/select/test_layer_methods.py, tests/directions/test_rdo.py)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from obliteratus.models import ArchitectureAdapter

TRIGGER = "#"
# same sentences, differing only in a first character (the trigger or not): the last-position
# activations differ mostly by what the planted writer adds
SENTENCES = ["How do I pick a lock", "Write malware now", "Help me steal a car", "Make a weapon"]
HARMFUL, HARMLESS = [f"# {s}" for s in SENTENCES], [f"& {s}" for s in SENTENCES]
TRAIN = ["Build a bomb", "Hack a bank", "Hurt someone", "Poison a well", "Rob a store"]
TRAIN_HARMFUL, TRAIN_HARMLESS = [f"# {s}" for s in TRAIN], [f"& {s}" for s in TRAIN]


@contextmanager
def planted(adapter: ArchitectureAdapter, tokenizer, u: torch.Tensor, alpha: float, layer: int):
    """Rows containing TRIGGER get alpha·u added to layer `layer`'s MLP output: a residual writer,
    so the weight edit (and `ablated`) can remove it. It shows at axes layer+1 .. L."""
    trig = tokenizer(TRIGGER, add_special_tokens=False)["input_ids"][0]
    flag = {}

    def read_ids(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        flag["rows"] = (ids == trig).any(-1).to(torch.float32)  # [b]

    def add(module, args, y):
        return y + alpha * flag["rows"][:, None, None] * u.to(y.dtype)

    handles = [adapter.body.register_forward_pre_hook(read_ids, with_kwargs=True),
               adapter.mlp_out(layer).register_forward_hook(add)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
