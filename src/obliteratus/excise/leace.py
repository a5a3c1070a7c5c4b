"""LEACE variant: the oblique projection of LEACE's closed-form eraser (Belrose et al. 2023,
arXiv:2306.03819; the math is in directions/leace.py).

    W' = W − λ·writeᵀ (read W)      (out_in; in_out and biases alike, excise/projection.py)

DISTILL refits the basis at the source layer (``refit``): write = the eraser's range as a unit row,
read = its read row rescaled so that read·writeᵀ = 1. The edit itself is the plain projection's
code path with the EditPlan's read side set (excise/apply.py), so kernels, layer weights, the
lm_head and neuron masking work with it as they do with ``project``; hooks mode does not.
"""

from __future__ import annotations

import torch

from ..directions.leace import leace_edit_basis
from .apply import excise
from .base import register_excise_variant


def leace_refit(positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positive [n, d], negative [m, d] -> (basis [1, d], read [1, d]) (directions/leace.py)."""
    return leace_edit_basis(positive, negative)


register_excise_variant(
    "leace", "LEACE's oblique projection (reads along the whitened direction)", excise,
    what="fits its own rank-1 eraser", low_rank=True, neurons=True, refit=leace_refit)
