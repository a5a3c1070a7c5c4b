"""Named hooks. Hooks exist only inside :func:`hooked`, which removes them in ``finally``.

A hook function receives the activation tensor ``[batch, seq, d]`` and returns a replacement
(or ``None`` to leave it unchanged). Decoder layers may return a tensor or a tuple whose first
element is the hidden state (a list in GPT-1); all are handled here so techniques never see the difference.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .models.adapters import ArchitectureAdapter

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _output_hook(fn: HookFn):
    def hook(module, args, output):
        if isinstance(output, (tuple, list)):  # (GPT-1's blocks return a list)
            new = fn(output[0])
            return output if new is None else type(output)([new, *output[1:]])
        return fn(output)

    return hook


def _input_hook(fn: HookFn):
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


@contextmanager
def hooked(adapter: ArchitectureAdapter, hooks: dict[str, HookFn] | list[tuple[str, HookFn]]) -> Iterator[None]:
    """Register hooks by name for the duration of the block."""
    items = hooks.items() if isinstance(hooks, dict) else hooks
    handles = []
    try:
        for name, fn in items:
            module, side = adapter.module_for(name)
            if side == "output":
                handles.append(module.register_forward_hook(_output_hook(fn)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def module_hooks(pairs: list[tuple[torch.nn.Module, Callable]], *, pre: bool = False,
                 with_kwargs: bool = False) -> Iterator[None]:
    """Raw forward (or forward-pre) hooks on modules, removed in ``finally``."""
    handles = []
    try:
        for module, fn in pairs:
            if pre:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
