"""Projection math for residual-stream writers. Tensors in, tensors out; torch only.

Q is ``[k, d]`` with orthonormal rows spanning the directions to remove; P = QᵀQ projects onto them.

* ``out_in`` weights (``nn.Linear``: ``[d, in]``, the residual stream is the output axis):
  W' = W − λ·P·W = W − λ·Qᵀ(Q W)
* ``in_out`` weights (GPT-2 ``Conv1D`` ``[in, d]``, embeddings ``[vocab, d]``):
  W' = W − λ·W·P = W − λ·(W Qᵀ) Q
* biases: b' = b − λ·P·b

λ = 1 removes the component (idempotent: a second pass changes nothing); λ = 2 reflects it
(an orthogonal map, so norms are kept). All arithmetic is float32 whatever the stored dtype.
"""

from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["out_in", "in_out"]


def project_out(weight: torch.Tensor, q: torch.Tensor, lam: float = 1.0, layout: Layout = "out_in") -> torch.Tensor:
    w, q = weight.float(), q.to(device=weight.device, dtype=torch.float32)
    if layout == "out_in":
        return w - lam * q.T @ (q @ w)  # [d, in] - [d, k] @ [k, in]
    return w - lam * (w @ q.T) @ q  # [n, d] - [n, k] @ [k, d]


def project_vector(bias: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    b, q = bias.float(), q.to(device=bias.device, dtype=torch.float32)
    return b - lam * q.T @ (q @ b)  # [d]


def residual_norms(weight: torch.Tensor, layout: Layout = "out_in") -> torch.Tensor:
    """Norm of each input's residual-space vector: columns of [d, in], rows of [n, d]."""
    return weight.float().norm(dim=0 if layout == "out_in" else 1)


def norm_preserving_project(weight: torch.Tensor, q: torch.Tensor, lam: float = 1.0,
                            layout: Layout = "out_in", eps: float = 1e-12) -> torch.Tensor:
    """Project, then rescale every input's residual-space vector back to its original norm
    (grimjim's norm-preserving biprojected abliteration keeps the magnitudes and edits only the
    directions). Scaling a vector with no component along Q keeps it that way, so QW' = 0 still
    holds for λ = 1. A vector that lay entirely along Q becomes zero."""
    before = residual_norms(weight, layout)  # [in] or [n]
    edited = project_out(weight, q, lam, layout)
    after = residual_norms(edited, layout)
    # A vector that lay along Q keeps only float32 rounding noise (~1e-7 of its norm): treat it as zero
    # rather than blowing the noise back up to full size.
    alive = after > before * torch.finfo(torch.float32).eps ** 0.5 + eps
    scale = torch.where(alive, before / after.clamp_min(eps), torch.zeros_like(after))
    return edited * (scale[None, :] if layout == "out_in" else scale[:, None])
