"""EXCISE variants: EditPlan (per-layer bases, strengths, oblique read, lm_head input, norm
preservation), Heretic's kernel, Householder reflection, head surgery and neuron masking."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import family_params, random_unit, tiny_model
from obliteratus.settings import ExciseSettings
from obliteratus.errors import EditError
from obliteratus.excise import ablated, excise
from obliteratus.excise.heads import HeadOptions, head_geometry, head_scores, head_surgery, project_heads
from obliteratus.excise.householder import householder_excise, householder_matrix, householder_vector
from obliteratus.excise.kernels import (KernelOptions, kernel_strength, kernel_weights,
                                        search_space)
from obliteratus.excise.neurons import NeuronOptions, excise_and_mask, neuron_scores, select_neurons
from obliteratus.excise.plan import EditPlan, writer_layer
from obliteratus.excise.projection import oblique_project, project_out, residual_norms_nd
from obliteratus.models import ArchitectureAdapter

D = 32


def build(family: str):
    model = tiny_model(family)
    return model, ArchitectureAdapter(model)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 259, (3, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def along(w: torch.Tensor, r: torch.Tensor, layout: str) -> torch.Tensor:
    """R·W (out_in) or W·Rᵀ (in_out) in float64."""
    w, r = w.double(), r.double()
    return r @ w if layout == "out_in" else w @ r.T


def oblique_read(write: torch.Tensor, seed: int) -> torch.Tensor:
    """R = U + A with A ⟂ rows of U, so R·Uᵀ = I but R ≠ U (an oblique projection)."""
    a = torch.randn(write.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = write.double()
    a = a - (a @ u.T) @ u
    return (u + 0.7 * a).float()


def rich_plan(k: int = 1, **extra) -> tuple[torch.Tensor, EditPlan]:
    q = random_unit(D, k=k, seed=21)
    bases = {0: random_unit(D, k=k, seed=22), 1: random_unit(D, k=k, seed=23)}  # layer 2 uses q
    strength = kernel_strength(3, KernelOptions(max_weight=1.3, max_weight_position=1.0, min_weight=0.4,
                                                min_weight_distance=1.0),
                               KernelOptions(max_weight=0.9, max_weight_position=2.0, min_weight=0.5,
                                             min_weight_distance=1.5))
    strength[("embed", None)] = 0.6
    read = {0: oblique_read(bases[0], 24), 2: oblique_read(q, 25)}  # layer 1 stays orthogonal
    return q, EditPlan(layer_bases=bases, strength=strength, read=read, **extra)


# --- EditPlan: the hook path equals the weight path -------------------------------------------------

@pytest.mark.parametrize("family", family_params("llama", "gpt2", "gpt_neox", "gemma2", "qwen2"))
@pytest.mark.parametrize("biases", [True, False])
def test_plan_hook_equals_weight(family, biases):
    model, adapter = build(family)
    q, plan = rich_plan(k=2 if family == "llama" else 1)
    ids = tokens(1)
    original = logits(model, ids)
    with ablated(adapter, q, 1.0, biases=biases, plan=plan):
        hooked = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), original, atol=0, rtol=0)
    edited = copy.deepcopy(model)
    report = excise(ArchitectureAdapter(edited), q, ExciseSettings(biases=biases), plan)
    weight = logits(edited, ids)
    assert (weight - original).abs().max() > 1e-2
    torch.testing.assert_close(hooked, weight, atol=1e-4, rtol=1e-4)
    # the kernel skipped attention in layer 2? (|2 - 1| = 1 = distance, min_weight 0.4 > 0: kept) and
    # mlp of layer 0 (|0 - 2| = 2 > 1.5): skipped, recorded, untouched
    assert "layers.0.mlp_out" in report.skipped and "layers.0.mlp_out" not in report.writer_weights
    assert report.writer_weights["layers.2.attn_out"] == pytest.approx(0.4)
    assert report.plan["per_layer"] and report.plan["oblique"]


@pytest.mark.parametrize("family", family_params("llama", "gpt2"))
def test_plan_weight_math_per_writer(family):
    """R W' = (1 − λ·s)·R W on every edited writer with its own (U, R); skipped writers untouched."""
    model, adapter = build(family)
    lam = 1.0
    q, plan = rich_plan()
    before = {w.name: w.weight.detach().clone() for w in adapter.writers()}
    excise(adapter, q, ExciseSettings(lam=lam), plan)
    for w in adapter.writers():
        layer = writer_layer(w)
        s = plan.strength_for(w.kind, layer)
        if s == 0:
            torch.testing.assert_close(w.weight, before[w.name], atol=0, rtol=0)
            continue
        u = plan.write_basis(layer, q)
        r = plan.read_basis(layer, u)
        r = u if r is None else r
        expected = (1 - lam * s) * along(before[w.name], r, w.layout)
        torch.testing.assert_close(along(w.weight, r, w.layout), expected, atol=1e-5, rtol=1e-5)
        # and exactly the reference formula W − λs Uᵀ(R W)
        ref = oblique_project(before[w.name].double(), u.double(), r.double(), lam * s, w.layout)
        torch.testing.assert_close(w.weight.double(), ref.double(), atol=1e-5, rtol=0)


