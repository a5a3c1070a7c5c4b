"""Mixture-of-experts: adapters (fused and per-module experts), the hook/weight equivalence, and
excise.moe (expert-granular directions, router refit, expert transplant) on tiny random MoE models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import PROMPTS, random_unit
from obliteratus.batching import Encoded
from obliteratus.settings import ExciseSettings
from obliteratus.errors import ObliteratusError
from obliteratus.excise import ablated, excise, residual_norms
from obliteratus.excise import moe
from obliteratus.excise.projection import project_out
from obliteratus.models import ArchitectureAdapter, supported_families
from support.moe import D, E, MOE, TOPK, moe_model


def tokens(seed=0, shape=(3, 9)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def writer_outputs(adapter, ids) -> dict[str, torch.Tensor]:
    out = {}
    hooks = [w.hook_module.register_forward_hook(lambda m, a, y, n=w.name: out.__setitem__(n, y.detach().clone()))
             for w in adapter.writers()]
    try:
        logits(adapter.model, ids)
    finally:
        for h in hooks:
            h.remove()
    return out


# ---------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("family", MOE)
def test_moe_adapter_structure(family):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    assert adapter.family in supported_families()
    n_moe = 2
    assert adapter.moe_layers == list(range(n_moe)) and adapter.is_moe
    writers = adapter.writers()
    routed = [w for w in writers if w.moe == "routed"]
    assert len(routed) == n_moe and all(w.fused and w.kind == "mlp" and w.n_experts == E for w in routed)
    for w in routed:
        assert w.weight.ndim == 3
        axis = -2 if w.layout == "out_in" else -1
        assert w.weight.shape[axis] == D
        assert w.layout == ("in_out" if family == "gpt_oss" else "out_in")
        assert (w.bias is not None) == (family == "gpt_oss") == w.routed_bias
        assert w.hook_module is adapter.experts(int(w.name.split(".")[1]))
    shared = [w for w in writers if w.moe == "shared"]
    assert len(shared) == (n_moe if family == "qwen2_moe" else 0)
    assert (adapter.shared_expert_gate(0) is not None) == (family == "qwen2_moe")
    dense = [w.name for w in writers if w.name.endswith("mlp_out")]
    assert dense == (["layers.2.mlp_out"] if family == "qwen3_moe" else [])
    assert [w.name for w in adapter.writers(attention=False, embeddings=False, mlp=False, experts=True)] == \
        [w.name for w in routed]
    assert all(w.moe != "routed" for w in adapter.writers(experts=False))
    assert adapter.n_experts(0) == E and adapter.router(0).weight.shape == (E, D)
    assert adapter.module_for("layers.0.mlp_out")[0] is model.model.layers[0].mlp
    with pytest.raises(ObliteratusError):
        ArchitectureAdapter(moe_model("qwen3_moe")).router(2)


@pytest.mark.parametrize("family", MOE)
def test_experts_output_is_routing_weighted_sum_of_linear_experts(family):
    """The premise of the hook path: experts(x) = Σ_k w_k (W_{e_k} g_k(x) + b_{e_k}), so projecting the
    module output equals projecting every expert's down projection (same routing, linear in W)."""
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    experts, router = adapter.experts(0), adapter.router(0)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    _, w, idx = router(x)  # [N, k], [N, k]
    y = experts(x, idx, w)
    q = random_unit(D, k=2, seed=3)
    edited = copy.deepcopy(experts)
    writer = adapter.expert_writers(0)[0]
    with torch.no_grad():
        getattr(edited, writer.param).copy_(moe.project_experts(writer.weight, q.expand(E, 2, D), 1.0, writer.layout))
    y_edit = edited(x, idx, w)
    bias_mix = torch.zeros_like(y) if writer.bias is None else moe.routed_bias_mix(writer.bias, idx, w)
    base = y - bias_mix
    torch.testing.assert_close(y_edit, y - (base @ q.T) @ q, atol=1e-5, rtol=1e-5)
    # and the manual routing-weighted sum reproduces the module
    manual = torch.zeros_like(y)
    for n in range(x.shape[0]):
        for k in range(TOPK):
            e = int(idx[n, k])
            manual[n] += w[n, k] * _expert_forward(experts, writer, e, x[n])
    torch.testing.assert_close(manual, y, atol=1e-5, rtol=1e-5)


def _expert_forward(experts, writer, e, x):
    gu = experts.gate_up_proj[e]
    if writer.layout == "out_in":
        gate, up = (gu @ x).chunk(2)
        return writer.weight[e] @ (experts.act_fn(gate) * up)
    h = x @ gu + experts.gate_up_proj_bias[e]
    return experts._apply_gate(h) @ writer.weight[e] + writer.bias[e]


