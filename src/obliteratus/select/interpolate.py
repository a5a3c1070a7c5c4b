"""A refusal direction at a fractional layer index, as heretic interpolates it.

heretic (p-e-w/heretic ``src/heretic/model.py`` ``Model.abliterate``) normalises the per-layer
difference of means, r̂_j = Δμ_j / ‖Δμ_j‖ (``main.py``: ``F.normalize(bad_means - good_means)``),
and for a float index t takes

    j = ⌊t⌋,  w = t − j,   r(t) = (r̂_j + w·(r̂_{j+1} − r̂_j)) / ‖·‖     (torch ``lerp``, then normalise)

Indexing convention. heretic's per-layer directions come from HF ``hidden_states``
(j = 0 embeddings, j = i + 1 output of decoder layer i) and it adds 1 to its ``direction_index``
("the first element … is the direction for the embeddings"), so heretic's index k means
hidden_states axis k + 1 = output of decoder layer k. Our layer axis (``ActivationCache``) is
``resid_pre``: axis j = input of layer j = output of layer j − 1, i.e. the same axis as
hidden_states j. Hence heretic ``direction_index`` k  ==  our axis ``k + 1``
(:func:`from_heretic_index`), and :func:`direction_at` takes our axis directly. One difference:
HF applies the final norm to its last hidden state, while our axis L is the final residual before
the norm.
"""

from __future__ import annotations

import math

import torch

from ..errors import ObliteratusError


def from_heretic_index(direction_index: float) -> float:
    """heretic's ``direction_index`` (0 = output of decoder layer 0) -> our resid_pre layer axis."""
    return direction_index + 1.0


def unit_rows(directions: torch.Tensor) -> torch.Tensor:
    """[L+1, d] -> [L+1, d] float64, each row divided by its norm (zero rows raise)."""
    rows = directions.double()
    norms = rows.norm(dim=-1, keepdim=True)  # [L+1, 1]
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        bad = [i for i, n in enumerate(norms.squeeze(-1).tolist()) if not (n > 0 and math.isfinite(n))]
        raise ObliteratusError(f"direction rows {bad} are zero or not finite: cannot normalise them")
    return rows / norms


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """`directions` ``[L+1, d]`` (raw mean differences or unit directions: rows are normalised
    first, as heretic does), `index` a float layer axis in [0, L] -> ``[d]`` float32 unit vector.
    An integer index returns that row's unit direction exactly."""
    if directions.ndim != 2:
        raise ObliteratusError(f"direction_at takes [L+1, d] directions, got {tuple(directions.shape)}")
    last = directions.shape[0] - 1
    if not (isinstance(index, (int, float)) and math.isfinite(index) and 0 <= index <= last):
        raise ObliteratusError(
            f"direction index {index!r} is outside the layer axis 0..{last} (resid_pre of each layer)")
    j = int(math.floor(index))
    w = float(index) - j
    if w == 0.0:
        return unit_rows(directions[j:j + 1])[0].float()  # [d]
    pair = unit_rows(directions[j:j + 2])  # [2, d]
    r = torch.lerp(pair[0], pair[1], w)  # [d]: r̂_j + w (r̂_{j+1} − r̂_j)
    norm = r.norm()
    if norm < 1e-12:
        raise ObliteratusError(
            f"the directions at layers {j} and {j + 1} are opposite: their blend at {index} vanishes")
    return (r / norm).float()
