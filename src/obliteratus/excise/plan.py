"""EditPlan: one description of a general EXCISE edit, shared by the weight path
(:func:`obliteratus.excise.apply.excise`) and the hook path (:func:`obliteratus.excise.hook_form.ablated`),
so both apply the same map to the same writers by construction.

For a residual writer w in layer ℓ (``None`` for the embeddings) the edit is

    x ↦ (I − λ·s_w·U_ℓᵀ R_ℓ) x          on the writer's residual side (output)

* U_ℓ [k, d] — the *write* basis: ``layer_bases[ℓ]`` when given (per-layer directions, Heretic's
  "per layer" scope), else the global basis ``q`` passed to ``excise``/``ablated``.
* R_ℓ [k, d] — the *read* basis: ``read`` (a tensor, or ``{layer: tensor}``); when absent R = U
  and the map is the orthogonal projection of ``projection.project_out``. With R·Uᵀ = I it is an
  oblique projection (LEACE), W' = W − λ·Uᵀ(R W).
* s_w — the per-writer strength: ``strength(kind, layer)`` (a function) or ``strength[(kind, layer)]``
  (a table; a missing key means 0). s = 0 skips the writer (nothing written, nothing hooked);
  kernels.kernel_strength builds Heretic's table.
* λ — ``lam``, which overrides the ``lam`` given by the settings / the ``ablated`` argument.
* ``lm_head_input`` (off by default) also edits the lm_head's input side, W_U' = W_U (I − λ·UᵀR)
  i.e. W_U' = W_U − λ·(W_U Uᵀ) R, so the unembedding ignores the direction. Refused for a tied
  lm_head (its weight is the embedding; edit the embeddings instead).
* ``norm_preserve`` (None = the settings' value): after the edit rescale each residual-side vector
  to its old norm (weight path only: not linear in the output, so it has no hook form).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch

from ..errors import EditError
from ..models.adapters import ArchitectureAdapter, Writer

StrengthFn = Callable[[str, "int | None"], float]
StrengthTable = Mapping[tuple, float]  # (kind, layer | None) -> multiplier
Bases = Union[torch.Tensor, Mapping[int, torch.Tensor]]

_LAYER = re.compile(r"^layers\.(\d+)\.")


def writer_layer(writer: Writer) -> int | None:
    """Layer index parsed from the writer's hook name ("layers.3.attn_out" -> 3); None for embeddings."""
    match = _LAYER.match(writer.name)
    return int(match.group(1)) if match else None


