"""Householder variant: instead of zeroing the component along the refusal direction d, apply an
orthogonal reflection on each writer's residual (output) side.

    v = (d − t) / ‖d − t‖,   H = I − 2·v vᵀ          (d, t unit vectors, t ≠ d)

H is symmetric and orthogonal (HᵀH = I − 4vvᵀ + 4v(vᵀv)vᵀ = I), so every residual-side vector keeps
its norm, and H d = t, H t = d (since vᵀd = −vᵀt = ‖d − t‖/2). For a writer output y the edited
output is y' = H y, hence

    dᵀ y' = (H d)ᵀ y = tᵀ y    — the component along d becomes what the component along t was,
    tᵀ y' = dᵀ y               — and the old refusal component is moved onto t.

Target (settings): t = −d ("negate"; then v = d and H = I − 2ddᵀ, the λ = 2 reflection of project_out).
:func:`householder_excise` also takes any other unit t, but then tᵀ y' = dᵀ y: H is an involution,
so it sends t onto d as well as d onto t. The former settings target "harmless_mean" (t = μ̂_harmless)
therefore moved the harmless mean's large component onto the refusal direction (on a tiny model the
mean d·y of harmless activations went from 0.003 to 2.35); it was removed, and a config naming it is
rejected (a ConfigError that says why). The weight edit is W' = H W (out_in),
W' = W H (in_out), b' = H b, which is the EditPlan projection with basis v and λ = 2, so the weight
and hook paths of plan.py implement it unchanged.

Note on the source: the original OBLITERATUS lists a "Householder" option, but its definition
could not be retrieved here; this is the sound, norm-preserving-by-construction version (and its
λ = 2 "reflection" of the refusal direction is the t = −d case).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ConfigError, EditError
from ..models.adapters import ArchitectureAdapter
from .apply import EditReport, excise
from .base import register_excise_variant
from .plan import EditPlan

if TYPE_CHECKING:  # config imports the option models of this package
    from ..settings import ExciseSettings


class HouseholderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Literal["negate"] = Field("negate", description="Where the reflection sends d: −d (the only target).")

    @field_validator("target", mode="before")
    @classmethod
    def _removed_target(cls, value):
        if value == "harmless_mean":
            raise ValueError("the Householder target 'harmless_mean' was removed: a reflection that sends d to the "
                             "harmless mean also sends the harmless mean to d, so it wrote the harmless activations' "
                             "large mean component onto the refusal direction; use target = 'negate'")
        return value


def householder_vector(d: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """v [1, d] (float32, unit) with (I − 2vvᵀ) d̂ = t̂; target None means t = −d (v = d̂).
    Raises EditError when t̂ = d̂ (the reflection would be undefined / the identity)."""
    dd = d.detach().double().reshape(-1)
    dd = dd / dd.norm().clamp_min(1e-300)
    if target is None:
        return dd.float()[None]
    t = target.detach().double().reshape(-1)
    t = t / t.norm().clamp_min(1e-300)
    diff = dd - t  # [d]
    if diff.norm() < 1e-6:
        raise EditError("Householder target equals the direction: there is nothing to reflect")
    return (diff / diff.norm()).float()[None]


def householder_matrix(v: torch.Tensor) -> torch.Tensor:
    """H = I − 2·vᵀv for v [1, d] (float64, [d, d]); for tests and inspection, never needed to edit."""
    v = v.double().reshape(1, -1)
    return torch.eye(v.shape[1], dtype=torch.float64, device=v.device) - 2.0 * v.T @ v


@torch.no_grad()
def householder_excise(adapter: ArchitectureAdapter, d: torch.Tensor, settings: ExciseSettings,
                       target: torch.Tensor | None = None, plan: EditPlan | None = None) -> EditReport:
    """Reflect every selected writer's residual side with H (d ↦ target, −d when None).

    `plan` may add per-writer skipping (strength 0) or layer bases; any strength other than 0/1 or
    any λ would make the map non-orthogonal, so those are refused. Norm preservation is implied."""
    if plan is not None and (plan.lam not in (None, 2.0) or plan.layer_bases is not None or plan.read is not None
                             or plan.norm_preserve):
        raise EditError("householder: the plan may only select writers (strength 0 or 1)")
    v = householder_vector(d, target)
    base = plan or EditPlan()
    strength = base.strength
    if strength is not None:
        def checked(kind, layer, _s=base):
            s = _s.strength_for(kind, layer)
            if s not in (0.0, 1.0):
                raise EditError(f"householder: strength {s} for ({kind}, {layer}) is not 0 or 1")
            return s
        strength = checked
    report = excise(adapter, v, settings.model_copy(update={"norm_preserve": False}),
                    EditPlan(strength=strength, lam=2.0, lm_head_input=base.lm_head_input))
    report.variant = "householder"
    report.details = {"target": "negate" if target is None else "vector",
                      "cos_direction_target": float(-1.0 if target is None else
                                                    torch.nn.functional.cosine_similarity(
                                                        d.double().reshape(-1), target.double().reshape(-1), dim=0))}
    return report


def householder_variant(adapter: ArchitectureAdapter, q: torch.Tensor, settings: ExciseSettings,
                        plan: EditPlan | None) -> EditReport:
    """The registered variant: target "negate" (the only one), H = I − 2 d dᵀ, for a one-row basis."""
    if q.shape[0] != 1:
        raise ConfigError("the Householder variant reflects one direction; set directions.n_directions = 1")
    return householder_excise(adapter, q[0], settings, None, plan)


register_excise_variant(
    "householder", "orthogonal reflection of each selected writer's residual side sending d to a target",
    householder_variant, what="is an orthogonal reflection of each selected writer (lambda = 2 along its vector)",
    strengths="select", layer_bases=False, lam=False)
