"""The projection math of EXCISE on small explicit tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from obliteratus.directions import orthonormalize
from obliteratus.excise import norm_preserving_project, project_out, project_vector, residual_norms

D = 12  # residual width
N = 7  # the other axis


def basis(k: int, dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(k, D, generator=gen, dtype=torch.float64)).to(dtype)


def matrix(layout: str, dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (D, N) if layout == "out_in" else (N, D)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def along(w: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    """Component of every residual-side vector along Q: Q·W for out_in, W·Qᵀ for in_out (float64)."""
    w, q = w.double(), q.double()
    return q @ w if layout == "out_in" else w @ q.T


cases = pytest.mark.parametrize("layout", ["out_in", "in_out"])
dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
ks = pytest.mark.parametrize("k", [1, 3])


@dtypes
@ks
def test_orthonormal_basis_helper(dtype, k):
    q = basis(k, dtype).double()
    torch.testing.assert_close(q @ q.T, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)


@cases
@dtypes
@ks
def test_project_out_removes_the_subspace(layout, dtype, k):
    q, w = basis(k, dtype), matrix(layout, dtype)
    assert along(w, q, layout).abs().max() > 0.1  # there was something to remove
    edited = project_out(w, q, 1.0, layout)
    assert edited.shape == w.shape
    assert along(edited, q, layout).abs().max() < 1e-5
    # the part orthogonal to Q is untouched: W' = (I - P) W exactly
    p = q.double().T @ q.double()
    eye = torch.eye(D, dtype=torch.float64)
    expected = (eye - p) @ w.double() if layout == "out_in" else w.double() @ (eye - p)
    torch.testing.assert_close(edited.double(), expected, atol=1e-5, rtol=0)


@cases
@dtypes
@ks
def test_project_out_is_idempotent(layout, dtype, k):
    q, w = basis(k, dtype), matrix(layout, dtype)
    once = project_out(w, q, 1.0, layout)
    twice = project_out(once, q, 1.0, layout)
    torch.testing.assert_close(twice, once, atol=1e-6, rtol=0)


@cases
@dtypes
@ks
def test_reflection_keeps_norms_and_negates_component(layout, dtype, k):
    q, w = basis(k, dtype), matrix(layout, dtype)
    reflected = project_out(w, q, 2.0, layout)
    torch.testing.assert_close(residual_norms(reflected, layout).double(), residual_norms(w, layout).double(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(along(reflected, q, layout), -along(w, q, layout), atol=1e-5, rtol=0)
    # reflecting twice is the identity
    torch.testing.assert_close(project_out(reflected, q, 2.0, layout).double(), w.double(), atol=1e-5, rtol=0)


@cases
@dtypes
@pytest.mark.parametrize("lam", [0.5, 1.0, 1.5])
def test_partial_lambda_scales_component(layout, dtype, lam):
    q, w = basis(2, dtype), matrix(layout, dtype)
    edited = project_out(w, q, lam, layout)
    torch.testing.assert_close(along(edited, q, layout), (1 - lam) * along(w, q, layout), atol=1e-5, rtol=0)


@cases
@dtypes
@ks
def test_norm_preserving_keeps_norms_and_removes_subspace(layout, dtype, k):
    q, w = basis(k, dtype), matrix(layout, dtype)
    edited = norm_preserving_project(w, q, 1.0, layout)
    torch.testing.assert_close(residual_norms(edited, layout).double(), residual_norms(w, layout).double(),
                               atol=1e-5, rtol=1e-5)
    assert along(edited, q, layout).abs().max() < 1e-5
    # only the magnitudes differ from the plain projection: each vector keeps its direction
    plain = project_out(w, q, 1.0, layout).double()
    axis = 0 if layout == "out_in" else 1
    cos = torch.nn.functional.cosine_similarity(edited.double(), plain, dim=axis)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-6, rtol=0)
    # the plain projection does shrink them, so the rescaling is not a no-op
    assert (residual_norms(plain, layout) < residual_norms(w, layout).double() - 1e-3).all()


def test_project_vector_removes_component():
    q = basis(2, torch.float64)
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    out = project_vector(b, q, 1.0)
    assert (q @ out.double()).abs().max() < 1e-6
    torch.testing.assert_close(out.double(), b - q.T @ (q @ b), atol=1e-6, rtol=0)
    flipped = project_vector(b, q, 2.0)
    torch.testing.assert_close((q @ flipped.double()), -(q @ b), atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped.double().norm(), b.norm(), atol=1e-5, rtol=0)


@cases
def test_norm_preserving_vector_along_q_stays_zero(layout):
    for seed in range(5):  # the rounding residual is exactly 0 for some q and ~1e-7 for others
        q = basis(1, torch.float32, seed=seed)
        w = matrix(layout, torch.float32).clone()
        if layout == "out_in":
            w[:, 2] = 3.0 * q[0]
        else:
            w[2, :] = 3.0 * q[0]
        edited = norm_preserving_project(w, q, 1.0, layout)
        assert torch.isfinite(edited).all()
        vec = edited[:, 2] if layout == "out_in" else edited[2, :]
        assert vec.norm() < 1e-5, f"seed {seed}: the vector along q came back with norm {vec.norm():.3g}"
        assert along(edited, q, layout).abs().max() < 1e-5


@cases
def test_norm_preserving_exact_zero_vector_stays_zero(layout):
    q = basis(1, torch.float32)
    w = matrix(layout, torch.float32).clone()
    if layout == "out_in":
        w[:, 4] = 0.0
    else:
        w[4, :] = 0.0
    edited = norm_preserving_project(w, q, 1.0, layout)
    assert torch.isfinite(edited).all()
    vec = edited[:, 4] if layout == "out_in" else edited[4, :]
    assert vec.abs().max() == 0


@cases
def test_bfloat16_input_gives_float32(layout):
    q = basis(2, torch.float32)
    w = matrix(layout, torch.float32).to(torch.bfloat16)
    edited = project_out(w, q, 1.0, layout)
    assert edited.dtype == torch.float32
    assert along(edited, q, layout).abs().max() < 1e-5
    assert norm_preserving_project(w, q, 1.0, layout).dtype == torch.float32
    assert project_vector(torch.ones(D, dtype=torch.bfloat16), q).dtype == torch.float32


def test_layouts_are_not_interchangeable():
    """A square matrix: out_in edits columns' residual side (P·W), in_out edits rows (W·P)."""
    q = basis(1, torch.float64)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(D, D, generator=gen, dtype=torch.float64)
    a = project_out(w, q, 1.0, "out_in").double()
    b = project_out(w, q, 1.0, "in_out").double()
    assert (q @ a).abs().max() < 1e-5 and (b @ q.T).abs().max() < 1e-5
    assert (a - b).abs().max() > 0.1
