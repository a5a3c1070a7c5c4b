"""Issue 24, items 1–7: the edit that is scored, hooked and saved is the edit that is applied.

Each item has a regression test; the property test at the end runs every EXCISE variant × option
combination the settings accept on tiny llama, gpt2 (Conv1D, biases, tied head), gemma (tied head)
and Qwen2-MoE (routed + shared experts) models: the weight edit and its hook form give the same
logits, an edit without a hook form does what it claims, and every other combination is rejected
at validation."""

from __future__ import annotations

import copy
import itertools
import random
import time
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from conftest import _DECODER, reinit, tiny_model, tiny_tokenizer, random_unit
from support.moe import moe_model
from obliteratus.batching import encode_prompts
from obliteratus.settings import ExciseSettings, Settings, resolve_settings
from obliteratus.data.prompts import format_prompts
from obliteratus.directions import Directions, orthonormalize
from obliteratus.directions.project_harmless import orthogonalize_against
from obliteratus.errors import ActivationError, ConfigError
from obliteratus.shared_prefix import last_logits
from obliteratus.shared_prefix import can_share_prefix
from obliteratus.excise.apply import excise
from obliteratus.excise.dispatch import apply_edit, build_plan
from obliteratus.excise.hook_form import ablated
from obliteratus.excise.kernels import KernelOptions
from obliteratus.excise.plan import EditPlan
from obliteratus.models import ArchitectureAdapter
from obliteratus.pipeline import steering_spec
from obliteratus.steering import attach_steering

D = 32
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def directions(q: torch.Tensor, **extra) -> Directions:
    return Directions(q, "diff_means", 1, -1, q[0], **extra)


def gemma():
    """Tiny Gemma (tied head) with a random final-norm gain, so the lm_head input keeps a component
    along q after the writers are projected (as in a real checkpoint)."""
    model = tiny_model("gemma")
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(D, generator=torch.Generator().manual_seed(1)))
    return model


def hook_logits(model, q: torch.Tensor, ex: ExciseSettings) -> torch.Tensor:
    """Logits with the pipeline's saved hook form (mode = 'hooks') attached to a copy of `model`."""
    copy_ = copy.deepcopy(model)
    adapter = ArchitectureAdapter(copy_)
    spec = steering_spec(SimpleNamespace(adapter=adapter), directions(q), Settings(excise=ex.model_dump()))
    handle = attach_steering(adapter, spec)
    try:
        return logits(copy_)
    finally:
        handle.remove()


def weight_logits(model, q: torch.Tensor, ex: ExciseSettings) -> torch.Tensor:
    copy_ = copy.deepcopy(model)
    apply_edit(ArchitectureAdapter(copy_), directions(q), ex.model_copy(update={"mode": "weights"}))
    return logits(copy_)


# ---------------------------------------------------------------------------- item 1: experts


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("toggles", [dict(experts=False), dict(mlp=False, experts=True)])
def test_hook_mode_edits_the_experts_the_weight_edit_edits(family, toggles):
    model, q = moe_model(family), random_unit(D, seed=3)
    ex = ExciseSettings(mode="hooks", **toggles)
    assert rel_gap(weight_logits(model, q, ex), hook_logits(model, q, ex)) < 1e-4


