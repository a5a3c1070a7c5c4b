"""Difference of means (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single
Direction"): r = mean(harmful) - mean(harmless), normalised."""

from __future__ import annotations

import torch

from .base import register_direction_method


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[n, ..., d], [m, ..., d] -> [..., d]; means in float64, result float32."""
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()


def diff_means(harmful: torch.Tensor, harmless: torch.Tensor, k: int = 1, options=None) -> torch.Tensor:
    """[n, d], [m, d] -> [1, d] unit vector."""
    r = mean_difference(harmful, harmless)  # [d]
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("harmful and harmless means coincide: no direction to extract")
    return (r / norm)[None, :]


register_direction_method(
    "diff_means", "one direction: normalised difference of the harmful and harmless means", diff_means, max_directions=1,
    fractional_index=True, mean_difference=True,
)
