"""DISTILL direction methods on synthetic activations with a planted answer."""

from __future__ import annotations

import pytest
import torch

from obliteratus.directions import (
    Directions,
    direction_methods,
    get_direction_method,
    orthonormalize,
    register_direction_method,
)
from obliteratus.directions.diff_means import diff_means, mean_difference
from obliteratus.directions.svd import paired_svd
from obliteratus.errors import ConfigError, PromptError

D = 64
N = 200


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(seed: int, k: int = 1) -> torch.Tensor:
    return orthonormalize(torch.randn(k, D, generator=gen(seed), dtype=torch.float64)).float()


def test_builtin_methods_registered():
    methods = direction_methods()
    assert {"diff_means", "svd"} <= set(methods)
    assert methods["diff_means"].max_directions == 1
    assert methods["svd"].max_directions is None
    assert get_direction_method("svd").fit is paired_svd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diff_means_recovers_planted_direction(seed):
    u = unit(seed + 100)[0]
    harmless = torch.randn(N, D, generator=gen(seed))
    harmful = torch.randn(N, D, generator=gen(seed + 50)) + 3.0 * u
    r = get_direction_method("diff_means").fit(harmful, harmless, 1)
    assert r.shape == (1, D) and r.dtype == torch.float32
    assert abs(float(r.norm()) - 1.0) < 1e-5
    assert float(r[0] @ u) > 0.95  # right direction *and* sign
    flipped = diff_means(harmless, harmful)
    assert float(flipped[0] @ u) < -0.95


def test_mean_difference_is_exact():
    a = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 4.0]])
    torch.testing.assert_close(mean_difference(a, b), torch.tensor([2.0, 2.0]))
    # works over extra axes ([n, positions, layers, d] -> [positions, layers, d])
    x = torch.randn(5, 2, 3, 4, generator=gen(0))
    y = torch.randn(6, 2, 3, 4, generator=gen(1))
    torch.testing.assert_close(mean_difference(x, y), x.mean(0) - y.mean(0), atol=1e-6, rtol=0)


def test_diff_means_identical_means_raise():
    x = torch.randn(10, D, generator=gen(0))
    with pytest.raises(ValueError):
        diff_means(x, x.clone())


def planted_subspace(seed: int, k: int = 3):
    basis = unit(seed + 200, k)  # [k, d] orthonormal
    harmless = torch.randn(N, D, generator=gen(seed))
    coeffs = torch.randn(N, k, generator=gen(seed + 1)) * torch.tensor([8.0, 6.0, 4.0][:k]) + 2.0
    harmful = torch.randn(N, D, generator=gen(seed + 2)) + coeffs @ basis
    return harmful, harmless, basis


@pytest.mark.parametrize("seed", [0, 1])
def test_svd_spans_planted_subspace(seed):
    harmful, harmless, truth = planted_subspace(seed)
    b = get_direction_method("svd").fit(harmful, harmless, 3)
    assert b.shape == (3, D) and b.dtype == torch.float32
    torch.testing.assert_close(b.double() @ b.double().T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    cosines = torch.linalg.svdvals(b.double() @ truth.double().T)  # cosines of the principal angles
    assert float(cosines.min()) > 0.9, cosines
    # every vector points from harmless to harmful on average
    mean = (harmful - harmless).mean(0)
    assert (b @ mean > 0).all()


def test_svd_single_direction_close_to_diff_means():
    u = unit(7)[0]
    harmless = torch.randn(N, D, generator=gen(3))
    harmful = torch.randn(N, D, generator=gen(4)) + 3.0 * u
    b = paired_svd(harmful, harmless, 1)
    assert float(b[0] @ u) > 0.95


def test_svd_uses_shorter_set_and_needs_k_pairs():
    harmful, harmless, _ = planted_subspace(0)
    assert paired_svd(harmful[:5], harmless, 3).shape == (3, D)
    with pytest.raises(PromptError, match="at least k = 3"):
        paired_svd(harmful[:2], harmless, 3)
    with pytest.raises(PromptError):
        paired_svd(harmful, harmless[:3], 4)


def test_register_duplicate_and_bad_name():
    with pytest.raises(ValueError, match="already registered"):
        register_direction_method("diff_means", "again", diff_means)
    with pytest.raises(ValueError, match="identifier"):
        register_direction_method("not a name", "x", diff_means)
    assert direction_methods()["diff_means"].fit is diff_means  # registry unchanged


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_direction_method("pca_magic")
    assert "pca_magic" in str(err.value)
    assert "diff_means" in str(err.value) and "svd" in str(err.value)


def test_orthonormalize_keeps_first_direction_and_signs():
    raw = torch.randn(3, D, generator=gen(9), dtype=torch.float64)
    raw[0] *= -1  # an arbitrary sign must survive
    q = orthonormalize(raw)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(q[0], raw[0] / raw[0].norm(), atol=1e-10, rtol=0)
    # Gram-Schmidt: span is kept and each row points the same way as its input
    assert ((q * raw).sum(-1) > 0).all()
    proj = raw @ q.T @ q
    torch.testing.assert_close(proj, raw, atol=1e-10, rtol=0)
    # float32 in -> float32 out
    assert orthonormalize(raw.float()).dtype == torch.float32


def test_directions_checks_orthonormal_basis():
    good = unit(0, 2)
    d = Directions(good, "svd", layer=1, position=-1, mean_diff=torch.zeros(D))
    assert d.k == 2
    with pytest.raises(AssertionError):
        Directions(good * 2, "svd", layer=1, position=-1, mean_diff=torch.zeros(D))


def test_project_harmless_removes_the_harmless_mean_component():
    from obliteratus.directions.project_harmless import orthogonalize_against

    torch.manual_seed(0)
    v = torch.randn(64)
    basis = orthonormalize(torch.randn(3, 64) + 2.0 * v / v.norm())  # directions leaning on v
    out = orthogonalize_against(basis, v)
    assert (out.double() @ (v.double() / v.norm())).abs().max() < 1e-5  # orthogonal to the harmless mean
    torch.testing.assert_close(out.double() @ out.double().T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    # what is left of each direction is its part orthogonal to v, up to re-orthonormalisation
    u = v / v.norm()
    first = basis[0] - (basis[0] @ u) * u
    assert torch.nn.functional.cosine_similarity(out[0], first, dim=0) > 0.999