@pytest.mark.parametrize("method", ["arditi", "cosmic", "grid"])
def test_layer_scoring_ablates_the_writers_the_edit_edits(monkeypatch, method):
    """select_arditi / select_cosmic / the kernel grid score with the same `experts` as the edit."""
    from obliteratus.settings import LayerSettings, OptimizeSettings
    from obliteratus.select import cosmic, layers
    from obliteratus.optimize import grid

    module = {"arditi": layers, "cosmic": cosmic, "grid": grid}[method]
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("experts"))
        return ablated(*args, **kwargs)

    monkeypatch.setattr(module, "ablated", spy)
    model, tok = moe_model("qwen2_moe"), tiny_tokenizer()
    adapter = ArchitectureAdapter(model)
    enc = encode_prompts(tok, ["Hi there", "How do I bake bread?", "Name a colour."], False)
    means = torch.randn(1, adapter.n_layers + 1, D, generator=torch.Generator().manual_seed(0))
    ls = LayerSettings(kl_threshold=None, induce_threshold=None, prune_fraction=0.0)
    ex = ExciseSettings(experts=False)
    if method == "arditi":
        layers.select_arditi(model, adapter, means, enc, enc, tok, ls, ex, 4)
    elif method == "cosmic":
        cosmic.select_cosmic(model, adapter, means, enc, enc, ls, ex, batch_size=4)
    else:
        options = OptimizeSettings(max_weight=[1.0], position=[0.5], distance=[0.5], min_ratio=[0.0])
        grid.search(adapter, random_unit(D), 1.0, enc, enc, [1, 2], options, batch_size=4, experts=ex.experts)
    assert seen and set(seen) == {False}


def test_trial_hooks_equal_the_bake_with_experts_off():
    from obliteratus.optimize.trial import trial_hooks

    model, q = moe_model("qwen2_moe"), random_unit(D, seed=3)
    ex = ExciseSettings(experts=False)
    baked = copy.deepcopy(model)
    excise(ArchitectureAdapter(baked), q, ex, EditPlan())
    with trial_hooks(ArchitectureAdapter(model), q, EditPlan(), ex):
        hooked = logits(model)
    assert rel_gap(logits(baked), hooked) < 1e-4


# ---------------------------------------------------------------------------- item 2: tied lm_head


@pytest.mark.parametrize("build", [gemma, lambda: tiny_model("gpt2")], ids=["gemma", "gpt2"])
def test_hook_mode_covers_the_tied_lm_head(build):
    model, q = build(), random_unit(D, seed=3)
    assert ArchitectureAdapter(model).tied_lm_head
    ex = ExciseSettings(mode="hooks")
    assert rel_gap(weight_logits(model, q, ex), hook_logits(model, q, ex)) < 1e-4


def test_hook_mode_lm_head_option_on_an_untied_head():
    model, q = tiny_model("llama"), random_unit(D, seed=3)
    ex = ExciseSettings(mode="hooks", lm_head=True)
    assert rel_gap(weight_logits(model, q, ex), hook_logits(model, q, ex)) < 1e-4


# ---------------------------------------------------------------------------- item 3: leace


@pytest.mark.parametrize("directions_", [{"scope": "per_layer"}, {"project_harmless": True},
                                         {"project_harmless": True, "biproject": True}, {"index": 1.5}])
def test_leace_edit_rejects_direction_steps_it_would_overwrite(directions_):
    with pytest.raises(ConfigError, match="leace"):
        resolve_settings(None, {"excise": {"method": "leace"}, "directions": directions_})


# ---------------------------------------------------------------------------- item 4: sliding window


def test_shared_prefix_verdict_follows_the_sliding_window():
    config = tf.MistralConfig(num_key_value_heads=2, head_dim=8, sliding_window=48, **_DECODER)
    model = reinit(tf.AutoModelForCausalLM.from_config(config).float()).eval().requires_grad_(False)
    tok = tiny_tokenizer()

    def enc(prompts):
        return encode_prompts(tok, format_prompts(tok, prompts, True, system_prompt="Sys."), True)

    short, long = enc(["a", "bc", "d"]), enc(["a", "How do I bake a loaf of bread at home?", "Tell me about it."])
    assert max(map(len, short.ids)) <= 48 < max(map(len, long.ids))
    assert can_share_prefix(model, short, new_tokens=0)  # fits the window: the same activations
    assert not can_share_prefix(model, long, new_tokens=0)  # a later, longer set: not from the cache
    assert not can_share_prefix(model, short)  # unknown appended tokens (generation): not with a window
    gap = (last_logits(model, long, 3, share_prefix=True) - last_logits(model, long, 3)).abs().max()
    assert gap > 0.1  # what sharing would have cost


