"""Projected abliteration (grimjim, 2025): remove from each refusal direction its component along
the mean harmless activation at the same layer and position, then re-orthonormalise.

    r' = r − (r·μ̂)μ̂,   μ̂ = mean(harmless) / ‖mean(harmless)‖

The harmless mean is the direction every ordinary prompt's residual already points along; the
part of r parallel to it carries little refusal signal but ablating it moves every activation,
which is what costs KL on harmless prompts."""

from __future__ import annotations

import torch

from .base import orthonormalize


def orthogonalize_against(basis: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[k, d] rows, [d] -> [k, d] orthonormal rows, each orthogonal to v."""
    u = (v.double() / v.double().norm())  # [d]
    b = basis.double()
    return orthonormalize((b - (b @ u)[:, None] * u[None, :]).float())
