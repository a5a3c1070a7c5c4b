"""Layer selection at the knee of the per-layer refusal-strength curve (no forward passes).

Strength of the harmful/harmless separation at layer axis l (``resid_pre`` of layer l, as in
:class:`~obliteratus.probe.ActivationCache`):

    s_l = ‖μ_harmful,l − μ_harmless,l‖ / ν_l,      ν_l = mean_i ‖x_i,l‖   (both classes, same position)

Normalising by the mean residual norm ν_l is the default because raw residual norms grow with
depth (often by orders of magnitude), so the raw ‖Δμ‖ keeps rising with the stream's scale and
its "knee" mostly reflects norm growth; s_l is how far apart the classes are relative to the
stream's size at that layer. Passing ``act_norms=None`` uses the raw ‖Δμ‖.

Knee: Kneedle (Satopää, Albrecht, Irwin & Raghavan 2011, "Finding a 'Kneedle' in a Haystack:
Detecting Knee Points in System Behavior"), offline form, concave-increasing case. Over the
candidate layers l_0 < … < l_p, where l_p is the strongest one (the curve is cut at its peak:
strength usually rises through the middle layers and then flattens or falls, and the knee of a
falling tail says nothing about where the direction forms), rescale both axes to the unit square
with the first point at (0, 0) and the peak at (1, 1):

    x̂_i = (l_i − l_0) / (l_p − l_0),   ŷ_i = (s_i − s_0) / (s_p − s_0),   D_i = ŷ_i − x̂_i

D_i·(1/√2) is the distance of point i above the chord from the first point to the peak; the knee
is argmax_i D_i, the layer after which more depth adds least strength. When no point lies above
the chord (a straight or convex rise, or fewer than three points) the rise does not flatten
before the peak, and the knee is the peak itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ObliteratusError
from .base import SelectContext, register_layer_selector
from .layers import Candidate, LayerSelection, candidate_layers


def mean_norms(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[n, L+1, d], [m, L+1, d] (one position) -> [L+1] float64: ν_l = mean over all n + m prompts of ‖x‖."""
    both = torch.cat([harmful.double(), harmless.double()], dim=0)  # [n + m, L+1, d]
    return both.norm(dim=-1).mean(0)  # [L+1]


def layer_strength(mean_diffs: torch.Tensor, act_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[L+1, d], [L+1] | None -> [L+1] float64: s_l = ‖Δμ_l‖ / ν_l (or ‖Δμ_l‖ without norms)."""
    strength = mean_diffs.double().norm(dim=-1)  # [L+1]
    if act_norms is None:
        return strength
    norms = act_norms.double()
    if norms.shape != strength.shape:
        raise ObliteratusError(f"act_norms has shape {tuple(norms.shape)}, expected {tuple(strength.shape)}")
    if not bool((norms > 0).all()):
        raise ObliteratusError("act_norms must be positive at every layer (a zero mean norm means no activations)")
    return strength / norms


KNEE_TOL = 1e-9  # D on the unit square: below this the curve is straight, not bent


def kneedle(x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
    """x [m] increasing, y [m] whose last entry is its maximum -> (knee index, D [m] float64).
    D_i = ŷ_i − x̂_i on the unit square spanned by the first and last points; the knee is
    argmax D, or the last point when no D_i is positive (beyond rounding: D ≤ 1e-9 counts as 0, so
    a straight rise, whose D is 0 up to the last bits, gives the last point on every platform)."""
    x, y = x.double(), y.double()
    m = x.shape[0]
    if m < 3 or y[-1] <= y[0]:
        return m - 1, torch.zeros(m, dtype=torch.float64)
    xn = (x - x[0]) / (x[-1] - x[0])  # [m]
    yn = (y - y[0]) / (y[-1] - y[0])  # [m]
    distance = yn - xn  # [m]; 0 at both ends
    best = int(distance.argmax())
    return (best if distance[best] > KNEE_TOL else m - 1), distance


@dataclass
class KneeCandidate(Candidate):
    strength: float = float("nan")  # s_l
    knee_distance: float = float("nan")  # D_l (0 at the ends of the cut curve)


def select_knee(mean_diffs: torch.Tensor, act_norms: torch.Tensor | None = None,
                layers: Sequence[int] | None = None, position: int = -1) -> LayerSelection:
    """`mean_diffs` ``[L+1, d]`` (one position), `act_norms` ``[L+1]`` mean residual norms (or None
    for raw strength), `layers` the allowed layer axes (default all; the pipeline passes
    :func:`candidate_layers`). Every axis gets a :class:`KneeCandidate`: status ``pruned`` (not
    allowed), ``after-peak`` (allowed, past the strongest layer), ``scored`` or ``chosen``."""
    if mean_diffs.ndim != 2:
        raise ObliteratusError(f"select_knee takes mean_diffs [L+1, d] of one position, got {tuple(mean_diffs.shape)}")
    n_axes = mean_diffs.shape[0]
    strength = layer_strength(mean_diffs, act_norms)  # [L+1]
    allowed = sorted(set(range(n_axes) if layers is None else layers))
    if not allowed or allowed[0] < 0 or allowed[-1] >= n_axes:
        raise ObliteratusError(f"knee: candidate layers {allowed} are empty or outside 0..{n_axes - 1}")
    if not bool(torch.isfinite(strength[allowed]).all()):
        raise ObliteratusError("knee: the strength curve is not finite at some candidate layer")
    values = strength[allowed]  # [c]
    peak = int(values.argmax())
    rising = allowed[:peak + 1]
    k, distance = kneedle(torch.tensor(rising, dtype=torch.float64), values[:peak + 1])
    candidates = []
    for axis in range(n_axes):
        c = KneeCandidate(axis, position, strength=float(strength[axis]))
        if axis not in allowed:
            c.status = "pruned"
        elif axis in rising:
            c.knee_distance = float(distance[rising.index(axis)])
        else:
            c.status = "after-peak"
        candidates.append(c)
    chosen = rising[k]
    candidates[chosen].status = "chosen"
    return LayerSelection(chosen, position, "knee", candidates=candidates)


def _knee(ctx: SelectContext) -> LayerSelection:
    ls, c = ctx.settings.layers, ctx.contrast
    norms = mean_norms(c.positive[:, -1], c.negative[:, -1]) if ls.knee_normalize else None
    return select_knee(ctx.mean_diffs[-1], norms, candidate_layers(ctx.adapter.n_layers, ls))


register_layer_selector("knee", "the knee of the per-layer strength curve (kneedle on ||mean diff||)", _knee)