# ---------------------------------------------------------------------------- item 5: householder target


def test_householder_harmless_mean_target_is_rejected_with_a_reason():
    with pytest.raises(ConfigError, match="removed"):
        resolve_settings(None, {"excise": {"method": "householder", "householder": {"target": "harmless_mean"}}})
    resolve_settings(None, {"excise": {"method": "householder", "householder": {"target": "negate"}}})


# ---------------------------------------------------------------------------- item 6: all-zero strengths


def test_all_zero_strength_table_edits_nothing():
    model, q = tiny_model("llama"), random_unit(D, seed=3)
    zero = KernelOptions(max_weight=0.0, max_weight_position=1.0, min_weight=0.0, min_weight_distance=1.0)
    ex = ExciseSettings(kernel_attn=zero, kernel_mlp=zero, embeddings=False)
    plan = build_plan(ArchitectureAdapter(model), directions(q), ex)
    assert plan is not None and plan.strength == {}
    edited = copy.deepcopy(model)
    report = apply_edit(ArchitectureAdapter(edited), directions(q), ex)
    assert report.edited == [] and torch.equal(logits(edited), logits(model))


# ---------------------------------------------------------------------------- item 7: rank-checked QR


def test_orthonormalize_drops_near_dependent_rows():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(D, generator=gen, dtype=torch.float64)
    rows = torch.stack([a, a + 1e-9 * torch.randn(D, generator=gen, dtype=torch.float64),
                        torch.randn(D, generator=gen, dtype=torch.float64)])
    q = orthonormalize(rows)
    assert q.shape == (2, D)
    torch.testing.assert_close(q @ q.T, torch.eye(2, dtype=q.dtype))
    assert float(q[0] @ a / a.norm()) > 1 - 1e-12  # row 0 keeps its direction and sign
    with pytest.raises(ActivationError, match="independent"):
        orthonormalize(torch.zeros(1, D))
    with pytest.raises(ActivationError):
        orthonormalize(rows, min_rows=3)


def test_project_harmless_never_returns_rounding_noise_as_a_direction():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=gen)
    r = (mu / mu.norm() + 1e-7 * torch.randn(D, generator=gen))[None]  # r ∥ harmless mean
    with pytest.raises(ActivationError, match="harmless mean"):
        orthogonalize_against(r, mu)
    assert orthogonalize_against(r, mu, min_rows=0).shape == (0, D)
    good = random_unit(D, seed=5)
    out = orthogonalize_against(good, mu)
    assert out.shape == (1, D) and float(out @ good[0]) > 0.5 and abs(float(out @ mu)) < 1e-5


# ---------------------------------------------------------------------------- property test


FAMILIES = {"llama": lambda: tiny_model("llama"), "gpt2": lambda: tiny_model("gpt2"), "gemma": gemma,
            "qwen2_moe": lambda: moe_model("qwen2_moe")}
KERNEL = {"max_weight": 0.8, "max_weight_position": 1.0, "min_weight": 0.4, "min_weight_distance": 1.5}
AXES = {  # every EXCISE option (and the direction scope, which EXCISE consumes)
    "method": ["project", "householder", "heads", "leace"],
    "mode": ["weights", "hooks"],
    "lam": [1.0, 2.0],
    "norm_preserve": [False, True],
    "biases": [True, False],
    "embeddings": [True, False],
    "writers": [(True, True), (True, False), (False, True)],  # (attention, mlp)
    "experts": [True, False],
    "lm_head": [False, True],
    "strength": ["none", "kernels", "through_source", "spectral"],
    "neurons": [False, True],
    "scope": ["global", "per_layer"],
}