def test_default_plan_is_the_plain_projection():
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    q = random_unit(D, k=2, seed=3)
    r1 = excise(ArchitectureAdapter(a), q, ExciseSettings())
    r2 = excise(ArchitectureAdapter(b), q, ExciseSettings(), EditPlan())
    for (n, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p1, p2), n
    assert r1.edited == r2.edited and r1.plan is None and r2.plan is not None


def test_callable_strength_and_lam_override_hook_equals_weight():
    model, adapter = build("gpt2")
    q = random_unit(D, seed=5)
    plan = EditPlan(strength=lambda kind, layer: 0.0 if kind == "embed" else 0.5 + 0.25 * layer, lam=1.5)
    ids = tokens(2)
    with ablated(adapter, q, 1.0, plan=plan):
        hooked = logits(model, ids)
    edited = copy.deepcopy(model)
    report = excise(ArchitectureAdapter(edited), q, ExciseSettings(), plan)
    torch.testing.assert_close(hooked, logits(edited, ids), atol=1e-4, rtol=1e-4)
    assert report.lam == 1.5 and not report.tied_lm_head_edited
    assert report.writer_weights["layers.2.mlp_out"] == 1.0
    assert set(report.skipped) == {"embed.wte", "embed.wpe"}


@pytest.mark.parametrize("family", family_params("gpt2", "gemma"))
def test_tied_lm_head_with_global_oblique_read(family):
    """The tied lm_head sees E' = E − λ(E Rᵀ)U, i.e. its input gets the map with U and R swapped."""
    model, adapter = build(family)
    assert adapter.tied_lm_head
    q = random_unit(D, seed=30)
    plan = EditPlan(read=oblique_read(q, 31), strength=lambda kind, layer: 0.8 if kind == "embed" else 1.0)
    ids = tokens(4)
    with ablated(adapter, q, 1.0, plan=plan):
        hooked = logits(model, ids)
    edited = copy.deepcopy(model)
    report = excise(ArchitectureAdapter(edited), q, ExciseSettings(), plan)
    assert report.tied_lm_head_edited
    torch.testing.assert_close(hooked, logits(edited, ids), atol=1e-4, rtol=1e-4)


def test_lm_head_input_side():
    model, adapter = build("llama")  # untied lm_head
    q = random_unit(D, seed=6)
    read = oblique_read(q, 7)
    plan = EditPlan(lm_head_input=True, read=read, strength={})  # only the lm_head is edited
    before = adapter.lm_head.weight.detach().clone()
    ids = tokens(3)
    with ablated(adapter, q, 1.0, plan=plan):
        hooked = logits(model, ids)
    edited = copy.deepcopy(model)
    ea = ArchitectureAdapter(edited)
    report = excise(ea, q, ExciseSettings(), plan)
    torch.testing.assert_close(hooked, logits(edited, ids), atol=1e-4, rtol=1e-4)
    assert report.lm_head_input_edited and report.edited == ["lm_head.weight"]
    # W_U' Uᵀ = (1 − λ R Uᵀ) W_U Uᵀ = 0: the unembedding no longer reads U
    assert (ea.lm_head.weight.double() @ q.double().T).abs().max() < 1e-5
    assert (before.double() @ q.double().T).abs().max() > 1e-2
    # off by default, refused for a tied head
    assert not excise(ArchitectureAdapter(tiny_model("llama")), q, ExciseSettings()).lm_head_input_edited
    with pytest.raises(EditError, match="tied|shares"):
        excise(ArchitectureAdapter(tiny_model("gpt2")), q, ExciseSettings(), EditPlan(lm_head_input=True))