def _basis(t: torch.Tensor, what: str) -> torch.Tensor:
    t = t.detach().float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise EditError(f"{what} must be [k, d] (or [d]); got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True)
class EditPlan:
    """A general weight edit; see the module docstring for the math. All fields are optional and the
    default plan is exactly the plain projection ``excise(adapter, q, settings)``."""

    layer_bases: Mapping[int, torch.Tensor] | None = None  # {layer: [k, d]} write bases
    strength: StrengthFn | StrengthTable | None = None  # (kind, layer) -> s; None = 1 everywhere
    lam: float | None = None  # None = settings.lam / the `lam` argument
    read: Bases | None = None  # oblique read basis [k, d] or {layer: [k, d]}; None = orthogonal
    lm_head_input: bool = False
    norm_preserve: bool | None = None  # None = settings.norm_preserve

    def __post_init__(self):
        if self.lam is not None and not math.isfinite(self.lam):
            raise EditError(f"EditPlan.lam must be finite, got {self.lam}")

    def strength_for(self, kind: str, layer: int | None) -> float:
        """s_w for a writer of `kind` in `layer` (1 without a strength; 0 for a key missing from a table)."""
        if self.strength is None:
            return 1.0
        if callable(self.strength):
            value = float(self.strength(kind, layer))
        else:
            value = float(self.strength.get((kind, layer), 0.0))
        if not math.isfinite(value):
            raise EditError(f"strength for ({kind!r}, {layer}) is {value}; it must be finite")
        return value

    def write_basis(self, layer: int | None, q: torch.Tensor | None) -> torch.Tensor:
        """U_ℓ [k, d] float32: the layer's own basis when given, else the global q."""
        if self.layer_bases is not None and layer is not None and layer in self.layer_bases:
            return _basis(self.layer_bases[layer], f"layer_bases[{layer}]")
        if q is None:
            where = "the embeddings" if layer is None else f"layer {layer}"
            raise EditError(f"no basis for {where}: pass a global q or add it to EditPlan.layer_bases")
        return _basis(q, "q")

    def read_basis(self, layer: int | None, write: torch.Tensor) -> torch.Tensor | None:
        """R_ℓ [k, d] float32, or None for the orthogonal case (R = U). A {layer: R} table without an
        entry for `layer` (or the embeddings) falls back to the orthogonal case."""
        if self.read is None:
            return None
        if isinstance(self.read, torch.Tensor):
            read = _basis(self.read, "read")
        elif layer is not None and layer in self.read:
            read = _basis(self.read[layer], f"read[{layer}]")
        else:
            return None
        if read.shape != write.shape:
            raise EditError(f"read basis {tuple(read.shape)} must match the write basis {tuple(write.shape)}")
        return read

    def describe(self) -> dict:
        """JSON-able summary for the run report."""
        return {
            "per_layer": self.layer_bases is not None,
            "layers_with_own_basis": sorted(self.layer_bases) if self.layer_bases is not None else [],
            "oblique": self.read is not None,
            "strength": None if self.strength is None else ("function" if callable(self.strength) else "table"),
            "lam": self.lam,
            "lm_head_input": self.lm_head_input,
            "norm_preserve": self.norm_preserve,
        }


@dataclass(frozen=True)
class WriterEdit:
    """The resolved edit of one writer: x ↦ x − lam·Uᵀ(R x) on its residual side."""

    writer: Writer
    layer: int | None
    write: torch.Tensor  # [k, d] float32
    read: torch.Tensor | None  # [k, d] float32, None = orthogonal (R = U)
    lam: float  # λ·s
    strength: float  # s


def layer_strength(weights, n_layers: int, *, attention: bool, mlp: bool, embeddings: bool) -> dict:
    """StrengthTable from per-layer weights {layer: w} (or a [n_layers] tensor): layer i's selected
    writers get w_i (w_i = 0 leaves them out); the embeddings share layer 0's weight."""
    w = {i: float(v) for i, v in enumerate(weights.tolist())} if isinstance(weights, torch.Tensor) else dict(weights)
    table = {}
    for kind, on in (("attn", attention), ("mlp", mlp)):
        if on:
            table.update({(kind, i): w[i] for i in range(n_layers) if w.get(i, 0.0) > 0.0})
    if embeddings:
        table[("embed", None)] = w.get(0, 1.0)
    return table


def resolve(adapter: ArchitectureAdapter, q: torch.Tensor | None, lam: float, plan: EditPlan, *,
            attention: bool, mlp: bool, embeddings: bool,
            experts: bool | None = None) -> tuple[list[WriterEdit], list[str]]:
    """Every selected writer's edit under `plan`, and the names of writers skipped for s = 0.
    `experts` selects the routed experts of MoE layers (None: as `mlp`)."""
    lam = plan.lam if plan.lam is not None else lam
    edits, skipped = [], []
    for writer in adapter.writers(attention=attention, mlp=mlp, embeddings=embeddings, experts=experts):
        layer = writer_layer(writer)
        s = plan.strength_for(writer.kind, layer)
        if s == 0.0:
            skipped.append(writer.name)
            continue
        write = plan.write_basis(layer, q)
        if write.shape[-1] != adapter.d_model:
            raise EditError(f"basis for {writer.name} has width {write.shape[-1]}, the model has d = {adapter.d_model}")
        edits.append(WriterEdit(writer, layer, write, plan.read_basis(layer, write), lam * s, s))
    return edits, skipped


def lm_head_edit(adapter: ArchitectureAdapter, q: torch.Tensor | None, lam: float,
                 plan: EditPlan) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """(U, R, λ) for the lm_head input-side edit, or None when the plan does not ask for it. The
    lm_head uses the global basis and plain λ (no strength multiplier)."""
    if not plan.lm_head_input:
        return None
    if adapter.tied_lm_head:
        raise EditError("lm_head_input: the lm_head shares its weight with the token embedding; "
                        "edit the embeddings (settings.embeddings) instead")
    write = plan.write_basis(None, q)
    return write, plan.read_basis(None, write), (plan.lam if plan.lam is not None else lam)
