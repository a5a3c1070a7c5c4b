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
    """Norm of each input's residual-space vector: columns of [d, in], rows of [n, d] (over the last
    two axes, so a fused experts tensor [E, d, in] / [E, n, d] gives [E, in] / [E, n])."""
    return weight.float().norm(dim=-2 if layout == "out_in" else -1)


def norm_preserving_project(weight: torch.Tensor, q: torch.Tensor, lam: float = 1.0,
                            layout: Layout = "out_in", eps: float = 1e-12) -> torch.Tensor:
    """Project, then rescale every input's residual-space vector back to its original norm
    (grimjim's norm-preserving biprojected abliteration keeps the magnitudes and edits only the
    directions). Scaling a vector with no component along Q keeps it that way, so QW' = 0 still
    holds for λ = 1. A vector that lay entirely along Q becomes zero."""
    before = residual_norms(weight, layout)  # [(E,) in] or [(E,) n]
    edited = project_out(weight, q, lam, layout)
    after = residual_norms(edited, layout)
    # A vector that lay along Q keeps only float32 rounding noise (~1e-7 of its norm): treat it as zero
    # rather than blowing the noise back up to full size.
    alive = after > before * torch.finfo(torch.float32).eps ** 0.5 + eps
    scale = torch.where(alive, before / after.clamp_min(eps), torch.zeros_like(after))
    return edited * (scale.unsqueeze(-2) if layout == "out_in" else scale.unsqueeze(-1))


# --- General (oblique, broadcast-safe) form, used by EditPlan -------------------------------------
#
# With a *write* basis U [k, d] and a *read* basis R [k, d], the residual-side map is
#     x ↦ (I − λ·UᵀR) x
# R = U = Q (orthonormal) is the orthogonal projection above. With R·Uᵀ = I the map is an oblique
# projection (idempotent for λ = 1, R x' = (1 − λ)·R x): LEACE's eraser x − W⁺P W x is of this
# form with U = (W⁺U_P)ᵀ, R = U_PᵀW (Belrose et al. 2023, EleutherAI/concept-erasure leace.py).
# Every function below treats the last two axes as the matrix, so fused expert tensors
# [E, d, in] / [E, in, d] broadcast.


def oblique_project(weight: torch.Tensor, write: torch.Tensor, read: torch.Tensor | None = None,
                    lam: float = 1.0, layout: Layout = "out_in") -> torch.Tensor:
    """out_in ([..., d, in]): W' = W − λ·Uᵀ(R W);  in_out ([..., n, d]): W' = W − λ·(W Rᵀ) U.

    `read` defaults to `write` (then this is exactly :func:`project_out`, same operation order)."""
    w = weight.float()
    u = write.to(device=weight.device, dtype=torch.float32)
    r = u if read is None else read.to(device=weight.device, dtype=torch.float32)
    if layout == "out_in":
        return w - lam * u.T @ (r @ w)  # [..., d, in] - [d, k] @ [..., k, in]
    return w - lam * (w @ r.T) @ u  # [..., n, d] - [..., n, k] @ [k, d]


def oblique_project_vector(bias: torch.Tensor, write: torch.Tensor, read: torch.Tensor | None = None,
                           lam: float = 1.0) -> torch.Tensor:
    """b' = b − λ·Uᵀ(R b) for b [..., d]."""
    b = bias.float()
    u = write.to(device=bias.device, dtype=torch.float32)
    r = u if read is None else read.to(device=bias.device, dtype=torch.float32)
    return b - lam * (b @ r.T) @ u  # [..., d] - [..., k] @ [k, d]


def residual_norms_nd(weight: torch.Tensor, layout: Layout = "out_in") -> torch.Tensor:
    """:func:`residual_norms` over the last two axes: [..., in] for [..., d, in], [..., n] for [..., n, d]."""
    return weight.float().norm(dim=-2 if layout == "out_in" else -1)


def norm_preserving_oblique(weight: torch.Tensor, write: torch.Tensor, read: torch.Tensor | None = None,
                            lam: float = 1.0, layout: Layout = "out_in", eps: float = 1e-12) -> torch.Tensor:
    """:func:`oblique_project`, then every residual-side vector rescaled to its old norm (as
    :func:`norm_preserving_project`; a vector left with only rounding noise becomes zero).
    Rescaling keeps R W' = (1 − λ)·R W up to the per-vector scale, so R W' = 0 for λ = 1."""
    before = residual_norms_nd(weight, layout)
    edited = oblique_project(weight, write, read, lam, layout)
    after = residual_norms_nd(edited, layout)
    alive = after > before * torch.finfo(torch.float32).eps ** 0.5 + eps
    scale = torch.where(alive, before / after.clamp_min(eps), torch.zeros_like(after))
    return edited * (scale.unsqueeze(-2) if layout == "out_in" else scale.unsqueeze(-1))


