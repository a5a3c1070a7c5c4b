"""The activation-space version of the projection edit: the same map applied to each writer's
output by forward hooks, so a candidate edit can be scored without touching any weight.

For a writer y = W x + b (or x W + b), the weight edit gives
    y' = W' x + b' = y − λ·((y − b) Qᵀ) Q − λ·(b Qᵀ) Q·[biases]
i.e. y' = y − λ·(y Qᵀ) Q when biases are projected too, and y − λ·((y − b) Qᵀ) Q when not.
When the token embedding is edited and the lm_head shares its weight, logits = x E'ᵀ
= (x − λ (x Qᵀ) Q) Eᵀ, so the lm_head input is projected as well. (The norm-preserving edit is
not linear in the output and has no hook form.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..hooks import module_hooks
from ..models.adapters import ArchitectureAdapter


def _remove(q: torch.Tensor, lam: float, bias: torch.Tensor | None):
    cache: dict = {}

    def project(y: torch.Tensor) -> torch.Tensor:
        key = (y.device, y.dtype)
        if key not in cache:
            cache[key] = q.to(device=y.device, dtype=y.dtype)
        qq = cache[key]
        base = y if bias is None else y - bias.to(y.dtype)
        return y - lam * (base @ qq.T) @ qq  # [..., d]

    return project


@contextmanager
def ablated(adapter: ArchitectureAdapter, q: torch.Tensor, lam: float = 1.0, *, attention: bool = True,
            mlp: bool = True, embeddings: bool = True, biases: bool = True) -> Iterator[None]:
    """Within the block, every selected writer's output has λ·P removed, exactly as the weight edit would."""
    q = q.detach().float()
    outputs = []
    for writer in adapter.writers(attention=attention, mlp=mlp, embeddings=embeddings):
        bias = None if biases else writer.bias
        project = _remove(q, lam, None if bias is None else bias.detach())
        outputs.append((writer.module, lambda m, a, y, f=project: f(y)))
    pre = []
    if embeddings and adapter.tied_lm_head:
        project = _remove(q, lam, None)
        pre.append((adapter.lm_head, lambda m, a, f=project: (f(a[0]), *a[1:])))
    with module_hooks(outputs), module_hooks(pre, pre=True):
        yield
