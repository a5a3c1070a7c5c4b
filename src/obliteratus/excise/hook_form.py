"""The activation-space version of the projection edit: the same map applied to each writer's
output by forward hooks, so a candidate edit can be scored without touching any weight.

For a writer y = W x + b (or x W + b), the weight edit W' = W − λ·Uᵀ(R W) (row-vector form
y ↦ y − λ·(y Rᵀ) U; U = R = Q for the plain projection) gives
    y' = W' x + b' = y − λ·((y − b) Rᵀ) U − λ·(b Rᵀ) U·[biases]
i.e. y' = y − λ·(y Rᵀ) U when biases are projected too, and y − λ·((y − b) Rᵀ) U when not.
With an EditPlan, U, R and λ·s are the writer's own (plan.resolve, the same resolution as the
weight path); a writer with s = 0 gets no hook.

When the token embedding is edited and the lm_head shares its weight E, logits = x E'ᵀ with
E' = E − λ·(E Rᵀ) U, so logits = (x − λ·(x Uᵀ) R) Eᵀ: the lm_head input gets the map with U and
R swapped (the same map when R = U). The plan's lm_head input-side edit W_U' = W_U − λ·(W_U Uᵀ) R
gives logits = (x − λ·(x Rᵀ) U) W_Uᵀ. (The norm-preserving edit is not linear in the output and
has no hook form: a plan asking for it is refused.)

A bias-only writer (``ArchitectureAdapter.bias_writers``: a vector that code adds to the residual
stream outside any module's output) has no output to hook: within the block its vector holds the
edited value b' = b − λ·Uᵀ(R b), the same as the weight edit, and gets its old value back on exit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from ..errors import EditError
from ..hook_points import module_hooks
from ..models.adapters import ArchitectureAdapter
from .apply import resolve_biases
from .moe import routed_bias_hook
from .projection import oblique_project_vector
from .plan import EditPlan, lm_head_edit, resolve


def _remove(q: torch.Tensor, lam: float, bias: torch.Tensor | None, read: torch.Tensor | None = None):
    """y ↦ y − λ·((y − bias) Rᵀ) U with U = q and R = read (default q)."""
    cache: dict = {}

    def project(y: torch.Tensor) -> torch.Tensor:
        key = (y.device, y.dtype)
        if key not in cache:
            u = q.to(device=y.device, dtype=y.dtype)
            cache[key] = (u, u if read is None else read.to(device=y.device, dtype=y.dtype))
        u, r = cache[key]
        base = y if bias is None else y - bias.to(y.dtype)
        return y - lam * (base @ r.T) @ u  # [..., d]

    return project


@contextmanager
def ablated(adapter: ArchitectureAdapter, q: torch.Tensor | None, lam: float = 1.0, *, attention: bool = True,
            mlp: bool = True, embeddings: bool = True, biases: bool = True,
            plan: EditPlan | None = None, experts: bool | None = None) -> Iterator[None]:
    """Within the block, every selected writer's output has λ·P removed, exactly as the weight edit would
    (with `plan`: exactly as ``excise(..., plan=plan)`` would)."""
    plan = plan or EditPlan()
    if plan.norm_preserve:
        raise EditError("a norm-preserving edit has no activation-hook form (it is not linear in the "
                        "writer's output); score it with the weight edit on a copy instead")
    q = None if q is None else q.detach().float()
    edits, _ = resolve(adapter, q, lam, plan, attention=attention, mlp=mlp, embeddings=embeddings, experts=experts)
    outputs, routed, inputs = [], [], []
    for e in edits:
        if not biases and e.writer.routed_bias:  # fused experts keep a routed bias: needs the routing weights
            if e.read is not None:
                raise EditError(f"{e.writer.name}: an oblique edit that keeps the routed expert biases has no hook form")
            routed.append((e.writer.hook_module, routed_bias_hook(e.writer, e.write, e.lam)))
            continue
        bias = None if biases else e.writer.bias
        project = _remove(e.write, e.lam, None if bias is None else bias.detach(), e.read)
        if e.writer.hook_input is not None:  # the module normalises its own output: project the norm's input
            inputs.append((e.writer.hook_input, lambda m, a, f=project: (f(a[0]), *a[1:])))
            continue
        outputs.append((e.writer.hook_module, lambda m, a, y, f=project: f(y)))
    pre = list(inputs)
    for e in edits:
        if adapter.tied_lm_head and e.writer.module is adapter.embeddings[0]:
            # swapped roles: x ↦ x − λ·(x Uᵀ) R
            project = _remove(e.write if e.read is None else e.read, e.lam, None, e.write)
            pre.append((adapter.lm_head, lambda m, a, f=project: (f(a[0]), *a[1:])))
    head = lm_head_edit(adapter, q, lam, plan)
    if head is not None:
        write, read, head_lam = head
        project = _remove(write, head_lam, None, read)
        pre.append((adapter.lm_head, lambda m, a, f=project: (f(a[0]), *a[1:])))
    with module_hooks(outputs), module_hooks(routed, with_kwargs=True), module_hooks(pre, pre=True), \
            (_edited_biases(adapter, q, lam, plan, attention, mlp, embeddings) if biases else nullcontext()):
        yield


@contextmanager
def _edited_biases(adapter: ArchitectureAdapter, q, lam: float, plan: EditPlan, attention: bool,
                   mlp: bool, embeddings: bool) -> Iterator[None]:
    """The bias-only writers hold their edited vectors within the block (see the module docstring)."""
    saved = []
    try:
        with torch.no_grad():
            for e in resolve_biases(adapter, q, lam, plan, attention=attention, mlp=mlp, embeddings=embeddings):
                p = e.writer.weight
                saved.append((p, p.detach().clone()))
                p.copy_(oblique_project_vector(p.detach(), e.write, e.read, e.lam).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, old in reversed(saved):
                p.copy_(old)