def overrides(c: dict) -> dict:
    attention, mlp = c["writers"]
    ex = {k: c[k] for k in ("method", "mode", "lam", "norm_preserve", "biases", "embeddings", "experts", "lm_head")}
    ex.update(attention=attention, mlp=mlp)
    if c["strength"] == "kernels":
        ex.update(kernel_attn=KERNEL, kernel_mlp=KERNEL)
    elif c["strength"] != "none":
        ex["layer_weights"] = c["strength"]
    if c["neurons"]:
        ex["neurons"] = {"count": 2}
    return {"excise": ex, "directions": {"scope": c["scope"]}}


def accepted_combinations() -> tuple[list[dict], int]:
    keys, out, rejected = list(AXES), [], 0
    for values in itertools.product(*AXES.values()):
        c = dict(zip(keys, values))
        try:
            c["settings"] = resolve_settings(None, overrides(c))
        except ConfigError:
            rejected += 1
            continue
        out.append(c)
    return out, rejected


def make_directions(c: dict, n_layers: int) -> Directions:
    q = random_unit(D, seed=3)
    extra = {}
    if c["scope"] == "per_layer":
        extra["layer_bases"] = {i: random_unit(D, seed=10 + i) for i in range(n_layers)}
    if c["method"] == "leace":  # an oblique read side: R·Uᵀ = 1
        w = random_unit(D, seed=7)
        extra["read"] = q + 0.5 * (w - (w @ q.T) * q)
    if c["strength"] == "through_source":
        extra["layer_weights"] = {i: float(i <= 1) for i in range(n_layers)}
    elif c["strength"] == "spectral":
        extra["layer_weights"] = {i: [0.3, 1.0, 0.6][i] for i in range(n_layers)}
    return directions(q, **extra)


def selected_params(adapter: ArchitectureAdapter, ex: ExciseSettings) -> set[int]:
    """ids of every parameter the settings allow to change."""
    ids = set()
    for w in adapter.writers(attention=ex.attention, mlp=ex.mlp, embeddings=ex.embeddings, experts=ex.experts):
        ids.add(id(w.weight))
        if ex.biases and w.bias is not None:
            ids.add(id(w.bias))
    if ex.lm_head:
        ids.add(id(adapter.lm_head.weight))
    if ex.neurons is not None:  # masking zeroes MLP down-projection columns whatever `mlp` says
        ids |= {id(w.weight) for w in adapter.writers(attention=False, embeddings=False)}
    return ids


def check(model, c: dict) -> str:
    """Run one accepted combination; return how it was checked."""
    ex, adapter0 = c["settings"].excise, ArchitectureAdapter(model)
    d = make_directions(c, adapter0.n_layers)
    edited = copy.deepcopy(model)
    adapter = ArchitectureAdapter(edited)
    if ex.mode == "hooks":
        try:
            hooked = hook_logits(model, d.basis, ex)
        except ConfigError as err:  # depends on the model: a hook that cannot keep a writer's bias
            assert "biases" in str(err)
            return "rejected by the model"
        apply_edit(adapter, d, ex.model_copy(update={"mode": "weights"}))
        gap = rel_gap(logits(edited), hooked)
        assert gap < 1e-4, gap
        return "hooks = weights"
    before = {id(p): p.detach().clone() for p in edited.parameters()}
    report = apply_edit(adapter, d, ex)
    changed = {id(p) for p in edited.parameters() if not torch.equal(p.detach(), before[id(p)])}
    if ex.method == "heads":  # no hook form: only the top heads' o_proj slices change (its description)
        attn = {id(w.weight) for w in adapter.writers(mlp=False, embeddings=False)}
        assert changed <= attn and sum(map(len, report.details["heads"].values())) == ex.heads.n_heads
        return "claims (heads)"
    assert changed <= selected_params(adapter, ex), "an edit changed a parameter its settings leave alone"
    if ex.norm_preserve or ex.neurons is not None:  # no hook form (not linear in the output)
        for w in adapter.writers(attention=ex.attention, mlp=ex.mlp, embeddings=ex.embeddings, experts=ex.experts):
            if id(w.weight) not in changed:
                continue
            new, old = w.weight.detach().double(), before[id(w.weight)].double()
            axis = -2 if w.layout == "out_in" else -1
            if ex.norm_preserve and ex.neurons is None:  # every residual-side vector keeps its norm
                torch.testing.assert_close(new.norm(dim=axis), old.norm(dim=axis), atol=1e-4, rtol=1e-4)
            if ex.lam == 1.0 and d.read is None and d.layer_bases is None and ex.method == "project" \
                    and c["strength"] in ("none", "through_source"):
                along = (d.basis.double() @ new) if w.layout == "out_in" else (new @ d.basis.double().T)
                assert float(along.abs().max()) < 1e-4 * float(old.abs().max())  # the direction is gone
        return "claims (norms / masking)"
    plan = build_plan(adapter0, d, ex)
    lam, q = ex.lam, d.basis
    if ex.method == "householder":
        plan = EditPlan(strength=None if plan is None else plan.strength, lam=2.0,
                        lm_head_input=plan is not None and plan.lm_head_input)
    hooked_model = copy.deepcopy(model)
    with ablated(ArchitectureAdapter(hooked_model), q, lam, attention=ex.attention, mlp=ex.mlp, experts=ex.experts,
                 embeddings=ex.embeddings, biases=ex.biases, plan=plan):
        hooked = logits(hooked_model)
    gap = rel_gap(logits(edited), hooked)
    assert gap < 1e-4, gap
    return "weights = hooks"


