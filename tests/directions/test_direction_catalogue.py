"""Whitened SVD, Wasserstein, LEACE, CoT-aware and jailbreak-contrast directions on synthetic
activations with a planted answer (harmless ~ N(0, Σ) with anisotropic Σ, harmful = harmless-like +
a shift along a known subspace)."""

from __future__ import annotations

import pytest
import torch

from obliteratus.directions import cot_aware as cot_mod
from obliteratus.directions import jailbreak as jb_mod
from obliteratus.directions import leace as leace_mod
from obliteratus.directions import wasserstein as wass_mod
from obliteratus.directions import whitened_svd as wsvd_mod
from obliteratus.directions.base import get_direction_method, orthonormalize
from obliteratus.directions.diff_means import diff_means
from obliteratus.directions.svd import paired_svd
from obliteratus.errors import ActivationError, ConfigError, PromptError
from obliteratus.excise.projection import project_out

D = 32
N = 400
N_BIG = 4000  # whitening estimates Σ⁻¹: its sampling error shrinks like sqrt(D / N)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frame(seed: int) -> torch.Tensor:
    """[D, D] random orthonormal rows: the eigenbasis of Σ."""
    return orthonormalize(torch.randn(D, D, generator=gen(seed), dtype=torch.float64))


def gaussian(n: int, q: torch.Tensor, eig: torch.Tensor, seed: int) -> torch.Tensor:
    """[n, D] float32 samples of N(0, qᵀ diag(eig) q)."""
    return ((torch.randn(n, D, generator=gen(seed), dtype=torch.float64) * eig.sqrt()) @ q).float()


