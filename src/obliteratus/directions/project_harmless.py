"""Projected abliteration (grimjim, 2025): remove from each refusal direction its component along
the mean harmless activation at the same layer and position, then re-orthonormalise.

    r' = r − (r·μ̂)μ̂,   μ̂ = mean(harmless) / ‖mean(harmless)‖

The harmless mean is the direction every ordinary prompt's residual already points along; the
part of r parallel to it carries little refusal signal but ablating it moves every activation,
which is what costs KL on harmless prompts."""

from __future__ import annotations

import torch

from ..errors import ActivationError
from .base import orthonormalize


def orthogonalize_against(basis: torch.Tensor, v: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """[k, d] rows, [d] -> [m, d] (float32) orthonormal rows, each orthogonal to v: the rank-checked
    orthonormalisation of [v̂; basis] without its first row, so a row (nearly) parallel to v is dropped
    instead of becoming its normalised rounding noise. Raises ActivationError when fewer than
    `min_rows` rows are left (min_rows = 0: an empty [0, d] answer is the caller's to handle)."""
    b = basis.double()
    if not float(v.double().norm()) > 0:
        return orthonormalize(b, min_rows=min_rows).float()
    u = (v.double() / v.double().norm())[None]  # [1, d]
    q = orthonormalize(torch.cat([u, b]), min_rows=1)[1:]  # [m, d]
    if len(q) < min_rows:
        raise ActivationError(f"project_harmless: {len(b) - len(q)} of {len(b)} directions lie along the harmless "
                              "mean (nothing is left once it is projected out); turn directions.project_harmless "
                              "off or use another layer")
    return q.float()
