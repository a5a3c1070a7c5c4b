"""Cone-or-direction: the concept-cone analysis decides whether one direction or a subspace is removed.

Wollschläger et al. (2025) find that refusal can be mediated by a multi-dimensional cone. Whether a
given model needs more than one direction is measured, not assumed: per-category refusal directions
(:mod:`obliteratus.analysis.cones`; categories from the prompt text or a label column) at the source
layer give the cone's effective dimension D (participation ratio, 1 … C). Then

    k = clamp(round(D), 1, n_directions)
    k = 1:  the contrast's difference of means (exactly basic's direction)
    k > 1:  the difference of means first, then the top singular directions of the unit category
            directions with that direction projected out, until k orthonormal directions are found.

Used by the ``informed`` preset, whose technique (single direction or cone), layer (COSMIC) and
per-layer strength (cross-layer agreement) all come from analysis of the model's activations.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..analysis.cones import categorise, category_directions, effective_dimension
from ..analysis.cross_layer import unit_rows
from ..errors import PromptError
from .base import Basis, FitContext, orthonormalize, register_direction_method
from .diff_means import diff_means


class ConeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_count: int = Field(3, ge=2, description="Categories with fewer harmful train prompts are left out.")


def cone_size(harmful: torch.Tensor, labels: list[str], harmless: torch.Tensor, k_max: int,
              min_count: int = 3) -> tuple[int, float, torch.Tensor]:
    """(k, effective dimension D, unit category directions [C, d]) at one layer; k = clamp(round(D), 1, k_max)."""
    _, dirs, _ = category_directions(harmful, labels, harmless, min_count)
    dim = effective_dimension(dirs)
    k = max(1, min(k_max, int(round(dim)), dirs.shape[0]))
    return k, dim, unit_rows(dirs)


def cone_basis(positive: torch.Tensor, negative: torch.Tensor, k: int = 1, options: ConeOptions | None = None, *,
               harmful: torch.Tensor | None = None, labels: list[str] | None = None,
               harmless: torch.Tensor | None = None) -> torch.Tensor:
    """positive [n, d], negative [m, d] (the contrast), harmful [h, d] with h category labels and harmless
    [m', d] (all train prompts, for the cone) -> [k', d] orthonormal rows, k' ≤ k chosen by the cone."""
    options = options or ConeOptions()
    if harmful is None or labels is None or harmless is None:
        raise PromptError("the cone method needs every harmful train prompt's activation and category label "
                          "(fit(..., harmful=, labels=, harmless=)); the pipeline passes them")
    first = diff_means(positive, negative).double()  # [1, d]
    size, _, units = cone_size(harmful, labels, harmless, k, options.min_count)
    if size == 1:
        return first.float()
    u = first[0] / first[0].norm()
    rest = units - (units @ u)[:, None] * u[None, :]  # [C, d]: the cone with the main direction removed
    _, s, vh = torch.linalg.svd(rest, full_matrices=False)
    keep = vh[: size - 1][s[: size - 1] > 1e-6 * float(s[0])]  # drop a null direction of a degenerate cone
    return orthonormalize(torch.cat([first, keep]).float())


def fit_in_pipeline(ctx: FitContext) -> Basis:
    """The cone from every harmful train prompt (categorised by its text) and every harmless one."""
    p, layer = ctx.position, ctx.layer
    return Basis(cone_basis(ctx.positive, ctx.negative, ctx.k, ctx.options, harmful=ctx.cache.harmful[:, p, layer],
                            labels=categorise(ctx.harmful_texts), harmless=ctx.cache.harmless[:, p, layer]))


register_direction_method(
    "cone", "difference of means, widened to the concept cone's subspace when its effective dimension calls for it",
    cone_basis, options=ConeOptions, needs_model=True, pipeline_fit=fit_in_pipeline)