def covering(pool: list[dict], t: int = 3) -> list[dict]:
    """Every hook-mode combination, plus (greedily, in a seeded order) combinations until every
    t-tuple of (axis, value) pairs that some accepted combination has is run at least once."""
    pool = list(pool)
    random.Random(0).shuffle(pool)
    seen, out = set(), []
    for c in pool:
        tuples = {tuple((k, c[k]) for k in keys) for keys in itertools.combinations(AXES, t)} - seen
        if tuples or c["mode"] == "hooks":
            out.append(c)
            seen |= tuples
    return out


@pytest.fixture(scope="module")
def combinations():
    return accepted_combinations()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_accepted_excise_combination_means_what_it_says(family, combinations):
    """All settings combinations are validated; the accepted ones are run on the model: every
    hook-mode one, and a 3-wise covering of the rest (each triple of option values that validation
    accepts appears in at least one run)."""
    accepted, rejected = combinations
    assert rejected > 0 and accepted
    model = FAMILIES[family]()
    moe = ArchitectureAdapter(model).is_moe
    # experts only selects routed experts: on a dense model experts = false is the experts = true edit
    pool = covering([c for c in accepted if moe or c["experts"]])
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for c in pool:
        try:
            how = check(model, c)
        except AssertionError as err:
            raise AssertionError(f"{family} {overrides(c)}: {err}") from None
        outcomes[how] = outcomes.get(how, 0) + 1
    print(f"\n{family}: {sum(outcomes.values())} run ({outcomes}), {rejected} of "
          f"{rejected + len(accepted)} rejected at validation, {time.perf_counter() - start:.1f} s")
    assert outcomes.get("hooks = weights") and outcomes.get("weights = hooks")


def test_hook_mode_combinations_that_cannot_be_exact_are_rejected_at_validation():
    for extra in ({"kernel_attn": KERNEL}, {"layer_weights": "spectral"}, {"moe": {"transplant": True}}):
        with pytest.raises(ConfigError, match="hooks"):
            resolve_settings(None, {"excise": {"mode": "hooks", **extra}})
    with pytest.raises(ConfigError, match="hooks"):
        resolve_settings(None, {"excise": {"mode": "hooks"}, "directions": {"scope": "per_layer"}})
    with pytest.raises(ConfigError, match="householder"):
        resolve_settings(None, {"excise": {"method": "householder", "lam": 2.0}})
    with pytest.raises(ConfigError, match="heads"):
        resolve_settings(None, {"excise": {"method": "heads", "lm_head": True}})