@pytest.mark.parametrize("family", MOE)
def test_excise_removes_direction_from_every_moe_writer(family):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    q = random_unit(D, seed=1)
    ids = tokens()
    before = writer_outputs(adapter, ids)
    assert max(float((y @ q.T).abs().max()) for y in before.values()) > 0.05
    report = excise(adapter, q, ExciseSettings())
    assert report.max_residual < 1e-5
    after = writer_outputs(adapter, ids)
    assert set(after) == {w.name for w in adapter.writers()}
    for name, y in after.items():
        assert float((y @ q.T).abs().max() / y.abs().max()) < 1e-5, name
    for w in adapter.expert_writers(0):  # every expert's slice
        along = q @ w.weight if w.layout == "out_in" else w.weight @ q.T
        assert float(along.abs().max()) < 1e-5


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("k,lam", [(1, 1.0), (2, 2.0)])
def test_moe_hook_edit_equals_weight_edit(family, k, lam):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    q = random_unit(D, k=k, seed=2)
    ids = tokens(seed=3)
    original = logits(model, ids)
    with ablated(adapter, q, lam):
        hooked = logits(model, ids)
    edited = copy.deepcopy(model)
    excise(ArchitectureAdapter(edited), q, ExciseSettings(lam=lam))
    weight_logits = logits(edited, ids)
    assert (weight_logits - original).abs().max() > 1e-2
    torch.testing.assert_close(hooked, weight_logits, atol=1e-4, rtol=1e-4)


