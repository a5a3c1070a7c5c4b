"""SAE directions: a planted harmful-only sparse feature is recovered among random sparse features."""

from __future__ import annotations

import pytest
import torch

from obliteratus.directions import get_direction_method
from obliteratus.directions.sae import SaeOptions, cohens_d, sae_directions, train_sae
from obliteratus.errors import ConfigError

D, N, N_FEATURES = 24, 300, 32
FAST = dict(expansion=2, batch_size=64, lr=1e-2, l1_coeff=1.0, max_epochs=60)


def planted(seed: int, scale: float = 1.0):
    """Harmful = background sparse features + u on 80% of rows; harmless = background only."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(N_FEATURES, D, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    u = torch.randn(D, generator=g)
    u /= u.norm()

    def background(n):
        on = (torch.rand(n, N_FEATURES, generator=g) < 0.1).float()
        return (on * torch.rand(n, N_FEATURES, generator=g) * 2) @ feats + 0.05 * torch.randn(n, D, generator=g)

    coeff = (torch.rand(N, 1, generator=g) < 0.8).float() * (1 + 2 * torch.rand(N, 1, generator=g))
    return scale * (background(N) + coeff * u), scale * background(N), u


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_planted_feature_with_sign(seed):
    harmful, harmless, u = planted(seed, scale=40.0)  # the input scaling makes the scale irrelevant
    r = get_direction_method("sae").fit(harmful, harmless, 1, SaeOptions(**FAST, seed=seed))
    assert r.shape == (1, D) and r.dtype == torch.float32
    assert abs(float(r.norm()) - 1) < 1e-5
    assert float(r[0] @ u) > 0.9  # right feature, pointing toward harmful


def test_orthonormal_for_k_gt_1():
    harmful, harmless, u = planted(0)
    b = sae_directions(harmful, harmless, 3, SaeOptions(**FAST))
    assert b.shape == (3, D)
    torch.testing.assert_close(b.double() @ b.double().T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(b[0] @ u) > 0.9  # the first row is still the top feature


def test_deterministic_under_seed():
    harmful, harmless, _ = planted(0)
    short = {**FAST, "max_epochs": 10}
    a = sae_directions(harmful, harmless, 2, SaeOptions(**short, seed=3))
    b = sae_directions(harmful, harmless, 2, SaeOptions(**short, seed=3))
    assert torch.equal(a, b)
    c = train_sae(torch.cat([harmful, harmless]), SaeOptions(**short, seed=4))
    d = train_sae(torch.cat([harmful, harmless]), SaeOptions(**short, seed=3))
    assert not torch.equal(c.w_dec, d.w_dec)


def test_early_stopping_on_plateau():
    harmful, harmless, _ = planted(0)
    x = torch.cat([harmful, harmless])
    # lr ~ 0: the held-out loss never improves, so training stops after exactly `patience` epochs
    fit = train_sae(x, SaeOptions(**{**FAST, "lr": 1e-12, "max_epochs": 100}, patience=4))
    assert fit.stopped_early and fit.epochs == 4 and len(fit.history) == 4
    full = train_sae(x, SaeOptions(**{**FAST, "max_epochs": 3}, patience=4))
    assert not full.stopped_early and full.epochs == 3


def test_sae_reconstructs_and_decoder_columns_unit():
    harmful, harmless, _ = planted(1)
    x = torch.cat([harmful, harmless])
    fit = train_sae(x, SaeOptions(**FAST))
    torch.testing.assert_close(fit.w_dec.norm(dim=0), torch.ones(fit.w_dec.shape[1]), atol=1e-5, rtol=0)
    f = fit.encode(x)
    assert (f >= 0).all()
    rel = float((fit.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert rel < 0.5  # explains most of the variance
    assert fit.history[-1] < fit.history[0]


def test_cohens_d_matches_formula():
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # pooled var = (2*4 + 1*2) / 3 = 10/3; d = (3 - 1) / sqrt(10/3); constant column -> 0
    torch.testing.assert_close(cohens_d(a, b), torch.tensor([2 / (10 / 3) ** 0.5, 0.0], dtype=torch.float64))


def test_options_reject_typos():
    with pytest.raises(ConfigError):
        get_direction_method("sae").parse_options({"l1": 1.0})