# --- One writer tensor, in bounded memory --------------------------------------------------------
#
# The in-memory edit (excise/apply.py) and the streaming bake (export/bake.py) both call this, so a
# baked checkpoint is bit-identical to the edited model by construction. A large tensor is edited in
# slices of its free axis (the rows of an in_out matrix, the input columns of an out_in one, one
# expert of a fused tensor at a time): every residual-side vector is edited on its own, so slicing
# changes which vectors share a matmul call, never the formula, and the float32 temporaries stay at
# one slice. Rows are sliced from ROW_CHUNK elements on (each output row is one row's dot products:
# on the project's CPU the sliced result is bit-identical to the whole); columns only from
# COLUMN_CHUNK on (BLAS blocks an out_in matmul by columns, so slicing can move the last bit; no
# matrix of a model up to 70B reaches it).

ROW_CHUNK = 1 << 24  # 64 MiB of float32
COLUMN_CHUNK = 1 << 28  # 1 GiB of float32
ALIGN = 64  # bytes: BLAS rounds differently on a misaligned buffer (a tensor inside a loaded file's mmap)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is contiguous and starts on an ALIGN boundary, else an aligned copy: the
    same values then give the same edit wherever they live (torch allocates on 64-byte boundaries)."""
    return t if t.is_contiguous() and t.data_ptr() % ALIGN == 0 else t.contiguous().clone()


def _project_in_place(weight: torch.Tensor, write: torch.Tensor, read: torch.Tensor | None = None,
                      lam: float = 1.0, layout: Layout = "out_in") -> torch.Tensor:
    """:func:`oblique_project` of a matrix as one GEMM into its float32 copy: out_in
    W' = W − λ·Uᵀ(R W) is ``addmm_(Uᵀ, R W, alpha=−λ)``, in_out W' = W − λ·(W Rᵀ) U is
    ``addmm_(W Rᵀ, U, alpha=−λ)``. The same formula with one temporary the size of W instead of four
    (about 2× faster on the bake's matrices); the result can differ from :func:`oblique_project` in
    the last bit where λ ≠ 1 and k > 1 (λ·t is not rounded on its own). Fused [E, ·, ·] tensors go
    through :func:`oblique_project`."""
    if weight.ndim != 2:
        return oblique_project(weight, write, read, lam, layout)
    w = weight.float()
    if w.data_ptr() == weight.data_ptr():
        w = w.clone()  # a float32 weight: edit a copy
    u = write.to(device=w.device, dtype=torch.float32)
    r = u if read is None else read.to(device=w.device, dtype=torch.float32)
    if layout == "out_in":
        return w.addmm_(u.T, r @ w, alpha=-lam)  # [d, in] − λ·[d, k] @ [k, in]
    return w.addmm_(w @ r.T, u, alpha=-lam)  # [n, d] − λ·[n, k] @ [k, d]


def edit_tensor(weight: torch.Tensor, write: torch.Tensor, read: torch.Tensor | None, lam: float,
                layout: Layout | Literal["vector"], norm_preserve: bool = False) -> torch.Tensor:
    """The edited copy of `weight` in its own dtype: the projection (:func:`_project_in_place`) or
    :func:`norm_preserving_oblique` on a matrix or fused [E, ·, ·] tensor, :func:`oblique_project_vector`
    on a vector (layout "vector"), computed on an aligned buffer."""
    if layout == "vector":
        return oblique_project_vector(_aligned(weight), write, read, lam).to(weight.dtype)
    edit = norm_preserving_oblique if norm_preserve else _project_in_place
    limit = ROW_CHUNK if layout == "in_out" else COLUMN_CHUNK
    if weight.numel() <= limit:
        return edit(_aligned(weight), write, read, lam, layout).to(weight.dtype)
    out = torch.empty_like(weight)
    if weight.ndim > 2:  # one expert (or leading index) at a time
        for i in range(weight.shape[0]):
            out[i] = edit_tensor(weight[i], write, read, lam, layout, norm_preserve)
        return out
    axis = 1 if layout == "out_in" else 0  # the free axis
    step = max(1, limit // (weight.numel() // weight.shape[axis]))
    for start in range(0, weight.shape[axis], step):
        part = weight.narrow(axis, start, min(step, weight.shape[axis] - start))
        out.narrow(axis, start, part.shape[axis]).copy_(edit(_aligned(part), write, read, lam, layout).to(weight.dtype))
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`, checked in ROW_CHUNK-element slices (isfinite of a whole bfloat16 tensor
    allocates four times its size)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(ROW_CHUNK))