def test_gpt_oss_unprojected_expert_bias_hook_equals_weight_edit():
    """biases=False: the expert bias reaches the output routing-weighted; routed_bias_hook subtracts
    Σ_k w_k b_{e_k} before projecting, which is the exact output of the weight-only edit."""
    model = moe_model("gpt_oss")
    adapter = ArchitectureAdapter(model)
    q = random_unit(D, k=2, seed=4)
    ids = tokens(seed=5)
    handles = []
    try:
        for w in adapter.writers(attention=False, embeddings=False):
            handles.append(w.hook_module.register_forward_hook(moe.routed_bias_hook(w, q), with_kwargs=True))
        with ablated(adapter, q, 1.0, mlp=False, biases=False):
            hooked = logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    edited = copy.deepcopy(model)
    excise(ArchitectureAdapter(edited), q, ExciseSettings(biases=False))
    torch.testing.assert_close(hooked, logits(edited, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_norm_preserving_excise_on_fused_experts(family):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    before = {w.name: residual_norms(w.weight, w.layout).clone() for w in adapter.writers()}
    assert before["layers.0.experts"].shape == (E, 48)
    excise(adapter, random_unit(D, k=2, seed=6), ExciseSettings(norm_preserve=True))
    for w in adapter.writers():
        torch.testing.assert_close(residual_norms(w.weight, w.layout), before[w.name], atol=1e-5, rtol=1e-5)


class ExpertList(nn.ModuleList):
    """transformers-4-style experts: one module per expert (w1/w3 in, w2 out), called like the fused one."""

    def __init__(self, fused):
        super().__init__()
        n, two_i, d = fused.gate_up_proj.shape
        for e in range(n):
            m = nn.Module()
            m.w1, m.w3, m.w2 = nn.Linear(d, two_i // 2, bias=False), nn.Linear(d, two_i // 2, bias=False), \
                nn.Linear(two_i // 2, d, bias=False)
            gate, up = fused.gate_up_proj[e].chunk(2)
            m.w1.weight.data, m.w3.weight.data, m.w2.weight.data = gate.clone(), up.clone(), fused.down_proj[e].clone()
            self.append(m)

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for k in range(idx.shape[1]):
            for e, m in enumerate(self):
                rows = idx[:, k] == e
                out[rows] += w[rows, k, None] * m.w2(nn.functional.silu(m.w1(x[rows])) * m.w3(x[rows]))
        return out


def test_per_module_experts():
    fused = moe_model("mixtral")
    model = copy.deepcopy(fused)
    for layer in model.model.layers:
        layer.mlp.experts = ExpertList(layer.mlp.experts)
    ids = tokens(seed=7)
    torch.testing.assert_close(logits(model, ids), logits(fused, ids), atol=1e-5, rtol=1e-5)
    adapter = ArchitectureAdapter(model)
    routed = [w for w in adapter.writers() if w.moe == "routed"]
    assert [w.name for w in routed[:E]] == [f"layers.0.experts.{e}" for e in range(E)]
    assert all(not w.fused and w.layout == "out_in" and isinstance(w.module, nn.Linear) for w in routed)
    q = random_unit(D, seed=8)
    with ablated(adapter, q):
        hooked = logits(model, ids)
    excise(adapter, q, ExciseSettings())
    torch.testing.assert_close(hooked, logits(model, ids), atol=1e-4, rtol=1e-4)
    # same edit as on the fused model
    excise(ArchitectureAdapter(fused), q, ExciseSettings())
    torch.testing.assert_close(logits(model, ids), logits(fused, ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- EGA math


def test_routing_weighted_directions_formula_and_planted_recovery():
    gen = torch.Generator().manual_seed(0)
    n, d, e = 400, 16, 3
    planted = torch.linalg.qr(torch.randn(d, e, generator=gen, dtype=torch.float64))[0].T  # [E, d] orthonormal
    route_h = torch.randint(0, e, (n,), generator=gen)
    route_b = torch.randint(0, e, (n,), generator=gen)
    p_h = torch.nn.functional.one_hot(route_h, e).double()
    p_b = torch.nn.functional.one_hot(route_b, e).double()
    base = torch.randn(d, generator=gen, dtype=torch.float64)
    h_b = base + 0.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    h_h = base + 3.0 * planted[route_h]  # harmful tokens routed to e are shifted along planted[e]
    dirs, fb = moe.routing_weighted_directions(h_h, p_h, h_b, p_b, min_mass=1.0)
    assert not fb.any()
    torch.testing.assert_close(dirs.double(), planted, atol=1e-6, rtol=0)
    # soft routing: exact reference formula, computed expert by expert
    p_h = torch.softmax(torch.randn(n, e, generator=gen, dtype=torch.float64), -1)
    p_b = torch.softmax(torch.randn(n, e, generator=gen, dtype=torch.float64), -1)
    h_h = torch.randn(n, d, generator=gen, dtype=torch.float64) + 1.0
    h_b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dirs, _ = moe.routing_weighted_directions(h_h, p_h, h_b, p_b)
    for j in range(e):
        ref = (p_h[:, j, None] * h_h).sum(0) / p_h[:, j].sum() - (p_b[:, j, None] * h_b).sum(0) / p_b[:, j].sum()
        torch.testing.assert_close(dirs[j].double(), ref / ref.norm(), atol=1e-6, rtol=0)


def test_routing_mass_guard_falls_back_to_global_direction():
    gen = torch.Generator().manual_seed(1)
    n, d = 50, 8
    p = torch.zeros(n, 3, dtype=torch.float64)
    p[:, 0], p[:, 1] = 0.7, 0.3 - 1e-3
    p[:, 2] = 1e-3  # expert 2 gets 0.05 tokens' worth of mass in total
    h_h = torch.randn(n, d, generator=gen, dtype=torch.float64) + 2.0
    h_b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dirs, fb = moe.routing_weighted_directions(h_h, p, h_b, p, min_mass=2.0)
    assert fb.tolist() == [False, False, True]
    glob = h_h.mean(0) - h_b.mean(0)
    torch.testing.assert_close(dirs[2].double(), glob / glob.norm(), atol=1e-6, rtol=0)


def test_collect_routing_left_padded_batches_match_single_prompts(tokenizer):
    model = moe_model("mixtral")
    adapter = ArchitectureAdapter(model)
    enc = Encoded.of(tokenizer, PROMPTS[:4], add_special_tokens=False)
    for positions in (None, 2):
        batched = moe.collect_routing(adapter, enc, positions=positions, batch_size=4)
        single = moe.collect_routing(adapter, enc, positions=positions, batch_size=1)
        n_tok = enc.n_tokens if positions is None else positions * 4
        for i in adapter.moe_layers:
            assert batched.hidden[i].shape == (n_tok, D) and batched.probs[i].shape == (n_tok, E)
            torch.testing.assert_close(batched.probs[i].sum(-1), torch.ones(n_tok), atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.hidden[i], single.hidden[i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched.probs[i], single.probs[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_ega_end_to_end_projects_each_expert_with_its_own_direction(family, tokenizer):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    harmful = Encoded.of(tokenizer, [p + " Now do something bad." for p in PROMPTS], add_special_tokens=False)
    harmless = Encoded.of(tokenizer, PROMPTS, add_special_tokens=False)
    found = moe.expert_directions(moe.collect_routing(adapter, harmful, None),
                                  moe.collect_routing(adapter, harmless, None),
                                  min_mass=2.0)
    assert set(found.directions) == set(adapter.moe_layers)
    dirs = found.directions[0]
    assert dirs.shape == (E, D) and not found.fallback[0].all()
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(E), atol=1e-5, rtol=0)
    own = dirs[~found.fallback[0]]
    assert len(own) >= 2 and float((own[0] - own[1]).norm()) > 1e-2  # experts really get different directions
    original = adapter.expert_writers(0)[0].weight.detach().clone()
    edited = moe.excise_experts(adapter, found.directions)
    assert "layers.0.experts.down_proj" in edited
    w = adapter.expert_writers(0)[0]
    for e in range(E):
        r = dirs[e][None]
        along = r @ w.weight[e] if w.layout == "out_in" else w.weight[e] @ r.T
        assert float(along.abs().max()) < 1e-5
        torch.testing.assert_close(w.weight[e], project_out(original[e], r, 1.0, w.layout), atol=1e-6, rtol=0)
    if w.bias is not None:
        assert float((w.bias * dirs).sum(-1).abs().max()) < 1e-5


# ---------------------------------------------------------------------------- router refit


def test_refit_router_math():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    # no drift, no change
    torch.testing.assert_close(moe.refit_router(w, x, x, ridge=0.3).double(), w, atol=1e-5, rtol=0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    xa = x @ a  # inputs after the edit, an invertible map of the old ones: exact fit for ρ → 0
    v = moe.refit_router(w, x, xa, ridge=0.0).double()
    torch.testing.assert_close(xa @ v.T, x @ w.T, atol=1e-4, rtol=1e-4)
    # ridge: the normal equations V(X'ᵀX' + R) = W(XᵀX' + R) hold
    v = moe.refit_router(w, x, xa, ridge=0.5).double()
    r = 0.5 * torch.trace(xa.T @ xa) / 8 * torch.eye(8, dtype=torch.float64)
    scale = float((xa.T @ xa).abs().max())
    torch.testing.assert_close(v @ (xa.T @ xa + r), w @ (x.T @ xa + r), atol=1e-6 * scale, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_stabilise_routers_brings_harmless_routing_back(family, tokenizer):
    model = moe_model(family)
    adapter = ArchitectureAdapter(model)
    harmless = Encoded.of(tokenizer, PROMPTS, add_special_tokens=False)

    def routing_kl(reference):
        now = moe.collect_routing(adapter, harmless, None)
        return sum(float((reference[i] * (reference[i].log() - now.probs[i].log())).sum(-1).mean())
                   for i in adapter.moe_layers)

    original = moe.collect_routing(adapter, harmless, None).probs
    before = moe.router_inputs(adapter, harmless)
    q = (before[0].mean(0) / before[0].mean(0).norm())[None]  # a direction the routers do read
    excise(adapter, q, ExciseSettings())
    drift = routing_kl(original)
    assert drift > 1e-3
    changes = moe.stabilise_routers(adapter, before, moe.router_inputs(adapter, harmless), ridge=0.01)
    assert set(changes) == set(adapter.moe_layers) and all(c > 0 for c in changes.values())
    assert routing_kl(original) < 0.5 * drift


# ---------------------------------------------------------------------------- transplant


def test_flag_and_transplant_exact():
    skew = torch.tensor([0.10, -0.2, 0.30, 0.0, 0.05, -0.01])
    assert moe.flag_experts(skew, 1 / 3) == [2, 0]
    assert moe.flag_experts(torch.tensor([-0.1, 0.0, -0.2]), 0.5) == []
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    out = moe.transplant(w, [0, 2], alpha=0.25)
    expected = torch.tensor([[0.75 * 1 + 0.25 * 4.0, 0.75 * 2 + 0.25 * 6.5],
                             [3.0, 4.0],
                             [0.75 * 5 + 0.25 * 2.0, 0.75 * 9 + 0.25 * 3.0]])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt_oss", "per_module"])
def test_transplant_experts_on_model(family):
    model = moe_model("gpt_oss" if family == "gpt_oss" else "mixtral")
    if family == "per_module":
        for layer in model.model.layers:
            layer.mlp.experts = ExpertList(layer.mlp.experts)
    adapter = ArchitectureAdapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    skew = {0: torch.tensor([0.0, 0.4, -0.1, 0.2]), 1: torch.tensor([-0.1, -0.1, 0.1, 0.1])}
    flagged = moe.transplant_experts(adapter, skew, fraction=0.25, alpha=0.5)
    assert flagged == {0: [1], 1: [2]}
    for name, p in model.named_parameters():
        if ".experts." not in name:
            torch.testing.assert_close(p, before[name], atol=0, rtol=0)
    if family == "gpt_oss":
        for name in ("down_proj", "gate_up_proj", "down_proj_bias", "gate_up_proj_bias"):
            old = before[f"model.layers.0.mlp.experts.{name}"]
            new = getattr(adapter.experts(0), name)
            torch.testing.assert_close(new[1], 0.5 * old[1] + 0.5 * old[[0, 2, 3]].mean(0), atol=1e-6, rtol=0)
            torch.testing.assert_close(new[[0, 2, 3]], old[[0, 2, 3]], atol=0, rtol=0)
    else:
        old = [before[f"model.layers.1.mlp.experts.{e}.w2.weight"] for e in range(E)]
        new = adapter.experts(1)[2].w2.weight
        torch.testing.assert_close(new, 0.5 * old[2] + 0.5 * (old[0] + old[1] + old[3]) / 3, atol=1e-6, rtol=0)
