"""Where a model's inputs go. With accelerate's device map (several GPUs, ``model.max_memory``) the
parameters live on several devices, some on ``meta`` (offloaded); the token ids go to the device the
input embedding runs on, which is where every stage sends its batches."""

from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device of the input embedding's execution (accelerate's hook says where an offloaded one
    runs), else the first parameter's device that is not ``meta``."""
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a plain module, or custom code without the method
        embed = None
    if embed is not None:
        hook = getattr(embed, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        weight = getattr(embed, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


__all__ = ["input_device"]
