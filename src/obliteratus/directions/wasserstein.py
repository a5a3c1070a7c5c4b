"""Wasserstein-optimal directions: most refusal signal removed per unit of harmless distortion.

Projecting a unit direction r out of the residual stream moves a harmless activation x by (rᵀx) r,
so the mean squared edit on harmless prompts — the transport cost of the edit map, an upper bound
on W₂²(harmless, edited harmless) — is

    cost(r)   = E_b[(rᵀx)²] = rᵀ C r,          C = Σ_b + μ_b μ_bᵀ   (harmless second moment)

The refusal signal along r is the extra energy harmful activations carry along r, about the
harmless mean, beyond what harmless activations themselves carry:

    signal(r) = E_h[(rᵀ(x − μ_b))²] − E_b[(rᵀ(x − μ_b))²] = rᵀ S r,   S = Δ Δᵀ + Σ_h − Σ_b,   Δ = μ_h − μ_b

The directions maximising signal / cost are the top generalized eigenvectors of the symmetric-
definite pencil (S, C + εI), ε = regularization · tr(C)/d:

    S r = λ (C + εI) r,    solved as  L⁻¹ S L⁻ᵀ y = λ y,  r = L⁻ᵀ y   (C + εI = L Lᵀ, Cholesky)

then orthonormalised in eigenvalue order (generalized eigenvectors are (C+εI)-orthogonal, not
orthogonal) and signed so that r·Δ > 0.

Relation to OBLITERATUS (``analysis/wasserstein_optimal.py``, "ABLITERALUS paper App. A.2"): it
minimises [(rᵀμ_b)² + rᵀΣ_b r] / (rᵀΔ)², i.e. the same cost over the rank-one signal ΔΔᵀ, whose
unique solution is r ∝ (C + εI)⁻¹ Δ. Our S equals ΔΔᵀ when harmful and harmless have the same
covariance, so k = 1 gives that direction; the Σ_h − Σ_b term is what makes k > 1 meaningful
(extra directions along which harmful activations spread more than harmless ones).
Unlike the difference of means, this down-weights any part of Δ that lies along directions in which
harmless activations already vary a lot (a high-variance nuisance correlated with the shift).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ActivationError, PromptError
from .base import orthonormalize, point_toward, register_direction_method


class WassersteinConfig(BaseModel):
    """Options of ``[directions.wasserstein]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    regularization: float = Field(1e-4, gt=0.0, description=(
        "ridge ε added to the harmless second moment, relative to its mean eigenvalue tr(C)/d "
        "(needed when there are fewer prompts than dimensions); OBLITERATUS uses 1e-4 (absolute)"))


def cost_and_signal(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d], [m, d] -> (C [d, d], S [d, d]) float64, as in the module docstring."""
    h, b = harmful.double(), harmless.double()
    mu_b = b.mean(0)  # [d]
    cb = b - mu_b  # [m, d]
    ch = h - h.mean(0)  # [n, d]
    sigma_b = cb.T @ cb / (len(b) - 1)  # [d, d]
    sigma_h = ch.T @ ch / (len(h) - 1)  # [d, d]
    delta = h.mean(0) - mu_b  # [d]
    cost = sigma_b + torch.outer(mu_b, mu_b)  # Σ_b + μ_b μ_bᵀ
    signal = torch.outer(delta, delta) + sigma_h - sigma_b  # ΔΔᵀ + Σ_h − Σ_b
    return cost, signal


def wasserstein_directions(harmful: torch.Tensor, harmless: torch.Tensor, k: int,
                           options: WassersteinConfig | None = None) -> torch.Tensor:
    """[n, d], [m, d] -> [k, d] orthonormal rows, float32."""
    options = options or WassersteinConfig()
    if len(harmful) < 2 or len(harmless) < 2:
        raise PromptError("wasserstein needs at least 2 harmful and 2 harmless prompts to estimate covariances")
    d = harmful.shape[-1]
    if k > d:
        raise PromptError(f"wasserstein: k = {k} directions exceeds the hidden size {d}")
    cost, signal = cost_and_signal(harmful, harmless)  # [d, d] each
    scale = torch.trace(cost) / d
    if not torch.isfinite(scale) or scale <= 0:
        raise ActivationError("wasserstein: harmless activations are all zero or not finite")
    reg = cost + options.regularization * scale * torch.eye(d, dtype=cost.dtype, device=cost.device)  # C + εI, positive definite
    chol = torch.linalg.cholesky(reg)  # L: [d, d], C + εI = L Lᵀ
    # L⁻¹ S L⁻ᵀ, by two triangular solves
    half = torch.linalg.solve_triangular(chol, signal, upper=False)  # L⁻¹ S
    reduced = torch.linalg.solve_triangular(chol, half.T, upper=False)  # L⁻¹ (L⁻¹ S)ᵀ = L⁻¹ S L⁻ᵀ (S symmetric)
    reduced = (reduced + reduced.T) / 2
    _, y = torch.linalg.eigh(reduced)  # ascending eigenvalues; y: [d, d]
    top = y[:, -k:].flip(1)  # [d, k], largest first
    r = torch.linalg.solve_triangular(chol.T, top, upper=True).T  # rows r_i = L⁻ᵀ y_i: [k, d]
    basis = orthonormalize(r)  # [k, d]
    return point_toward(basis, harmful.double().mean(0) - harmless.double().mean(0))


register_direction_method(
    "wasserstein",
    "top-k generalized eigenvectors trading the harmful excess energy against the edit's harmless cost",
    wasserstein_directions,
    options=WassersteinConfig,
)
