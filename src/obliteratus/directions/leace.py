"""LEACE: LEAst-squares Concept Erasure (Belrose et al. 2023, "LEACE: Perfect linear concept erasure
in closed form", arXiv:2306.03819; reference code EleutherAI/concept-erasure ``concept_erasure/leace.py``).

Given features x [N, d] and a concept z [N, c] (one-hot classes or a label), the affine map

    x' = x − P (x − μ_x),     P = W⁺ Π W

makes every linear predictor of z from x' no better than a constant (equivalently Cov(x', z) = 0,
so the class-conditional means of x' coincide), with the least mean squared edit E‖x' − x‖² among all
such maps. Here

    W  = Σ_xx^{-1/2}   (pseudo-inverse square root: eigenvalues ≤ tol · λ_max are dropped)
    W⁺ = Σ_xx^{1/2}    (on the same eigen-directions)
    Π  = U Uᵀ,  U = orthonormal basis of col(W Σ_xz)  (left singular vectors with s > svd_tol · s_max)

so P = (W⁺U)(UᵀW) = writeᵀ · read with write = (W⁺U)ᵀ [k, d] (the range: what gets removed) and
read = UᵀW [k, d] (the oblique read-out), read · writeᵀ = UᵀW W⁺U = I.

Deviations from concept-erasure's defaults: no covariance shrinkage and no trace constraint (both
options there, on by default); the singular-value cut-off is relative (theirs is absolute, 0.01).

As a *direction method* (harmful = class 1, harmless = class 0) Σ_xz ∝ μ_harmful − μ_harmless, so
the range is spanned by W⁺W Δμ = Δμ: the registered ``leace`` direction coincides with the
difference of means (up to the pseudo-inverse's dropped directions). What LEACE adds is the oblique
read side: erasing along ``write`` while reading with ``read`` instead of ``write`` changes harmless
activations less than the orthogonal projection onto the same range; :func:`oblique_project_out`
applies that to a weight matrix (EXCISE wires it in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ActivationError, PromptError
from .base import orthonormalize, point_toward, register_direction_method

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class LeaceEraser:
    """x' = x − writeᵀ · read · (x − mean); float64 statistics stored as float32."""

    write: torch.Tensor  # [k, d] rows span the range of the edit
    read: torch.Tensor  # [k, d] with read @ write.T = I_k
    mean: torch.Tensor  # [d] mean of the fitted features

    @property
    def matrix(self) -> torch.Tensor:
        """P = writeᵀ read, [d, d]."""
        return self.write.T @ self.read

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., d] erased."""
        delta = x.float() - self.mean  # [..., d]
        return x.float() - (delta @ self.read.T) @ self.write  # [..., k] @ [k, d]


def fit_leace(x: torch.Tensor, z: torch.Tensor, tol: float | None = None, svd_tol: float = 1e-6) -> LeaceEraser:
    """x [N, d], z [N] or [N, c] -> LeaceEraser. tol: relative eigenvalue cut-off of Σ_xx (default
    d·eps, as torch.linalg.pinv); svd_tol: relative singular-value cut-off of W Σ_xz."""
    x64 = x.double()
    z64 = z.double().reshape(len(z), -1)  # [N, c]
    if len(x64) != len(z64):
        raise ActivationError(f"fit_leace: {len(x64)} feature rows but {len(z64)} concept rows")
    if len(x64) < 2:
        raise PromptError("fit_leace needs at least 2 samples")
    d = x64.shape[1]
    mean = x64.mean(0)  # [d]
    cx = x64 - mean  # [N, d]
    cz = z64 - z64.mean(0)  # [N, c]
    sigma_xx = cx.T @ cx / (len(x64) - 1)  # [d, d]
    sigma_xz = cx.T @ cz / (len(x64) - 1)  # [d, c]
    lam, vecs = torch.linalg.eigh(sigma_xx)  # ascending
    tol = d * torch.finfo(torch.float64).eps if tol is None else tol
    keep = lam > tol * lam[-1].clamp_min(0)  # [d]
    lam = lam.clamp_min(0)
    w = (vecs * torch.where(keep, lam.rsqrt(), torch.zeros_like(lam))) @ vecs.T  # Σ^{-1/2} (pinv)
    w_pinv = (vecs * torch.where(keep, lam.sqrt(), torch.zeros_like(lam))) @ vecs.T  # Σ^{1/2}
    u, s, _ = torch.linalg.svd(w @ sigma_xz, full_matrices=False)  # u: [d, min(d, c)]
    if len(s) == 0 or not torch.isfinite(s[0]) or s[0] <= 0:
        raise ActivationError("fit_leace: the features carry no linear information about the concept (Σ_xz = 0)")
    u = u[:, s > svd_tol * s[0]]  # [d, k] orthonormal basis of col(W Σ_xz)
    write = (w_pinv @ u).T  # [k, d]
    read = u.T @ w  # [k, d]
    return LeaceEraser(write.float(), read.float(), mean.float())


def oblique_project_out(weight: torch.Tensor, write: torch.Tensor, read: torch.Tensor, lam: float = 1.0,
                        layout: Layout = "out_in") -> torch.Tensor:
    """Apply the linear part of the eraser, x ↦ x − λ·writeᵀ(read x), to a residual writer's weight.

    out_in ([d, in], residual on the output axis):  W' = W − λ·writeᵀ (read W)
    in_out ([n, d], residual on the row axis):       W' = W − λ·(W readᵀ) write
    With write = read = Q (orthonormal) this is excise.projection.project_out. λ = 1 gives read W' = 0.
    The affine part (−P μ) is not a weight edit: it belongs in a bias.
    """
    w = weight.float()
    wr = write.to(device=weight.device, dtype=torch.float32)  # [k, d]
    rd = read.to(device=weight.device, dtype=torch.float32)  # [k, d]
    if layout == "out_in":
        return w - lam * wr.T @ (rd @ w)  # [d, in] - [d, k] @ [k, in]
    return w - lam * (w @ rd.T) @ wr  # [n, d] - [n, k] @ [k, d]


def leace_direction(harmful: torch.Tensor, harmless: torch.Tensor, k: int = 1, options=None) -> torch.Tensor:
    """[n, d], [m, d] -> [1, d]: the LEACE range for z = 1[harmful], orthonormalised, signed harmless -> harmful."""
    if len(harmful) < 1 or len(harmless) < 1:
        raise PromptError("leace needs at least one harmful and one harmless prompt")
    x = torch.cat([harmful.double(), harmless.double()])  # [n + m, d]
    z = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))]).to(x)  # [n + m], x's device
    eraser = fit_leace(x, z)
    basis = orthonormalize(eraser.write.double())  # [1, d]
    return point_toward(basis, harmful.double().mean(0) - harmless.double().mean(0))


def leace_edit_basis(positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positive [n, d], negative [m, d] at the source layer -> (basis [1, d], read [1, d]) for the
    LEACE edit (excise.method = "leace" refits with this): the eraser's range as a unit row, and its
    read row rescaled by the range's norm, so that read·basisᵀ = 1 still holds (binary concept: rank 1)."""
    x = torch.cat([positive, negative])  # [n + m, d]
    z = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    eraser = fit_leace(x, z)
    scale = eraser.write[0].norm()
    w = eraser.write[0].double()
    basis = (w / w.norm().clamp_min(1e-12)).float()[None]  # [1, d]: the range (∝ the mean difference)
    read = (eraser.read[:1] * scale).float()  # [1, d]
    return basis, read


register_direction_method(
    "leace",
    "range of the closed-form LEACE eraser for harmful vs harmless (= diff of means; read side for EXCISE)",
    leace_direction,
    max_directions=1,
    mean_difference=True,
)
