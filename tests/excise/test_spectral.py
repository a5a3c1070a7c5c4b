"""Spectral cascade weights and cross-layer agreement: pure math with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from obliteratus.analysis.cross_layer import agreement_weights, cosine_matrix
from obliteratus.excise.spectral import cascade_signal, coherence, dct_matrix, spectral_weights


def test_dct_is_orthonormal_and_matches_the_definition():
    m = dct_matrix(6)
    torch.testing.assert_close(m @ m.T, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.arange(6.0, dtype=torch.float64)
    k = 2
    ref = math.sqrt(2 / 6) * sum(float(x[i]) * math.cos(math.pi / 6 * (i + 0.5) * k) for i in range(6))
    assert abs(float((m @ x)[k]) - ref) < 1e-12


def test_smooth_profile_survives_and_jitter_is_removed():
    n = 24
    bump = torch.exp(-((torch.arange(n) - 15.0) ** 2) / 18.0)
    w = spectral_weights(bump, n_bands=3, decay=1.6)
    assert int(w.argmax()) in (14, 15, 16) and abs(float(w.max()) - 1.0) < 1e-6
    assert float(w[0]) < 0.1
    base = bump + 0.3
    jitter = base + 0.3 * torch.tensor([(-1.0) ** i for i in range(n)])  # + the highest frequency, still >= 0
    smooth = spectral_weights(base, n_bands=3, decay=10.0)
    wj = spectral_weights(jitter, n_bands=3, decay=10.0)
    assert (wj - smooth).abs().max() < 0.1  # the alternating component is gone (up to edge leakage)
    assert (jitter / jitter.max() - smooth).abs().max() > 0.2  # ... and it was large


def test_coherence_and_signal():
    d = torch.zeros(4, 3)
    d[:, 0] = 1.0
    d[3] = torch.tensor([0.0, 1.0, 0.0])  # the last layer's direction is orthogonal to the others
    c = coherence(d, reach=1)
    assert c.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    s = cascade_signal(d, torch.ones(4))
    assert s.tolist() == pytest.approx([1.0, 0.3 + 0.7 * 2 / 3, 0.3 + 0.7 * 2 / 3, 0.3])  # reach 2


def test_agreement_weights():
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert cosine_matrix(d)[0, 1] == pytest.approx(2 ** -0.5)
    w = agreement_weights(d, source=0, floor=0.5)
    assert w.tolist() == pytest.approx([1.0, (2 ** -0.5 - 0.5) / 0.5, 0.0, 0.0])
    with pytest.raises(ValueError):
        agreement_weights(d, 0, floor=1.0)
