"""EXCISE plumbing: apply the projection to every residual writer of a loaded model, in place.

Plain call: W' = W − λ·QᵀQ·W for every writer. With an :class:`~obliteratus.excise.plan.EditPlan`
the general edit W' = W − λ·s_w·U_ℓᵀ(R_ℓ W) (per-layer bases, per-writer strengths, oblique read,
optional lm_head input side) — see plan.py for the math.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import EditError
from ..models.adapters import ArchitectureAdapter
from ..models.quantized import float_weight, logical_shape, store_weight
from .base import register_excise_variant
from .plan import EditPlan, WriterEdit, lm_head_edit, resolve, writer_layer
from .projection import Layout, edit_tensor

if TYPE_CHECKING:  # config imports the option models of this package
    from ..settings import ExciseSettings


@dataclass(frozen=True)
class TensorOp:
    """One tensor's edit as excise applied it: ``edit_tensor(param, write, read, lam, layout,
    norm_preserve)`` (projection.py). An edit is the list of these in the order applied; replayed on
    another copy of the same weights (export/plan.py, export/bake.py) it gives the same tensors."""

    param: torch.Tensor = field(repr=False, compare=False)  # the live parameter (named when saved)
    write: torch.Tensor = field(repr=False)  # [k, d] float32
    read: torch.Tensor | None = field(repr=False)
    lam: float = 1.0
    layout: Layout | Literal["vector"] = "out_in"
    norm_preserve: bool = False
    # the tensor's state-dict names and logical shape, taken when the op is made (accelerate replaces an
    # offloaded parameter's object at every forward, so identity names it only until then)
    names: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return edit_tensor(weight, self.write, self.read, self.lam, self.layout, self.norm_preserve)


@dataclass
class EditReport:
    lam: float
    norm_preserve: bool
    k: int
    edited: list[str] = field(default_factory=list)  # parameter names (hook-style)
    max_residual: float = 0.0  # max |R W'| over edited matrices, relative to max |W| (≈ 0 when λ·s = 1)
    tied_lm_head_edited: bool = False
    post_writer_norm: bool = False
    variant: str = "project"  # which excision variant produced this report
    writer_weights: dict[str, float] = field(default_factory=dict)  # writer name -> strength s (λ·s applied)
    skipped: list[str] = field(default_factory=list)  # writers the plan gave strength 0
    lm_head_input_edited: bool = False
    plan: dict | None = None  # EditPlan.describe(), None for the plain projection
    details: dict = field(default_factory=dict)  # variant-specific record (heads, neurons, target, ...)
    # the edit as tensor ops, in order (None: a variant whose edit is not a sequence of TensorOps); not in
    # the JSON record: export/plan.py saves them as the run's edit plan
    ops: list[TensorOp] | None = field(default=None, repr=False, compare=False)
    ops_missing: str | None = None  # why ops is None
    # offloaded weights: the edit attached as hooks (excise/dispatch.py), removed by closing this
    hooks: ExitStack | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = asdict(replace(self, ops=None, hooks=None))
        out.pop("ops")
        out.pop("hooks")
        return out


def resolve_biases(adapter: ArchitectureAdapter, q: torch.Tensor | None, lam: float, plan: EditPlan, *,
                   attention: bool, mlp: bool, embeddings: bool = True) -> list[WriterEdit]:
    """The edits of the adapter's bias-only writers (vectors added to the residual stream outside any
    module's output, ``ArchitectureAdapter.bias_writers``) under `plan`, resolved as ``plan.resolve``
    resolves a writer: b' = b − λ·s·Uᵀ(R b) with the layer's bases and the strength of the writer's kind.
    Only with ``biases`` on: a bias-only writer *is* a bias."""
    lam = plan.lam if plan.lam is not None else lam
    edits = []
    for writer in adapter.bias_writers(attention=attention, mlp=mlp, embeddings=embeddings):
        layer = writer_layer(writer)
        s = plan.strength_for(writer.kind, layer)
        if s == 0.0:
            continue
        write = plan.write_basis(layer, q)
        edits.append(WriterEdit(writer, layer, write, plan.read_basis(layer, write), lam * s, s))
    return edits


@torch.no_grad()
def excise(adapter: ArchitectureAdapter, q: torch.Tensor | None, settings: ExciseSettings,
           plan: EditPlan | None = None, *, write: bool = True) -> EditReport:
    """W' = W − λ·s·Uᵀ(R W) on the residual side of each writer (b' = b − λ·s·Uᵀ(R b)); with no
    plan, U = R = q and s = 1, i.e. W' = W − λ·QᵀQ·W. ``report.ops`` records it as TensorOps.

    Each new weight is computed in float32 on a copy, checked to be finite, then written back in
    the stored dtype. Nothing is written if any edit would be non-finite. A bitsandbytes-packed
    weight is dequantized, edited and quantized again with its own settings (models/quantized.py).
    With ``write=False`` nothing is read or written: the report names the edit and holds its ops
    (offloaded weights: the pipeline applies them as hooks and bakes them into the source)."""
    given = plan
    plan = plan or EditPlan()
    q = None if q is None else q.detach().float()
    norm_preserve = settings.norm_preserve if plan.norm_preserve is None else plan.norm_preserve
    edits, skipped = resolve(adapter, q, settings.lam, plan, attention=settings.attention, mlp=settings.mlp,
                             embeddings=settings.embeddings, experts=settings.experts)
    biases = resolve_biases(adapter, q, settings.lam, plan, attention=settings.attention, mlp=settings.mlp,
                            embeddings=settings.embeddings) if settings.biases else []
    head = lm_head_edit(adapter, q, settings.lam, plan)
    k = q.shape[0] if q is not None else (edits[0].write.shape[0] if edits else 0)
    report = EditReport(settings.lam if plan.lam is None else plan.lam, norm_preserve, k,
                        post_writer_norm=adapter.post_writer_norm, skipped=skipped,
                        plan=None if given is None else plan.describe())

    names: dict[int, list[str]] = {}
    for name, p in adapter.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)

    def op(param, write, read, lam, layout, preserve=False):
        return TensorOp(param, write, read, lam, layout, preserve, tuple(names.get(id(param), ())),
                        logical_shape(param))

    def ops_of(e):  # the TensorOps of one writer
        weight = e.writer.weight
        if e.writer.bias_only:  # a bias-only writer: the vector itself, projected as a bias
            yield op(weight, e.write, e.read, e.lam, "vector")
            return
        yield op(weight, e.write, e.read, e.lam, e.writer.layout, norm_preserve)
        if settings.biases and e.writer.bias is not None:
            yield op(e.writer.bias, e.write, e.read, e.lam, "vector")

    def new_params(e):  # (param, new value in the stored dtype) for one writer
        for op in ops_of(e):
            yield op.param, op.apply(float_weight(op.param))

    def head_op():  # lm_head input side: W_U' = W_U − λ·(W_U Uᵀ) R (the in_out form with U, R swapped)
        write, read, lam = head
        return op(adapter.lm_head.weight, write if read is None else read, write, lam, "in_out")

    def head_param():
        op = head_op()
        return op.param, op.apply(float_weight(op.param))

    if not write:
        report.ops = [op for e in [*edits, *biases] for op in ops_of(e)] + ([head_op()] if head is not None else [])
        for e in edits:  # named as the writes below name them
            report.writer_weights[e.writer.name] = e.strength
            report.edited += [f"{e.writer.name}.{'weight' if op.param is e.writer.weight else 'bias'}"
                              for op in ops_of(e)]
        for e in biases:
            report.writer_weights[e.writer.name] = e.strength
            report.edited += [f"{e.writer.name}.{e.writer.param}" for _ in ops_of(e)]
        if head is not None:
            report.edited.append("lm_head.weight")
            report.lm_head_input_edited = True
        report.tied_lm_head_edited = adapter.tied_lm_head and any(e.writer.module is adapter.embeddings[0] for e in edits)
        return report

    # Pass 1 checks every edit (in the stored dtype, where fp16 can overflow) without keeping it, so
    # a failure leaves the model untouched and memory stays at one matrix; pass 2 writes.
    for e in [*edits, *biases]:
        for _, new in new_params(e):
            if not torch.isfinite(new).all():
                raise EditError(f"editing {e.writer.name} would produce non-finite weights; nothing was changed")
    if head is not None and not torch.isfinite(head_param()[1]).all():
        raise EditError("editing the lm_head input side would produce non-finite weights; nothing was changed")
    report.ops = [op for e in [*edits, *biases] for op in ops_of(e)]
    if head is not None:
        report.ops.append(head_op())
    for e in edits:
        writer = e.writer
        for param, new in new_params(e):
            store_weight(param, new)
            report.edited.append(f"{writer.name}.{'weight' if param is writer.weight else 'bias'}")
        report.writer_weights[writer.name] = e.strength
        weight = float_weight(writer.weight).float()
        r = (e.write if e.read is None else e.read).to(weight.device)
        along = (r @ weight) if writer.layout == "out_in" else (weight @ r.T)
        report.max_residual = max(report.max_residual, float(along.abs().max() / weight.abs().max().clamp_min(1e-12)))
    for e in biases:
        for param, new in new_params(e):
            store_weight(param, new)
            report.edited.append(f"{e.writer.name}.{e.writer.param}")
        report.writer_weights[e.writer.name] = e.strength
    if head is not None:
        param, new = head_param()
        store_weight(param, new)
        report.edited.append("lm_head.weight")
        report.lm_head_input_edited = True
    report.tied_lm_head_edited = adapter.tied_lm_head and any(
        e.writer.module is adapter.embeddings[0] for e in edits)
    return report


register_excise_variant(
    "project", "W' = W - lam*QQ^T W on every selected writer (Arditi et al. 2024; norm_preserve keeps column norms)",
    excise, what="projects the basis out of every selected writer", hook_form=True, low_rank=True, neurons=True)