@pytest.mark.parametrize("family", family_params("llama", "gpt2"))
def test_plan_norm_preserve(family):
    model, adapter = build(family)
    q = random_unit(D, seed=8)
    bases = {1: random_unit(D, seed=9)}
    plan = EditPlan(layer_bases=bases, norm_preserve=True)
    before = {w.name: residual_norms_nd(w.weight, w.layout).clone() for w in adapter.writers()}
    report = excise(adapter, q, ExciseSettings(), plan)
    assert report.norm_preserve
    for w in adapter.writers():
        torch.testing.assert_close(residual_norms_nd(w.weight, w.layout), before[w.name], atol=1e-5, rtol=1e-5)
        u = plan.write_basis(writer_layer(w), q)
        assert along(w.weight, u, w.layout).abs().max() < 1e-5
    with pytest.raises(EditError, match="hook"):
        with ablated(adapter, q, 1.0, plan=plan):
            pass


def test_oblique_projection_math_and_3d_broadcast():
    u = random_unit(D, k=2, seed=10)
    r = oblique_read(u, 11)
    w = torch.randn(4, D, 6, generator=torch.Generator().manual_seed(12))  # fused experts [E, d, in]
    out = oblique_project(w, u, r, 1.0, "out_in")
    assert (r.double() @ out.double()).abs().max() < 1e-5  # R W' = 0
    twice = oblique_project(out, u, r, 1.0, "out_in")
    torch.testing.assert_close(twice, out, atol=1e-5, rtol=0)  # idempotent (R Uᵀ = I)
    for e in range(4):
        torch.testing.assert_close(out[e], oblique_project(w[e], u, r, 1.0, "out_in"), atol=1e-6, rtol=0)
    # R = U is exactly project_out
    assert torch.equal(oblique_project(w[0], u, None, 0.7), project_out(w[0], u, 0.7))


def test_missing_basis_is_an_error():
    _, adapter = build("llama")
    with pytest.raises(EditError, match="basis"):
        excise(adapter, None, ExciseSettings(), EditPlan(layer_bases={0: random_unit(D)}))


# --- Heretic kernel ----------------------------------------------------------------------------------

def test_kernel_weights_hand_computed():
    p = KernelOptions(max_weight=1.2, max_weight_position=5.5, min_weight=0.3, min_weight_distance=2.0)
    # dist = 5.5, 4.5, 3.5, 2.5 (> 2: 0), 1.5 -> 1.2 + 0.75·(0.3 − 1.2) = 0.525, 0.5 -> 0.975, 0.5, 1.5
    expected = torch.tensor([0, 0, 0, 0, 0.525, 0.975, 0.975, 0.525])
    torch.testing.assert_close(kernel_weights(8, p), expected, atol=1e-6, rtol=0)
    # distance exactly min_weight_distance is kept (Heretic skips only dist > distance) with min_weight
    q = KernelOptions(max_weight=1.0, max_weight_position=3, min_weight=0.25, min_weight_distance=2)
    torch.testing.assert_close(kernel_weights(6, q), torch.tensor([0, 0.25, 0.625, 1.0, 0.625, 0.25]))
    # a weight of exactly 0 is skipped from the plan table (Heretic's `weight == 0: continue`)
    z = KernelOptions(max_weight=1.0, max_weight_position=3, min_weight=0.0, min_weight_distance=2)
    table = kernel_strength(6, z, None)
    assert set(table) == {("attn", 2), ("attn", 3), ("attn", 4)}
    assert table[("attn", 2)] == pytest.approx(0.5)


def test_kernel_options_validation_and_search_space():
    with pytest.raises(ValueError):
        KernelOptions(max_weight=1, max_weight_position=2, min_weight=0.5, min_weight_distance=1, typo=3)
    with pytest.raises(ValueError):
        KernelOptions(max_weight=1, max_weight_position=2, min_weight=0.5, min_weight_distance=0)
    space = search_space(11, "mlp")
    assert space["max_weight"] == (-0.25, 1.5) and space["max_weight_position"] == (6.0, 10.0)
    assert search_space(11, "attn")["max_weight"] == (0.8, 1.5)


# --- Householder -------------------------------------------------------------------------------------