def spectrum(rogue: float = 400.0) -> torch.Tensor:
    """Eigenvalues: index 1 is a high-variance nuisance, the rest spread over [0.5, 2]."""
    eig = torch.linspace(0.5, 2.0, D, dtype=torch.float64)[torch.randperm(D, generator=gen(99))]
    eig[0] = 1.0
    eig[1] = rogue
    return eig


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spans of orthonormal a [k, D] and b [k, D]."""
    return torch.linalg.svdvals(a.double() @ b.double().T)


def assert_orthonormal(basis: torch.Tensor):
    assert basis.dtype == torch.float32
    g = basis.double() @ basis.double().T
    torch.testing.assert_close(g, torch.eye(len(basis), dtype=torch.float64), atol=1e-5, rtol=0)


def assert_points_to_harmful(basis, harmful, harmless):
    delta = harmful.double().mean(0) - harmless.double().mean(0)
    assert (basis.double() @ delta > 0).all()


def planted_subspace(q: torch.Tensor, eig: torch.Tensor, seed: int, generic: bool = False, n: int = N_BIG):
    """Harmful = Σ-noise + random coefficients (mean 2, std 8/6/4) along a 3-dim subspace orthogonal to
    the nuisance q[1]: three eigen-directions of Σ, or (generic) three random mixtures of them."""
    truth = q[[0, 2, 3]]  # [3, D]
    if generic:
        mix = torch.randn(3, D - 1, generator=gen(seed + 3), dtype=torch.float64)
        truth = orthonormalize(mix @ q[[0] + list(range(2, D))])
    harmless = gaussian(n, q, eig, seed)
    coeffs = torch.randn(n, 3, generator=gen(seed + 1), dtype=torch.float64) * torch.tensor([8.0, 6.0, 4.0]) + 2.0
    harmful = (gaussian(n, q, eig, seed + 2).double() + coeffs @ truth).float()
    return harmful, harmless, truth


def confounded(q: torch.Tensor, eig: torch.Tensor, seed: int, n: int = N_BIG):
    """Mean shift 3·u (u = q[0], unit variance) + 3·v (v = q[1], the variance-400 nuisance)."""
    harmless = gaussian(n, q, eig, seed)
    harmful = (gaussian(n, q, eig, seed + 1).double() + 3.0 * q[0] + 3.0 * q[1]).float()
    return harmful, harmless, q[0]


def test_registry_entries():
    expected = {"whitened_svd": (None, False), "wasserstein": (None, False), "leace": (1, False),
                "cot_aware": (None, False), "jailbreak": (1, True)}
    for name, (max_k, needs_model) in expected.items():
        m = get_direction_method(name)
        assert (m.max_directions, m.needs_model) == (max_k, needs_model), name
    assert get_direction_method("whitened_svd").fit is wsvd_mod.whitened_svd
    assert get_direction_method("leace").fit is leace_mod.leace_direction


@pytest.mark.parametrize("name, table", [
    ("whitened_svd", {"flor": 0.1}), ("whitened_svd", {"floor": 0.0}), ("whitened_svd", {"floor": 2.0}),
    ("wasserstein", {"regularisation": 1e-3}), ("wasserstein", {"regularization": 0.0}),
    ("leace", {"tol": 1e-6}),
    ("cot_aware", {"base": "pca"}), ("cot_aware", {"n_components": 0}), ("cot_aware", {"components": 2}),
    ("jailbreak", {"alpha": 1.5}), ("jailbreak", {"alpha": 0.5, "templates": "x"}),
])
def test_options_reject_typos_and_bad_values(name, table):
    with pytest.raises(ConfigError, match=name):
        get_direction_method(name).parse_options(table)


def test_options_defaults():
    assert get_direction_method("whitened_svd").parse_options(None).floor == 0.01
    assert get_direction_method("wasserstein").parse_options({}).regularization == 1e-4
    assert get_direction_method("cot_aware").parse_options({}).model_dump() == {"base": "diff_means", "n_components": 1}
    assert get_direction_method("jailbreak").parse_options({}).alpha == 0.5


# --- whitened SVD -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_svd_recovers_subspace_where_plain_svd_follows_the_nuisance(seed):
    q, eig = frame(seed), spectrum()
    harmful, harmless, truth = planted_subspace(q, eig, seed * 10, generic=True)  # not eigen-directions of Σ
    opts = wsvd_mod.WhitenedSVDConfig(floor=1e-3)
    b = get_direction_method("whitened_svd").fit(harmful, harmless, 3, opts)
    assert b.shape == (3, D)
    assert_orthonormal(b)
    assert_points_to_harmful(b, harmful, harmless)
    assert float(cosines(b, truth).min()) > 0.98
    # plain SVD's top direction is the variance-400 nuisance (pair noise 2·400 > shift energy 68)
    plain = paired_svd(harmful, harmless, 3)
    assert float(cosines(plain, truth).min()) < 0.5
    assert abs(float(plain[0].double() @ q[1])) > 0.9
    # the default floor (0.01 · 400 = 4 clamps every ordinary direction) still finds the subspace
    assert float(cosines(wsvd_mod.whitened_svd(harmful, harmless, 3), truth).min()) > 0.95


def test_whitened_svd_single_direction_is_the_mean_shift():
    # Pattern un-whitening maps the whitened mean back to Δμ: for k = 1 this is diff of means,
    # so it does NOT remove a confound along a high-variance direction (use wasserstein for that).
    q, eig = frame(3), spectrum()
    harmful, harmless, _ = confounded(q, eig, 5)
    b = wsvd_mod.whitened_svd(harmful, harmless, 1, wsvd_mod.WhitenedSVDConfig(floor=1e-3))
    assert float(b[0] @ diff_means(harmful, harmless)[0]) > 0.99


def test_whitening_pair_is_inverse_sqrt_with_floor():
    q, eig = frame(4), spectrum(rogue=50.0)
    harmless = gaussian(N, q, eig, 6)
    w, w_inv = wsvd_mod.whitening_pair(harmless, floor=0.02)
    x = harmless.double() - harmless.double().mean(0)
    cov = x.T @ x / (N - 1)
    torch.testing.assert_close(w @ w_inv, torch.eye(D, dtype=torch.float64), atol=1e-10, rtol=0)
    lam = torch.linalg.eigvalsh(w_inv @ w_inv)  # the floored covariance
    assert float(lam.min()) == pytest.approx(0.02 * float(torch.linalg.eigvalsh(cov).max()), rel=1e-8)
    # directions above the floor are whitened exactly: unit variance along the nuisance
    top = torch.linalg.eigh(cov).eigenvectors[:, -1]
    assert float(top @ w @ cov @ w @ top) == pytest.approx(1.0, rel=1e-8)


def test_whitened_svd_errors():
    q, eig = frame(0), spectrum()
    harmful, harmless, _ = planted_subspace(q, eig, 0)
    with pytest.raises(PromptError, match="k = 3"):
        wsvd_mod.whitened_svd(harmful[:2], harmless, 3)
    with pytest.raises(ActivationError, match="no variance"):
        wsvd_mod.whitened_svd(harmful, torch.ones(10, D), 1)


# --- Wasserstein ----------------------------------------------------------------------------------

def ratio(r: torch.Tensor, harmful, harmless) -> float:
    """Refusal signal per harmless edit cost: (r·Δ)² / E_b[(r·x)²]."""
    r = r.double().flatten() / r.double().norm()
    delta = harmful.double().mean(0) - harmless.double().mean(0)
    return float((r @ delta) ** 2 / ((harmless.double() @ r) ** 2).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wasserstein_beats_diff_means_on_a_high_variance_confound(seed):
    q, eig = frame(seed + 20), spectrum()
    harmful, harmless, u = confounded(q, eig, seed)
    r = get_direction_method("wasserstein").fit(harmful, harmless, 1, wass_mod.WassersteinConfig())
    assert_orthonormal(r)
    assert_points_to_harmful(r, harmful, harmless)
    dm = diff_means(harmful, harmless)
    assert float(r[0].double() @ u) > 0.98  # the unit-variance shift, nuisance dropped
    assert float(dm[0].double() @ u) < 0.8  # diff of means is ~45° off (3u + 3v)
    assert ratio(r, harmful, harmless) > 5 * ratio(dm, harmful, harmless)


def test_wasserstein_matches_closed_form_for_a_pure_shift():
    # harmful = harmless + Δ exactly: S = ΔΔᵀ, the optimum is (C + εI)⁻¹Δ (OBLITERATUS's formula)
    q, eig = frame(7), spectrum()
    harmless = gaussian(N, q, eig, 1) + 0.5  # a non-zero harmless mean enters C
    delta = (2.0 * q[0] + q[3]).float()
    harmful = harmless + delta
    r = wass_mod.wasserstein_directions(harmful, harmless, 1)
    b = harmless.double()
    c = (b - b.mean(0)).T @ (b - b.mean(0)) / (N - 1) + torch.outer(b.mean(0), b.mean(0))
    c = c + 1e-4 * torch.trace(c) / D * torch.eye(D, dtype=torch.float64)
    ref = torch.linalg.solve(c, (harmful.double() - b).mean(0))
    assert float(r[0].double() @ ref / ref.norm()) > 1 - 1e-6


def test_wasserstein_recovers_planted_subspace():
    q, eig = frame(8), spectrum()
    harmful, harmless, truth = planted_subspace(q, eig, 3)  # truth = eigen-directions of Σ
    b = wass_mod.wasserstein_directions(harmful, harmless, 3)
    assert_orthonormal(b)
    assert_points_to_harmful(b, harmful, harmless)
    assert float(cosines(b, truth).min()) > 0.97


def test_wasserstein_errors():
    x = torch.randn(10, D, generator=gen(0))
    with pytest.raises(PromptError):
        wass_mod.wasserstein_directions(x[:1], x, 1)
    with pytest.raises(PromptError, match="hidden size"):
        wass_mod.wasserstein_directions(x, x + 1, D + 1)
    with pytest.raises(ActivationError):
        wass_mod.wasserstein_directions(torch.zeros(5, D), torch.zeros(5, D), 1)


# --- LEACE -----------------------------------------------------------------------------------------

def labelled(seed: int, classes: int = 2, n: int = 300, d: int = D):
    q = frame(seed)[:d, :d] if d == D else orthonormalize(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    eig = torch.linspace(0.2, 5.0, d, dtype=torch.float64)
    x = ((torch.randn(n, d, generator=gen(seed + 1), dtype=torch.float64) * eig.sqrt()) @ q)
    labels = torch.arange(n) % classes
    shifts = torch.randn(classes, d, generator=gen(seed + 2), dtype=torch.float64) * 2.0
    return x + shifts[labels], labels


def class_means(x, labels):
    return torch.stack([x[labels == c].mean(0) for c in labels.unique()])


@pytest.mark.parametrize("classes", [2, 3])
def test_leace_equalises_class_means(classes):
    x, labels = labelled(0, classes)
    z = labels.double() if classes == 2 else torch.nn.functional.one_hot(labels).double()
    eraser = leace_mod.fit_leace(x, z)
    assert eraser.write.shape == (classes - 1, D) and eraser.read.shape == (classes - 1, D)
    torch.testing.assert_close(eraser.read.double() @ eraser.write.double().T,
                               torch.eye(classes - 1, dtype=torch.float64), atol=1e-5, rtol=0)
    before = class_means(x, labels)
    after = class_means(eraser(x).double(), labels)
    assert float((before - before.mean(0)).abs().max()) > 1.0
    assert float((after - after.mean(0)).abs().max()) < 1e-4
    # idempotent: erasing again changes nothing
    torch.testing.assert_close(eraser(eraser(x)), eraser(x), atol=1e-4, rtol=0)


def test_leace_edits_less_than_orthogonal_projection_on_the_same_range():
    x, labels = labelled(1, 3)
    eraser = leace_mod.fit_leace(x, torch.nn.functional.one_hot(labels))
    q = orthonormalize(eraser.write.double())  # [2, D]
    centred = x - eraser.mean.double()
    orth = x - centred @ q.T @ q
    assert float((class_means(orth, labels) - class_means(orth, labels).mean(0)).abs().max()) < 1e-4  # also erases
    leace_cost = ((eraser(x).double() - x) ** 2).sum(-1).mean()
    orth_cost = ((orth - x) ** 2).sum(-1).mean()
    assert float(leace_cost) < 0.99 * float(orth_cost)


def test_leace_matches_float64_reference():
    x, labels = labelled(2, 3, n=200)
    z = torch.nn.functional.one_hot(labels).double()
    eraser = leace_mod.fit_leace(x, z)
    cx, cz = x - x.mean(0), z - z.mean(0)
    sxx, sxz = cx.T @ cx / (len(x) - 1), cx.T @ cz / (len(x) - 1)
    u, s, _ = torch.linalg.svd(sxx)  # SPD: Σ = U S Uᵀ
    w = u @ torch.diag(s.rsqrt()) @ u.T
    a = w @ sxz
    p_ref = torch.linalg.pinv(w) @ a @ torch.linalg.pinv(a) @ w  # W⁺ Π W
    torch.testing.assert_close(eraser.matrix.double(), p_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(eraser.mean.double(), x.mean(0), atol=1e-6, rtol=0)


def test_leace_rank_deficient_features():
    x, labels = labelled(3, 2, n=20)  # 20 samples in 32 dimensions: Σ_xx is singular
    eraser = leace_mod.fit_leace(x, labels)
    after = class_means(eraser(x).double(), labels)
    assert float((after[0] - after[1]).abs().max()) < 1e-3


def test_leace_direction_is_diff_means():
    q, eig = frame(5), spectrum(rogue=20.0)
    harmful, harmless, _ = confounded(q, eig, 2)
    r = get_direction_method("leace").fit(harmful, harmless, 1, None)
    assert r.shape == (1, D)
    assert_orthonormal(r)
    assert_points_to_harmful(r, harmful, harmless)
    assert float(r[0] @ diff_means(harmful, harmless)[0]) > 1 - 1e-5


def test_oblique_project_out():
    x, labels = labelled(4, 2)
    eraser = leace_mod.fit_leace(x, labels)
    w = torch.randn(D, 7, generator=gen(1))  # out_in: [d, in]
    edited = leace_mod.oblique_project_out(w, eraser.write, eraser.read, 1.0, "out_in")
    assert float((eraser.read @ edited).abs().max()) < 1e-4  # read W' = 0
    torch.testing.assert_close(edited, w - eraser.matrix @ w, atol=1e-5, rtol=0)
    # in_out is the same map on rows
    torch.testing.assert_close(leace_mod.oblique_project_out(w.T, eraser.write, eraser.read, 1.0, "in_out"),
                               edited.T, atol=1e-5, rtol=0)
    # write = read = Q is the orthogonal projection
    qb = orthonormalize(torch.randn(2, D, generator=gen(2)))
    torch.testing.assert_close(leace_mod.oblique_project_out(w, qb, qb, 0.7), project_out(w, qb, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(leace_mod.oblique_project_out(w, eraser.write, eraser.read, 0.0), w)


def test_leace_errors():
    x = torch.randn(10, D, generator=gen(0))
    with pytest.raises(ActivationError, match="no linear information"):
        leace_mod.fit_leace(x, torch.ones(10))
    with pytest.raises(ActivationError, match="rows"):
        leace_mod.fit_leace(x, torch.ones(9))


# --- CoT-aware ---------------------------------------------------------------------------------------

def test_cot_aware_removes_the_harmless_principal_component():
    q, eig = frame(11), spectrum(rogue=100.0)
    harmless = gaussian(N, q, eig, 0)
    harmful = (gaussian(N, q, eig, 1).double() + 3.0 * q[0] + 2.0 * q[1]).float()  # shift leans on PC1 = q[1]
    r = get_direction_method("cot_aware").fit(harmful, harmless, 1, cot_mod.CotAwareConfig())
    assert_orthonormal(r)
    assert_points_to_harmful(r, harmful, harmless)
    pcs = cot_mod.harmless_components(harmless, 1)
    assert abs(float(pcs[0] @ q[1])) > 0.99
    assert float((r.double() @ pcs.T).abs().max()) < 1e-6  # exactly orthogonal to the estimated PC
    assert float(r[0].double() @ q[0]) > 0.97  # what is left is the planted refusal direction
    assert float(diff_means(harmful, harmless)[0].double() @ q[0]) < 0.9


def test_cot_aware_svd_base_subspace():
    q, eig = frame(12), spectrum(rogue=100.0)
    eig[1], eig[2] = 20.0, 15.0  # two strong harmless PCs (weaker than the shifts, so plain SVD sees the shifts)
    harmless = gaussian(N, q, eig, 3)
    coeffs = torch.randn(N, 2, generator=gen(4), dtype=torch.float64) * torch.tensor([10.0, 8.0]) + 3.0
    shift = coeffs @ torch.stack([(q[0] + 0.5 * q[1]), (q[3] + 0.5 * q[2])])
    harmful = (gaussian(N, q, eig, 5).double() + shift).float()
    opts = cot_mod.CotAwareConfig(base="svd", n_components=2)
    b = cot_mod.cot_aware(harmful, harmless, 2, opts)
    assert_orthonormal(b)
    assert_points_to_harmful(b, harmful, harmless)
    pcs = cot_mod.harmless_components(harmless, 2)
    assert float((b.double() @ pcs.T).abs().max()) < 1e-6
    assert float(cosines(b, q[[0, 3]]).min()) > 0.95


def test_cot_aware_errors():
    harmless = gaussian(50, frame(13), spectrum(), 0)
    pc = cot_mod.harmless_components(harmless, 1)[0].float()
    harmful = harmless + 5.0 * pc  # the shift is exactly the top PC: nothing left
    with pytest.raises(ConfigError, match="lie inside"):
        cot_mod.cot_aware(harmful, harmless, 1)
    with pytest.raises(ConfigError, match="base = 'svd'"):
        cot_mod.cot_aware(harmful, harmless, 2)
    with pytest.raises(ConfigError, match="hidden size"):
        cot_mod.cot_aware(harmful, harmless, 1, cot_mod.CotAwareConfig(n_components=D))
    with pytest.raises(PromptError):
        cot_mod.cot_aware(harmful[:3], harmless[:3], 1, cot_mod.CotAwareConfig(n_components=3))


# --- jailbreak contrast ------------------------------------------------------------------------------

def test_jailbreak_contrastive_blend_exact_and_cancels_confounds():
    q = frame(14)
    r, topic, style = q[0], q[1], q[2]
    base = lambda s: torch.randn(N, D, generator=gen(s), dtype=torch.float64)  # noqa: E731
    harmless = base(0).float()
    harmful = (base(1) + 3 * r + 3 * topic).float()  # refusal + harm topic
    jail = (base(2) + 3 * topic + 3 * style).float()  # same topic, refusal off, template style on
    out = jb_mod.jailbreak_contrastive(harmful, harmless, jail, 0.5)
    assert out.shape == (1, D) and out.dtype == torch.float32
    mu_h = harmful.double().mean(0)
    a = mu_h - harmless.double().mean(0)
    b = mu_h - jail.double().mean(0)
    ref = 0.5 * a / a.norm() + 0.5 * b / b.norm()
    torch.testing.assert_close(out[0].double(), ref / ref.norm(), atol=1e-6, rtol=0)
    dm = diff_means(harmful, harmless)[0].double()
    assert float(out[0].double() @ r) > float(dm @ r) + 0.05  # ≈ 0.82 vs 0.71
    assert float(out[0].double() @ r) > 0.75
    torch.testing.assert_close(jb_mod.jailbreak_contrastive(harmful, harmless, jail, 0.0), diff_means(harmful, harmless))


def test_jailbreak_registered_fit_needs_the_third_set():
    x = torch.randn(20, D, generator=gen(0))
    method = get_direction_method("jailbreak")
    opts = method.parse_options({"alpha": 0.25})
    with pytest.raises(ActivationError, match="jailbreak-wrapped"):
        method.fit(x + 1, x, 1, opts)
    with pytest.raises(ActivationError, match="width"):
        method.fit(x + 1, x, 1, opts, jailbreak=torch.zeros(5, D + 1))
    out = method.fit(x + 1, x, 1, opts, jailbreak=x + 0.5)
    assert_orthonormal(out)
    with pytest.raises(ActivationError, match="coincide"):
        jb_mod.jailbreak_contrastive(x, x, x + 1)


def test_jailbreak_templates(tmp_path):
    templates = jb_mod.load_jailbreak_templates()
    assert len(templates) >= 10
    assert all(t.count("{prompt}") == 1 for t in templates)
    assert len(set(templates)) == len(templates)
    wrapped = jb_mod.wrap_prompts(["A {x}", "B"], templates)
    assert wrapped == [templates[0].replace("{prompt}", "A {x}"), templates[1].replace("{prompt}", "B")]
    bad = tmp_path / "t.txt"
    bad.write_text("ok {prompt}\n\nno placeholder here\n")
    with pytest.raises(PromptError, match=":3:"):
        jb_mod.load_jailbreak_templates(bad)
    bad.write_text("{prompt} twice {prompt}\n")
    with pytest.raises(PromptError, match="exactly once"):
        jb_mod.load_jailbreak_templates(bad)
    with pytest.raises(PromptError, match="not found"):
        jb_mod.load_jailbreak_templates(tmp_path / "missing.txt")


# ---- cone: the concept-cone analysis chooses one direction or a subspace ----

def _cone_data(spread: bool, seed: int = 0, d: int = 48, per: int = 40):
    """Three harm categories whose refusal directions are e0, e1, e2 (spread) or all e0, plus noise."""
    g = gen(seed)
    axes = torch.eye(d)
    labels, rows = [], []
    for c, name in enumerate(("cyber", "fraud", "weapons")):
        v = axes[c] if spread else axes[0]
        rows.append(4.0 * v + 0.3 * torch.randn(per, d, generator=g))
        labels += [name] * per
    harmful = torch.cat(rows)
    harmless = 0.3 * torch.randn(3 * per, d, generator=g)
    return harmful, labels, harmless


def test_cone_recovers_a_planted_three_dimensional_cone():
    from obliteratus.directions.cone import cone_basis, cone_size

    harmful, labels, harmless = _cone_data(spread=True)
    k, dim, _ = cone_size(harmful, labels, harmless, k_max=4)
    assert dim == pytest.approx(3.0, abs=0.1) and k == 3
    basis = cone_basis(harmful, harmless, 4, harmful=harmful, labels=labels, harmless=harmless)
    assert basis.shape == (3, 48)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    span = basis.double().T @ basis.double()  # projector onto the basis
    for c in range(3):  # every planted category direction lies in the span
        e = torch.eye(48, dtype=torch.float64)[c]
        assert float((span @ e).norm()) > 0.99
    first = diff_means(harmful, harmless)[0]
    assert float(basis[0] @ first) > 0.999  # the difference of means comes first
    assert cone_basis(harmful, harmless, 2, harmful=harmful, labels=labels, harmless=harmless).shape == (2, 48)


def test_cone_of_one_direction_is_the_difference_of_means():
    from obliteratus.directions.cone import cone_basis, cone_size

    harmful, labels, harmless = _cone_data(spread=False)
    k, dim, _ = cone_size(harmful, labels, harmless, k_max=4)
    assert dim < 1.1 and k == 1
    basis = cone_basis(harmful, harmless, 4, harmful=harmful, labels=labels, harmless=harmless)
    torch.testing.assert_close(basis, diff_means(harmful, harmless))
    with pytest.raises(PromptError, match="category label"):
        cone_basis(harmful, harmless, 4)