def test_householder_matrix_properties():
    d, t = random_unit(D, seed=13)[0], random_unit(D, seed=14)[0]
    h = householder_matrix(householder_vector(d, t))
    torch.testing.assert_close(h @ h.T, torch.eye(D, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(h @ d.double(), t.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(h @ t.double(), d.double(), atol=1e-6, rtol=0)
    hn = householder_matrix(householder_vector(d))  # negate
    torch.testing.assert_close(hn @ d.double(), -d.double(), atol=1e-6, rtol=0)
    with pytest.raises(EditError):
        householder_vector(d, 3 * d)


@pytest.mark.parametrize("family", family_params("llama", "gpt2"))
def test_householder_edit(family):
    model, adapter = build(family)
    d, t = random_unit(D, seed=15)[0], random_unit(D, seed=16)[0]
    before = {w.name: (w.weight.detach().clone(), None if w.bias is None else w.bias.detach().clone())
              for w in adapter.writers()}
    report = householder_excise(adapter, d, ExciseSettings(), target=t)
    assert report.variant == "householder" and report.lam == 2.0
    h = householder_matrix(householder_vector(d, t))
    for w in adapter.writers():
        w0, b0 = before[w.name]
        # promise: the edited output's component along d is the original component along t, and vice versa
        torch.testing.assert_close(along(w.weight, d[None], w.layout), along(w0, t[None], w.layout), atol=1e-5, rtol=0)
        torch.testing.assert_close(along(w.weight, t[None], w.layout), along(w0, d[None], w.layout), atol=1e-5, rtol=0)
        # W' = H W (out_in) / W H (in_out), norms preserved
        ref = h @ w0.double() if w.layout == "out_in" else w0.double() @ h
        torch.testing.assert_close(w.weight.double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(residual_norms_nd(w.weight, w.layout), residual_norms_nd(w0, w.layout),
                                   atol=1e-5, rtol=1e-5)
        if b0 is not None:
            torch.testing.assert_close(w.bias.double(), h @ b0.double(), atol=1e-6, rtol=0)


def test_householder_negate_equals_reflection_and_hooks():
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    d = random_unit(D, seed=17)
    householder_excise(ArchitectureAdapter(a), d, ExciseSettings())
    excise(ArchitectureAdapter(b), d, ExciseSettings(lam=2.0))
    for (n, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0, msg=n)
    with pytest.raises(EditError):
        householder_excise(ArchitectureAdapter(a), d, ExciseSettings(), plan=EditPlan(strength={("attn", 0): 0.5}))


# --- head surgery ------------------------------------------------------------------------------------

def plant_head(adapter, layer: int, head: int, q: torch.Tensor, scale: float = 3.0):
    """Add scale·q ⊗ x to head `head`'s slice of layer `layer`'s o_proj, so it writes strongly along q."""
    n_heads, hd = head_geometry(adapter.model.config)
    w = adapter.attn_out(layer).weight
    x = torch.randn(hd, generator=torch.Generator().manual_seed(layer * 10 + head))
    cols = slice(head * hd, (head + 1) * hd)
    with torch.no_grad():
        if isinstance(adapter.attn_out(layer), torch.nn.Linear):
            w[:, cols] += scale * torch.outer(q[0], x)
        else:
            w[cols, :] += scale * torch.outer(x, q[0])


@pytest.mark.parametrize("family", family_params("llama", "gpt2", "gemma"))
def test_head_surgery_edits_only_the_planted_head(family):
    model, adapter = build(family)
    q = random_unit(D, seed=18)
    plant_head(adapter, 1, 2, q)
    n_heads, hd = head_geometry(model.config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = head_surgery(adapter, q, HeadOptions(n_heads=1))
    assert report.details["heads"] == {"layers.1.attn_out": [2]}
    w = adapter.attn_out(1).weight
    name = next(n for n, p in model.named_parameters() if p is w)
    old, layout = before[name], ("out_in" if isinstance(adapter.attn_out(1), torch.nn.Linear) else "in_out")
    cols = slice(2 * hd, 3 * hd)
    new_h = w[:, cols] if layout == "out_in" else w[cols, :]
    assert along(new_h, q, layout).abs().max() < 1e-5  # dᵀW_o ≈ 0 on the chosen head
    changed = (w != old)
    mask = torch.zeros_like(changed)
    if layout == "out_in":
        mask[:, cols] = True
    else:
        mask[cols, :] = True
    assert changed[mask].any() and not changed[~mask].any()  # only the chosen head's slice changed
    for n, p in model.named_parameters():
        if p is not w:
            assert torch.equal(p, before[n]), n


def test_head_scores_and_per_layer_selection():
    model, adapter = build("llama")
    q = random_unit(D, k=2, seed=19)
    n_heads, hd = head_geometry(model.config)
    assert (n_heads, hd) == (4, 8)
    w = adapter.attn_out(0).weight.detach()
    scores = head_scores(w, q, n_heads, "out_in")
    ref = torch.stack([(q.double() @ w[:, h * hd:(h + 1) * hd].double()).norm() for h in range(n_heads)])
    torch.testing.assert_close(scores.double(), ref, atol=1e-5, rtol=1e-5)
    # GPT-2 Conv1D: rows of the head
    g = ArchitectureAdapter(tiny_model("gpt2")).attn_out(0).weight.detach()
    ref_g = torch.stack([(g[h * 8:(h + 1) * 8].double() @ q.double().T).norm() for h in range(4)])
    torch.testing.assert_close(head_scores(g, q, 4, "in_out").double(), ref_g, atol=1e-5, rtol=1e-5)
    expected = {f"layers.{i}.attn_out": sorted(torch.topk(head_scores(adapter.attn_out(i).weight, q, 4), 2)
                                               .indices.tolist()) for i in range(3)}
    report = head_surgery(adapter, q, HeadOptions(n_heads=2, per_layer=True))
    assert report.details["heads"] == expected
    # λ = 0.5 halves the component on the edited heads
    half = project_heads(w, q, [1], n_heads, 0.5)
    torch.testing.assert_close(q.double() @ half[:, 8:16].double(), 0.5 * (q.double() @ w[:, 8:16].double()),
                               atol=1e-5, rtol=0)


# --- neuron masking ----------------------------------------------------------------------------------

def test_neuron_scores_fp16_in_float32():
    q = random_unit(D, seed=20)
    w = (torch.randn(D, 10, generator=torch.Generator().manual_seed(1)) * 100).half()  # ‖w_j‖² overflows fp16
    assert torch.isinf((w * w).sum(0)).any()
    s = neuron_scores(w, q)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    w64 = w.double()
    ref = (q.double() @ w64).abs()[0] / w64.norm(dim=0)
    torch.testing.assert_close(s.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(neuron_scores(w.T, q, "in_out", relative=False).double(), (q.double() @ w64).abs()[0],
                               atol=1e-2, rtol=1e-5)
    assert neuron_scores(torch.zeros(D, 3), q).eq(0).all()  # a dead neuron scores 0, not nan


def plant_neurons(adapter, layer: int, neurons: list[int], q: torch.Tensor):
    """Neurons whose output is mostly along q (plus an orthogonal part, so they survive projection)."""
    w = adapter.mlp_out(layer).weight
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for j in neurons:
            other = torch.randn(D, generator=gen)
            other = 0.1 * (other - (other @ q[0]) * q[0])
            vec = (3.0 * q[0] + other).to(w.dtype)
            if isinstance(adapter.mlp_out(layer), torch.nn.Linear):
                w[:, j] = vec
            else:
                w[j, :] = vec


@pytest.mark.parametrize("family", family_params("llama", "gpt2"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neurons_scored_before_projection(family, dtype):
    model, adapter = build(family)
    model.to(dtype)
    q = random_unit(D, seed=21)
    planted = [5, 17]
    plant_neurons(adapter, 1, planted, q)
    options = NeuronOptions(count=2, per_layer=False)
    # scoring after a λ = 1 projection ranks rounding noise and would pick other neurons
    late = copy.deepcopy(model)
    la = ArchitectureAdapter(late)
    excise(la, q, ExciseSettings())
    late_scores = [neuron_scores(w.weight, q, w.layout) for w in la.writers(attention=False, embeddings=False)]
    assert max(float(s.max()) for s in late_scores) < (5e-3 if dtype == torch.float16 else 1e-5)
    assert select_neurons(la, q, options) != {"layers.1.mlp_out": planted}

    report = excise_and_mask(adapter, q, options, ExciseSettings())
    assert report.details["masked_neurons"] == {"layers.1.mlp_out": planted}
    assert report.variant == "project+neurons"
    w = adapter.mlp_out(1).weight
    assert w.dtype == dtype
    linear = isinstance(adapter.mlp_out(1), torch.nn.Linear)
    for j in range(w.shape[1] if linear else w.shape[0]):
        vec = w[:, j] if linear else w[j, :]
        assert (vec.abs().max() == 0) == (j in planted), j
    assert along(w.float(), q, "out_in" if linear else "in_out").abs().max() < (5e-3 if dtype == torch.float16 else 1e-5)


def test_neuron_selection_by_fraction_per_layer():
    model, adapter = build("llama")
    q = random_unit(D, seed=22)
    options = NeuronOptions(fraction=0.1)  # round(0.1 · 64) = 6 per layer
    expected = {w.name: sorted(torch.topk(neuron_scores(w.weight, q, w.layout), 6).indices.tolist())
                for w in adapter.writers(attention=False, embeddings=False)}
    before = {w.name: w.weight.detach().clone() for w in adapter.writers()}
    report = excise_and_mask(adapter, q, options)  # masking only
    assert report.details["masked_neurons"] == expected and report.variant == "neurons"
    for w in adapter.writers():
        if w.kind != "mlp":
            assert torch.equal(w.weight, before[w.name])
            continue
        zeroed = (w.weight.abs().sum(0) == 0).nonzero().flatten().tolist()
        assert zeroed == expected[w.name]
    with pytest.raises(ValueError):
        NeuronOptions(fraction=0.1, count=3)
