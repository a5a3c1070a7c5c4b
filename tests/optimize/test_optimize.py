"""The multi-objective study: parameters -> EditPlan math, trials leave the model bit-identical,
hook scoring equals the baked edit, early-stopping refusal counting, the pruner, the Pareto front
and the pick."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import params_digest, tiny_model
from obliteratus.settings import resolve_settings
from obliteratus.presets import load_preset
from obliteratus.select.interpolate import direction_at
from obliteratus.evaluate import early
from obliteratus.evaluate.judges import markers as refusal
from obliteratus.evaluate.generate import decode, generate
from obliteratus.excise import ablated, excise
from obliteratus.excise.kernels import search_space
from obliteratus.models import ArchitectureAdapter
from obliteratus.optimize.options import StudyOptions
from obliteratus.optimize.study import pareto_front, pick
from obliteratus.optimize.trial import kl_cut, pareto_bar, plan_from_params, prune_bar, ruled_out, suggest
from support.optimize import L, D, PROMPTS, encoded, make_objective, mean_diffs, params


# --- parameters -> plan ------------------------------------------------------------------------------

def test_global_plan_math():
    md = mean_diffs()
    q, plan = plan_from_params(params(), md, L)
    # Heretic's index 0.5 is our resid_pre axis 1.5: the normalised lerp of rows 1 and 2
    r1, r2 = md[1].double() / md[1].norm(), md[2].double() / md[2].norm()
    r = (r1 + 0.5 * (r2 - r1))
    torch.testing.assert_close(q[0].double(), r / r.norm(), atol=1e-6, rtol=0)
    assert plan.layer_bases is None and plan.norm_preserve is False
    # attn: peak 1.2 at layer 1, min 0.6 at distance 1 -> layers 0, 2 get 0.6; mlp: peak 0.8 at 2, min 0.2
    # at distance 2 -> layer 1: 0.8 + (1/2)(0.2 - 0.8) = 0.5, layer 0: 0.2
    assert plan.strength == pytest.approx({("attn", 0): 0.6, ("attn", 1): 1.2, ("attn", 2): 0.6,
                                           ("mlp", 0): 0.2, ("mlp", 1): 0.5, ("mlp", 2): 0.8})


def test_per_layer_plan_and_clamped_mlp():
    md = mean_diffs(1)
    q, plan = plan_from_params(params("per_layer", **{"mlp.max_weight": -0.1}), md, L)
    assert q is None
    for i in range(L):  # layer i: the unit mean difference at its output (resid_pre i + 1)
        torch.testing.assert_close(plan.layer_bases[i][0], md[i + 1] / md[i + 1].norm(), atol=1e-6, rtol=0)
    assert not any(kind == "mlp" for kind, _ in plan.strength)  # peak clamped to 0: MLP not edited


def test_extra_directions_are_orthonormal_and_keep_r():
    md, basis = mean_diffs(), torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    q, _ = plan_from_params(params(n_directions=3), md, L, basis)
    torch.testing.assert_close(q @ q.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(q[0], direction_at(md, 1.5), atol=1e-6, rtol=0)


def test_default_ranges_are_heretics():
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    suggest(trial, 24, StudyOptions())
    dist, last = trial.distributions, 23
    assert dist["direction_scope"] == CategoricalDistribution(["global", "per_layer"])
    assert (dist["direction_index"].low, dist["direction_index"].high) == pytest.approx((0.4 * last, 0.9 * last))
    for c in ("attn", "mlp"):
        space = search_space(24, c)
        for name, key in (("max_weight", "max_weight"), ("max_weight_position", "max_weight_position"),
                          ("min_weight", "min_weight_fraction"), ("min_weight_distance", "min_weight_distance")):
            d = dist[f"{c}.{name}"]
            assert (d.low, d.high) == pytest.approx(space[key]), (c, name)


def test_a_seed_window_is_the_source_window_edit():
    """window_params(f) is the advanced edit without the embeddings: the global direction at resid_pre
    f·L + 1, every attention and MLP writer of layers 0 .. f·L + 1 at weight 1, nothing after."""
    from obliteratus.errors import ConfigError
    from obliteratus.excise.window import window_weights
    from obliteratus.optimize.base import study_options
    from obliteratus.optimize.trial import window_params

    n = 24
    md = torch.randn(n + 1, 8, generator=torch.Generator().manual_seed(1))
    options = study_options(resolve_settings(load_preset("optimized")))
    assert options.seed_windows  # the preset seeds its study
    for f in options.seed_windows:  # every seed of the preset lies inside its space on the demo shape
        window_params(f, n, options)
    q, plan = plan_from_params(window_params(16 / 23, n, options), md, n)
    expected = window_weights(n, 17)
    assert plan.strength == {(c, i): 1.0 for c in ("attn", "mlp") for i in range(n) if expected[i] == 1.0}
    assert max(i for _, i in plan.strength) == 17
    torch.testing.assert_close(q[0], direction_at(md, 17.0))
    with pytest.raises(ConfigError, match="max_weight_position"):  # Heretic's ranges keep early layers out
        window_params(0.7, n, StudyOptions())


def test_seed_windows_run_first_in_a_new_study_only():
    from obliteratus.optimize.study import seed
    from obliteratus.optimize.trial import window_params

    options = StudyOptions(direction_index=(0.0, 1.0), max_weight_position=(0.0, 1.0), min_weight_distance=(1.0, 1.0),
                           n_startup_trials=1,
                           refusal_tokens=2, prune=False)
    points = [window_params(f, L, options) for f in (0.5, 1.0)]
    objective = make_objective(tiny_model("llama"), options)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=1, multivariate=True))
    seed(study, points)
    study.optimize(objective, n_trials=3)
    assert [t.params for t in study.trials[:2]] == points and study.trials[2].params not in points
    seed(study, points)  # a study with trials (resumed) is not seeded again
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)


# --- trials copy no weights; hook scoring equals the bake ---------------------------------------------

def test_trials_leave_the_model_bit_identical():
    model = tiny_model("llama")
    before = params_digest(model)
    objective = make_objective(model, StudyOptions(n_startup_trials=2, refusal_tokens=4, prune=False))
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True))
    study.enqueue_trial({"direction_scope": "global"})
    study.enqueue_trial({"direction_scope": "per_layer"})
    study.optimize(objective, n_trials=5)
    assert params_digest(model) == before
    kls = [t.values[1] for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in study.trials) and max(kls) > 1e-4  # the hooks did act
    assert {t.params["direction_scope"] for t in study.trials} == {"global", "per_layer"}


@pytest.mark.parametrize("scope,strength", [("global", 1.0), ("per_layer", 1.0), ("global", 1.5), ("per_layer", 1.5)])
def test_scored_kl_equals_kl_of_the_baked_model(scope, strength):
    """The hooks a trial (or a confirmation at a strength multiplier) is scored with equal the bake."""
    from obliteratus.optimize.trial import scaled_plan, trial_hooks

    model = tiny_model("llama")
    objective = make_objective(model, StudyOptions(refusal_tokens=2, prune=False))
    q, plan = scaled_plan(params(scope), objective.mean_diffs, L, objective.excise.lam, strength)
    assert plan.lam == (None if strength == 1.0 else strength)
    with trial_hooks(objective.adapter, q, plan, objective.excise):
        hooked = objective.scorer.kl()
    baked = copy.deepcopy(model)
    report = excise(ArchitectureAdapter(baked), q, objective.excise, plan)
    assert hooked > 1e-3 and report.lam == strength
    assert objective.scorer.__class__(baked, *[getattr(objective.scorer, f) for f in
                                               ("tokenizer", "harmful", "harmless", "base", "tokens", "batch_size",
                                                "chunks")]).kl() == pytest.approx(hooked, rel=1e-3)
    if strength != 1.0:  # the multiplier acts: a stronger edit moves the model further
        q1, plan1 = plan_from_params(params(scope), objective.mean_diffs, L)
        with trial_hooks(objective.adapter, q1, plan1, objective.excise):
            assert objective.scorer.kl() < hooked


# --- early-stopping refusal judge ----------------------------------------------------------------------

def test_early_judge_matches_full_generation_and_stops_early(monkeypatch):
    model = tiny_model("llama")
    tok, enc = encoded()
    budget = 12
    full = decode(tok, generate(model, tok, enc, budget, 8))
    # a "marker": two ASCII letters found in some responses but not all (the random model writes junk)
    norms = [refusal.normalise(t) for t in full]
    pairs = {n[i:i + 2] for n in norms for i in range(len(n) - 1) if n[i:i + 2].isascii() and n[i:i + 2].isalpha()}
    marker = min(p for p in pairs if 0 < sum(p in n for n in norms) < len(norms))
    monkeypatch.setattr(refusal, "MARKERS", (marker,))
    verdicts = early.judge(model, tok, enc, budget, 8)
    assert verdicts.refused == [refusal.is_refusal(t) for t in full]
    assert any(verdicts.refused) and not all(verdicts.refused)
    assert min(u for u, r in zip(verdicts.tokens, verdicts.refused) if r) < budget  # stopped at its marker
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # everything refuses at once: one token per sequence
    assert early.judge(model, tok, enc, budget, 8).tokens == [1] * len(PROMPTS)


# --- the pruner ------------------------------------------------------------------------------------------

def test_prune_rule():
    assert prune_bar([], 0.05) is None
    assert prune_bar([0.5, 0.3], 0.05) == 0.3  # nothing admissible yet: must beat the best refusal
    assert prune_bar([0.5, 0.02], 0.05) == 0.05  # admissible exists: must reach the target
    assert ruled_out(2, 8, 0.2) and not ruled_out(1, 8, 0.2) and not ruled_out(8, 8, None)


def finished(values):
    dist = {"x": FloatDistribution(0.0, 1.0)}
    return create_trial(values=list(values), params={"x": 0.5}, distributions=dist)


def test_pruner_abandons_a_ruled_out_trial(monkeypatch):
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    model = tiny_model("llama")
    objective = make_objective(model, StudyOptions(refusal_tokens=4, prune=True, prune_chunks=4))
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(finished((0.0, 1.0)))  # an admissible trial exists: the bar is target = 0.05
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["refusals_lower_bound"] == [0.25]  # 2 of 8 after the first chunk > 0.05: stop
    assert t.user_attrs["prune_bar"] == 0.05
    fresh = optuna.create_study(directions=["minimize", "minimize"])  # no finished trial: never pruned
    fresh.optimize(objective, n_trials=1)
    assert fresh.trials[0].state == TrialState.COMPLETE and fresh.trials[0].values[0] == 1.0
    assert fresh.trials[0].user_attrs["refusals_lower_bound"] == [0.25, 0.5, 0.75, 1.0]


def test_pruner_stops_inside_a_batch(monkeypatch):
    """One chunk (batches of 4, the scorer's batch size): every row shows its marker at the first
    token, so the trial is pruned after one generated token per row of the first batch, not after
    the 4-token budget or the whole batch."""
    monkeypatch.setattr(refusal, "MARKERS", ("",))
    objective = make_objective(tiny_model("llama"), StudyOptions(refusal_tokens=4, prune=True))
    assert objective.options.prune_chunks == 1
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(finished((0.0, 1.0)))
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["refusals_lower_bound"] == [0.5] and t.user_attrs["tokens_generated"] == 4


# --- Pareto front and pick ---------------------------------------------------------------------------------

def test_pareto_front_and_pick():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for v in [(0.5, 0.01), (0.0, 0.9), (0.04, 0.3), (0.04, 0.2), (0.1, 0.05), (0.2, 0.5)]:
        study.add_trial(finished(v))
    front = pareto_front(study)
    assert [(r.number, r.refusal, r.kl) for r in front] == [(1, 0.0, 0.9), (3, 0.04, 0.2), (4, 0.1, 0.05),
                                                             (0, 0.5, 0.01)]
    assert {r.number for r in front} == {t.number for t in study.best_trials}
    assert pick(study).number == 3  # lowest KL with refusal <= 0.05
    assert pick(study, target_refusal=0.1).number == 4
    assert pick(study, target_refusal=-1).number == 1  # nothing admissible: lowest refusal
    assert pick(study, index=5).number == 5
    with pytest.raises(Exception, match="no completed trial"):
        pick(study, index=42)


def test_orthogonalized_directions_are_unit_and_orthogonal_to_the_harmless_mean():
    from obliteratus.optimize.base import orthogonal_to

    g = torch.randn(L + 1, D, generator=torch.Generator().manual_seed(1))
    r = mean_diffs() + 3 * g  # a large component along the harmless mean
    out = orthogonal_to(r, g)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(L + 1), atol=1e-6, rtol=0)
    assert (out * torch.nn.functional.normalize(g, dim=-1)).sum(-1).abs().max() < 1e-6
    # what is left is r's own component orthogonal to g, up to scale
    rg = r - (r * g).sum(-1, keepdim=True) / (g * g).sum(-1, keepdim=True) * g
    torch.testing.assert_close(out, torch.nn.functional.normalize(rg, dim=-1), atol=1e-6, rtol=0)
    assert StudyOptions().orthogonalize is False
    assert resolve_settings(load_preset("heretic")).optimize.study.orthogonalize is True


def test_pareto_prune_rule():
    n = 8
    finished = [(0.25, 0.1), (0.5, 0.02)]
    assert pareto_bar([], 0.3, 0.05, n) is None
    # KL 0.3: (0.25, 0.1) has no more KL, so 2 of 8 refusals (0.25) already make the trial dominated
    bar = pareto_bar(finished, 0.3, 0.05, n)
    assert ruled_out(2, n, bar) and not ruled_out(1, n, bar)
    # KL 0.05: only (0.5, 0.02) has no more KL: pruned at 4 refusals, not at 3
    bar = pareto_bar(finished, 0.05, 0.05, n)
    assert ruled_out(4, n, bar) and not ruled_out(3, n, bar)
    assert pareto_bar(finished, 0.01, 0.05, n) is None  # lowest KL so far: it can always join the front
    # once a trial reached the target, anything above it is pruned whatever its KL
    assert ruled_out(1, n, pareto_bar([(0.0, 0.9)], 0.01, 0.05, n))


def test_pareto_rule_measures_kl_first_and_prunes_a_dominated_trial(monkeypatch):
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    objective = make_objective(tiny_model("llama"), StudyOptions(refusal_tokens=4, prune=True, prune_rule="pareto"))
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(finished((0.5, 1e9)))  # more KL than any trial: dominates nothing
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.COMPLETE and t.values[0] == 1.0 and "kl" in t.user_attrs
    study.add_trial(finished((0.5, 0.0)))  # no KL and half the refusals: every later trial is dominated
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED and "kl" in t.user_attrs and t.user_attrs["tokens_generated"] == 4


def test_kl_rank_bar():
    finished = [(0.0, 0.3), (0.5, 0.01), (0.04, 0.2), (0.0, 0.1)]
    assert kl_cut(finished, 0.05, 0) is None  # off
    assert kl_cut(finished, 0.05, 1) == 0.1  # the lowest KL at the target; (0.5, 0.01) misses the target
    assert kl_cut(finished, 0.05, 3) == 0.3
    assert kl_cut(finished, 0.05, 4) is None  # only three trials reached the target
    assert kl_cut(finished, 0.0, 2) == 0.3


def test_kl_rank_prunes_before_generating_once_enough_trials_reached_the_target(monkeypatch):
    """kl_rank = 2: a trial whose KL is above the 2nd-lowest KL of the trials at the target is pruned
    after its KL pass, with no token generated; with fewer such trials, or a higher cut, it runs."""
    monkeypatch.setattr(refusal, "MARKERS", ("\x00never",))  # nothing refuses: the refusal bar never prunes
    objective = make_objective(tiny_model("llama"), StudyOptions(refusal_tokens=4, prune=True, kl_rank=2,
                                                                 constrain=True))
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(finished((0.0, 0.0)))
    study.add_trial(finished((0.5, 0.0)))  # misses the target: does not count
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.COMPLETE and t.values[0] == 0.0 and "kl_cut" not in t.user_attrs
    assert t.user_attrs["tokens_generated"] == 4 * 8  # every prompt ran the whole budget
    kl = t.values[1]
    assert kl > 1e-4  # the hooks act, so a cut at 0 is below it
    study.add_trial(finished((0.0, 0.0)))  # two trials at the target with KL 0: the cut is 0
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED and t.user_attrs["kl_cut"] == 0.0
    assert t.user_attrs["kl"] > 0.0 and t.user_attrs["tokens_generated"] == 0
    assert t.user_attrs["refusals_lower_bound"] == [0.0] and t.user_attrs["refusal_excess"] == pytest.approx(-0.05)
    above = optuna.create_study(directions=["minimize", "minimize"])  # a cut above any trial's KL: it runs
    for _ in range(2):
        above.add_trial(finished((0.0, 1e9)))
    above.optimize(objective, n_trials=1)
    assert above.trials[-1].state == TrialState.COMPLETE


def test_kl_chunks_stop_at_a_lower_bound_that_gives_the_full_pass_verdict():
    """kl_chunks: with a cut, the heaviest prompts of the last pass are scored first and scoring stops
    once their KL sum over n exceeds the cut; the value is then a lower bound (their sum / n), and
    it is above the cut exactly when the full mean is."""
    from obliteratus.evaluate.kl import kl_rows
    from obliteratus.optimize.trial import trial_hooks

    objective = make_objective(tiny_model("llama"), StudyOptions(refusal_tokens=2, prune=False, kl_chunks=4))
    scorer = objective.scorer
    q, plan = plan_from_params(params(), objective.mean_diffs, L)
    with trial_hooks(objective.adapter, q, plan, objective.excise):
        exact = scorer.kl()  # no cut: one pass over all 8 prompts, per-prompt KL remembered
        per = torch.tensor([scorer.kl_last[i] for i in range(len(PROMPTS))], dtype=torch.float64)
        assert exact == pytest.approx(float(per.mean())) and exact > 1e-4
        top2 = float(per.sort(descending=True).values[:2].sum()) / len(PROMPTS)
        value, complete = scorer.kl_bound(cut=top2 / 2)  # the two heaviest (chunk 1 of 4) already exceed it
        assert not complete and value == pytest.approx(top2, rel=1e-4)
        assert scorer.kl_bound(cut=1e9) == (pytest.approx(exact, rel=1e-4), True)
        for cut in (0.5 * exact, 0.99 * exact, 1.01 * exact, 2 * exact):
            value, complete = scorer.kl_bound(cut)
            assert (value > cut) == (exact > cut) and value <= exact * (1 + 1e-4)
            if exact <= cut:  # below the cut every chunk runs: the exact mean
                assert complete and value == pytest.approx(exact, rel=1e-4)
    now = torch.log_softmax(torch.zeros(1, scorer.base.shape[1], dtype=torch.float64), -1)
    assert float(kl_rows(scorer.base[:1], now)) >= 0.0  # the bound rests on KL >= 0 per prompt


def test_suspects_prune_a_refusing_trial_after_a_few_tokens_of_a_small_batch(monkeypatch):
    """suspect_prompts: once the bar can prune, the prompts that refused in earlier trials run first,
    for suspect_tokens tokens, and a trial they rule out is pruned before its KL and full count."""
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal from its first token
    options = StudyOptions(refusal_tokens=4, prune=True, suspect_prompts=2, suspect_tokens=3, kl_rank=1)
    objective = make_objective(tiny_model("llama"), options)
    scorer = objective.scorer
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.optimize(objective, n_trials=1)  # no bar yet: complete, and every prompt is now a suspect
    assert study.trials[0].values[0] == 1.0 and sorted(scorer.refused_by) == list(range(len(PROMPTS)))
    scorer.refused_by.update([5, 5, 7])  # prompt 5 refused most, then 7, then the rest
    assert scorer.suspects(0.05) == [5, 7] and scorer.suspects(None) == []
    assert scorer.suspects(0.3) == []  # 3 refusals of 8 needed, only 2 suspects tried: cannot prune
    study.add_trial(finished((0.0, 1.0)))  # the target is reached: bar 0.05, one refusal of 8 exceeds it
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED and "kl" not in t.user_attrs and "kl_cut" not in t.user_attrs
    assert t.user_attrs["tokens_generated"] == 2  # both suspects marked at their first token, nothing else ran
    assert t.user_attrs["refusals_lower_bound"] == [0.25]  # the full count's first batch would show 4 of 8
    assert t.user_attrs["suspect_refusals"] == 2
    assert scorer.refused_by[5] == 4 and scorer.refused_by[0] == 1
    monkeypatch.setattr(refusal, "MARKERS", ("\x00never",))  # now nothing refuses: the suspects cannot prune
    runs = optuna.create_study(directions=["minimize", "minimize"])
    runs.add_trial(finished((0.0, 1e9)))  # bar 0.05, and a KL cut above any trial's KL
    runs.optimize(objective, n_trials=1)
    t = runs.trials[-1]
    assert t.state == TrialState.COMPLETE and t.values[0] == 0.0 and "kl" in t.user_attrs
    assert t.user_attrs["tokens_generated"] == 2 * 3 + 8 * 4  # the suspects' budget, then the full count
    assert t.user_attrs["suspect_refusals"] == 0
    cut = optuna.create_study(directions=["minimize", "minimize"])
    cut.add_trial(finished((0.0, 0.0)))  # bar 0.05 and a KL cut at 0: the suspects run, then the KL pass prunes
    cut.optimize(objective, n_trials=1)
    t = cut.trials[-1]
    assert t.state == TrialState.PRUNED and t.user_attrs["kl_cut"] == 0.0
    assert t.user_attrs["tokens_generated"] == 2 * 3 and t.user_attrs["refusals_lower_bound"] == [0.0]


def test_confirm_during_checks_new_best_candidates_and_ranks_the_kl_cut_by_confirmed_trials(monkeypatch):
    """confirm_during: a complete trial at the target is confirmed as it finishes unless a confirmed
    trial already has less KL; a failed check is a second constraint; kl_rank counts confirmed
    trials only, and the pick reuses the stored verdicts."""
    from obliteratus.optimize.study import pick_confirmed

    monkeypatch.setattr(refusal, "MARKERS", ("\x00never",))  # nothing refuses: every trial is at the target
    options = StudyOptions(refusal_tokens=4, prune=True, kl_rank=1, constrain=True, confirm_prompts=8,
                           confirm_during=True, confirm_target=0.1)
    objective = make_objective(tiny_model("llama"), options)
    rates = iter([0.5, 0.0])  # the first check fails, the second passes
    calls = []
    objective.confirm = lambda params, strength: calls.append(strength) or next(rates)
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(finished((0.0, 0.0)))  # at the target with KL 0 but never confirmed: no cut
    study.optimize(objective, n_trials=1)
    failed = study.trials[-1]
    assert failed.state == TrialState.COMPLETE and calls == [1.0]
    assert failed.user_attrs["confirmed"] is False and failed.user_attrs["confirm_refusal"] == 0.5
    assert failed.user_attrs["confirm_s"] >= 0.0  # its cost, which vs_heretic.py reports apart
    if hasattr(optuna.trial.Trial, "set_constraint"):
        assert failed.constraints == {"refusal": pytest.approx(-0.05), "confirm": pytest.approx(0.4)}
    assert failed.user_attrs["refusal_excess"] == pytest.approx(0.4)
    study.optimize(objective, n_trials=1)  # nothing confirmed yet: checked whatever its KL
    passed = study.trials[-1]
    assert passed.state == TrialState.COMPLETE and passed.user_attrs["confirmed"] is True and len(calls) == 2
    # now a confirmed trial exists: a trial with more KL is pruned on KL (cut = its KL), one with less runs
    cut_study = optuna.create_study(directions=["minimize", "minimize"])
    cut_study.add_trial(optuna.trial.create_trial(values=[0.0, 0.0], params={"x": 0.5},
                                                  distributions={"x": FloatDistribution(0.0, 1.0)},
                                                  user_attrs={"confirmed": True, "confirm_refusal": 0.0}))
    cut_study.optimize(objective, n_trials=1)
    t = cut_study.trials[-1]
    assert t.state == TrialState.PRUNED and t.user_attrs["kl_cut"] == 0.0 and len(calls) == 2
    assert "confirmed" not in t.user_attrs  # never checked: the pick cannot reach it
    # the pick's walk uses the stored verdicts at strength 1 without generating or counting them
    fresh = []
    walk = optuna.create_study(directions=["minimize", "minimize"])
    for t in (failed, passed):
        walk.add_trial(optuna.trial.create_trial(values=t.values, params=t.params, distributions=t.distributions,
                                                 user_attrs=t.user_attrs))
    walk.add_trial(finished((0.0, 1e-9)))  # the lowest KL, never checked: generated
    confirm = lambda trial, strength: fresh.append((trial.number, strength)) or 0.25  # noqa: E731
    chosen, _, checks = pick_confirmed(walk, confirm, 0.05, 1, 0.1, strengths=(1.0, 1.5))
    assert fresh == [(2, 1.0)]  # one fresh check (the cap); the stored ones are free, the cap stops 1.5
    by_kl = sorted((failed, passed), key=lambda t: t.values[1])
    expected = [(0.5, False), (0.0, True)] if by_kl[0] is failed else [(0.0, True)]  # the walk stops at a pass
    assert [(c["confirm_refusal"], c["passed"]) for c in checks if c.get("during_study")] == expected
    assert chosen.user_attrs["confirmed"] is True and checks[-1]["passed"] and checks[-1]["during_study"]
    with pytest.raises(ValueError, match="confirm_during needs confirm_prompts"):
        StudyOptions(confirm_during=True)


def test_constrained_study_gives_tpe_the_refusal_excess_of_complete_and_pruned_trials(monkeypatch):
    """constrain: every trial carries (refusal or its pruned lower bound) − target as an Optuna
    constraint, so TPE ranks the infeasible trials, pruned ones included, by how far they missed."""
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    objective = make_objective(tiny_model("llama"), StudyOptions(refusal_tokens=4, prune=True, constrain=True))
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.optimize(objective, n_trials=1)  # nothing finished: complete, refusal 1.0
    study.add_trial(finished((0.0, 1.0)))  # the target is reached: the next trial is pruned at 4/8
    study.optimize(objective, n_trials=1)
    complete, pruned = study.trials[0], study.trials[-1]
    assert complete.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
    for t, rate in ((complete, 1.0), (pruned, pruned.user_attrs["refusals_lower_bound"][-1])):
        assert t.user_attrs["refusal_excess"] == pytest.approx(rate - 0.05)
        if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna >= 5: the sampler reads trial.constraints
            assert t.constraints == {"refusal": pytest.approx(rate - 0.05)}
    assert pruned.user_attrs["refusals_lower_bound"][-1] == 0.5


def test_extra_directions_need_a_method_that_gives_them(tmp_path):
    """max_directions > 1 with diff_means (one direction) would search a parameter that does nothing."""
    from obliteratus.errors import ConfigError
    from obliteratus.pipeline import obliterate

    with pytest.raises(ConfigError, match="max_directions = 3 needs a direction method.*'diff_means' gives 1"):
        obliterate(str(tmp_path / "never-loaded"), "optimized", study={"max_directions": 3}, run_dir=str(tmp_path))


def test_constraint_reaches_the_sampler_without_trial_set_constraint(monkeypatch, tmp_path):
    """Optuna 4 has no Trial.set_constraint: open_study then gives TPE a constraints_func that reads
    the excess from the user attr, and the trial ends up with the same constraint."""
    from obliteratus.optimize.study import open_study

    for cls in (optuna.trial.Trial, optuna.trial.BaseTrial):  # Optuna 5 defines it on both
        monkeypatch.delattr(cls, "set_constraint", raising=False)
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    options = StudyOptions(refusal_tokens=4, prune=True, constrain=True)
    study = open_study(options, f"sqlite:///{tmp_path / 'study.db'}", "legacy", {"space": 1})
    study.optimize(make_objective(tiny_model("llama"), options), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and t.user_attrs["refusal_excess"] == pytest.approx(0.95)
    assert list(t.constraints.values() if isinstance(t.constraints, dict) else t.constraints) == [pytest.approx(0.95)]


# --- the pick, confirmed on spare prompts -------------------------------------------------------------

def test_pick_confirmed_walks_the_trials_within_the_target_in_kl_order():
    from obliteratus.optimize.study import pick_confirmed

    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in [(0.03, 0.10), (0.0, 0.12), (0.03, 0.11), (0.2, 0.01), (0.0, 0.30)]:
        study.add_trial(finished(values))  # numbers 0..4: KL order within the target 0, 2, 1, 4 (3 misses it)
    seen = []

    def confirm(rates):
        return lambda t, strength: seen.append(t.number) or rates[t.number]

    chosen, strength, checks = pick_confirmed(study, confirm({0: 0.15, 2: 0.06, 1: 0.04}), 0.05, 8)
    assert seen == [0, 2, 1] and chosen.number == 1 and strength == 1.0  # 0 (pick()'s choice) and 2 fail
    assert [c["passed"] for c in checks] == [False, False, True] and checks[0]["confirm_refusal"] == 0.15
    assert checks[2] == {"number": 1, "strength": 1.0, "val_refusal": 0.0, "kl": 0.12, "confirm_refusal": 0.04,
                         "passed": True}
    seen.clear()  # a first candidate that passes is pick()'s choice
    chosen, _, checks = pick_confirmed(study, confirm({0: 0.0, 1: 0.0}), 0.05, 8)
    assert seen == [0] and chosen.number == pick(study, None, 0.05).number == 0
    seen.clear()  # none passes: the checked trial with the fewest confirmation refusals
    chosen, _, checks = pick_confirmed(study, confirm({0: 0.2, 2: 0.1, 1: 0.3, 4: 0.25}), 0.05, 8)
    assert seen == [0, 2, 1, 4] and chosen.number == 2 and not any(c["passed"] for c in checks)
    seen.clear()  # at most max_checks confirmations
    chosen, _, checks = pick_confirmed(study, confirm({0: 0.2, 2: 0.1}), 0.05, 1)
    assert seen == [0] and chosen.number == 0
    seen.clear()  # a confirmation target below the validation target: 0.04 no longer passes
    chosen, _, checks = pick_confirmed(study, confirm({0: 0.15, 2: 0.06, 1: 0.04, 4: 0.0}), 0.05, 8, 0.02)
    assert seen == [0, 2, 1, 4] and chosen.number == 4 and checks[2]["passed"] is False
    empty = optuna.create_study(directions=["minimize", "minimize"])  # nothing within the target
    empty.add_trial(finished((0.5, 0.1)))
    chosen, strength, checks = pick_confirmed(empty, confirm({}), 0.05, 8)
    assert chosen.number == 0 and strength == 1.0 and checks == []


def test_pick_confirmed_tries_each_candidate_at_rising_strength_before_the_next():
    from obliteratus.optimize.study import pick_confirmed

    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in [(0.03, 0.10), (0.0, 0.12)]:
        study.add_trial(finished(values))
    seen = []
    rates = {(0, 1.0): 0.06, (0, 1.25): 0.03, (0, 1.5): 0.0, (1, 1.0): 0.0}

    def confirm(t, strength):
        seen.append((t.number, strength))
        return rates[(t.number, strength)]

    chosen, strength, checks = pick_confirmed(study, confirm, 0.05, 8, 0.025, (1.0, 1.25, 1.5))
    assert seen == [(0, 1.0), (0, 1.25), (0, 1.5)] and (chosen.number, strength) == (0, 1.5)
    assert [c["strength"] for c in checks] == [1.0, 1.25, 1.5] and checks[-1]["passed"]
    seen.clear()  # the budget runs out on the ladder: the fewest refusals among those checked
    chosen, strength, checks = pick_confirmed(study, confirm, 0.05, 2, 0.025, (1.0, 1.25, 1.5))
    assert seen == [(0, 1.0), (0, 1.25)] and (chosen.number, strength) == (0, 1.25) and not checks[-1]["passed"]
    seen.clear()  # the next candidate after the ladder of the first
    rates[(0, 1.5)] = 0.04
    chosen, strength, _ = pick_confirmed(study, confirm, 0.05, 8, 0.025, (1.0, 1.25, 1.5))
    assert seen == [(0, 1.0), (0, 1.25), (0, 1.5), (1, 1.0)] and (chosen.number, strength) == (1, 1.0)


def test_confirmation_scores_other_prompts_under_the_trials_hooks(monkeypatch):
    """The confirmation counts refusals on its own prompts with the trial's edit attached (and the
    model untouched after), and stops once the count exceeds the target."""
    from obliteratus.optimize.trial import Confirmation

    model = tiny_model("llama")
    before = params_digest(model)
    objective = make_objective(model, StudyOptions(refusal_tokens=3, prune=False))
    tok, other = encoded(PROMPTS[:6])
    p, md = params(), mean_diffs()

    def confirmation(target):
        return Confirmation(objective.adapter, objective.scorer, other, 3, md, objective.excise, target)

    rate = confirmation(1.0)(p)
    q, plan = plan_from_params(p, md, L)
    with ablated(objective.adapter, q, 1.0, plan=plan, biases=False):
        verdicts = early.judge(model, tok, other, 3, 4)
    assert rate == sum(verdicts.refused) / 6 and params_digest(model) == before
    strong = confirmation(1.0)(p, strength=1.5)  # under the trial's hooks at λ = 1.5
    with ablated(objective.adapter, q, 1.5, plan=plan, biases=False):
        assert strong == sum(early.judge(model, tok, other, 3, 4).refused) / 6
    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal: stopped above the target
    rate = confirmation(0.05)(p)
    assert 0.05 < rate <= 1.0 and params_digest(model) == before


def test_confirmation_generates_the_prompts_an_earlier_check_refused_first(monkeypatch):
    """Prompts found refusing by one check are generated first, in their own batch, by the next: a
    candidate failing on them is given up after that small batch. The rate does not depend on it."""
    from obliteratus.optimize import trial
    from obliteratus.optimize.trial import Confirmation

    model = tiny_model("llama")
    objective = make_objective(model, StudyOptions(refusal_tokens=4, prune=False))
    tok, other = encoded()
    p, md = params(), mean_diffs()
    q, plan = plan_from_params(p, md, L)
    with ablated(objective.adapter, q, 1.0, plan=plan, biases=False):
        full = decode(tok, generate(model, tok, other, 4, 8))
    norms = [refusal.normalise(t) for t in full]
    letters = {c for n in norms for c in n if c.isascii() and c.isalpha()}
    marker = min(letters, key=lambda c: (abs(sum(c in n for n in norms) - 2), c))  # in about 2 of the 8
    monkeypatch.setattr(refusal, "MARKERS", (marker,))
    refusing = {i for i, n in enumerate(norms) if marker in n}
    assert 0 < len(refusing) < len(PROMPTS)

    groups = []
    real = early.judge_batches

    def spy(model_, tokenizer, encoded_, *args, **kwargs):
        groups.append(len(encoded_.ids))
        yield from real(model_, tokenizer, encoded_, *args, **kwargs)

    monkeypatch.setattr(trial, "judge_batches", spy)  # the name optimize/trial.py calls
    check = Confirmation(objective.adapter, objective.scorer, other, 4, md, objective.excise, target=1.0)
    assert check(p) == len(refusing) / 8 and set(check.suspects) == refusing and groups == [8]
    groups.clear()
    assert check(p) == len(refusing) / 8 and groups == [len(refusing), 8 - len(refusing)]  # suspects first
    groups.clear()
    strict = Confirmation(objective.adapter, objective.scorer, other, 4, md, objective.excise, target=0.0,
                          suspects=list(check.suspects))
    assert strict(p) > 0.0 and groups == [len(refusing)]  # failed on the suspects; the rest never generated
    fresh = Confirmation(objective.adapter, objective.scorer, other, 4, md, objective.excise, target=0.0)
    assert fresh(p) > 0.0 and fresh.suspects and set(fresh.suspects) <= refusing  # rows marked when abandoned


def test_the_pick_is_baked_and_recorded_at_its_confirmed_strength(tmp_path):
    """obliterate bakes the pick at the strength its confirmation passed at (here the only one, 2):
    the saved weights equal the trial's plan applied at λ = 2, and the metadata and result say so."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny
    from obliteratus.pipeline import obliterate
    from obliteratus.optimize.trial import scaled_plan

    src = save_tiny(tmp_path, "llama")
    sizes = {"data": {"n_train": 8, "n_val": 4, "n_test": 4},
             "evaluate": {"max_new_tokens": 3, "kl_tokens": 2, "perplexity": False}}
    study = {"n_trials": 3, "n_startup_trials": 1, "refusal_tokens": 3, "confirm_prompts": 6,
             "confirm_strengths": [2.0], "confirm_target": 1.0}
    out = tmp_path / "out"
    result = obliterate(str(src), "optimized", str(out), overrides=sizes, study=study, run_dir=str(tmp_path / "st")).study
    assert result.strength == 2.0 and result.edit.lam == 2.0 and result.checks[0]["strength"] == 2.0
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["optimize"]["confirm"]["strength"] == 2.0 and meta["optimize"]["confirm"]["target"] == 1.0
    assert meta["edit"]["details"]["strength"] == 2.0
    html = (out / "report.html").read_text()  # the optimizer's run gets the norm and PCA panels too
    assert 'alt="layer_norms"' in html and 'alt="pca"' in html and (out / "pca.json").is_file()
    assert 'alt="selection"' in html and "Pareto front" in html and "skipped" not in html  # every panel
    expected = AutoModelForCausalLM.from_pretrained(src).float()
    md = load_file(str(out / "directions.safetensors"))["mean_diffs"]
    q, plan = scaled_plan(result.chosen.params, md, L, result.settings.excise.lam, 2.0)
    excise(ArchitectureAdapter(expected), q, result.settings.excise, plan)
    saved = AutoModelForCausalLM.from_pretrained(out).float()
    for (name, a), b in zip(saved.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_the_recount_budget_is_a_study_option(tmp_path, monkeypatch):
    """optimize.study.confirm_recounts reaches pick_confirmed (0: the fallback compares the bounds)."""
    from conftest import save_tiny
    from obliteratus.optimize import study as st
    from obliteratus.pipeline import obliterate

    seen, real = [], st.pick_confirmed

    def spy(*args, **kwargs):
        seen.append(kwargs["max_recounts"])
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "pick_confirmed", spy)
    src = save_tiny(tmp_path, "llama")
    sizes = {"data": {"n_train": 8, "n_val": 4, "n_test": 4},
             "evaluate": {"max_new_tokens": 3, "kl_tokens": 2, "perplexity": False}}
    study = {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 3, "confirm_prompts": 6, "confirm_recounts": 0}
    obliterate(str(src), "optimized", str(tmp_path / "out"), overrides=sizes, study=study,
               run_dir=str(tmp_path / "st"))
    assert seen == [0]


def test_confirmation_needs_enough_spare_prompts(tmp_path):
    """Checked before any model is loaded (the model path does not exist)."""
    from obliteratus.errors import ConfigError
    from obliteratus.pipeline import obliterate

    sizes = {"data": {"n_train": 200, "n_val": 32, "n_test": 64}}  # 332 built-in harmful prompts: 36 spare
    with pytest.raises(ConfigError, match="confirm_prompts = 64, but only 36 harmful prompts are left"):
        obliterate(str(tmp_path / "never-loaded"), "optimized", overrides=sizes, study={}, run_dir=str(tmp_path))


def test_an_unpruned_trial_needs_no_optuna(monkeypatch):
    """Scorer.refusal imports Optuna only to prune, so benchmarks/optimizer_cost.py runs where Optuna
    is not installed (the lent GPU machine); pruning still raises Optuna's TrialPruned."""
    import sys

    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    model = tiny_model("llama")
    objective = make_objective(model, StudyOptions(refusal_tokens=2, prune=False))
    monkeypatch.setitem(sys.modules, "optuna", None)  # any `import optuna` now fails
    assert objective.scorer.refusal(None)[0] == 1.0
    with pytest.raises(ImportError):
        objective.scorer.refusal(0.0)  # pruning is the only path that needs Optuna


def test_extra_directions_reuse_the_judged_contrast(tmp_path, monkeypatch):
    """With max_directions > 1 the basis comes from the same contrast groups as the mean differences:
    the filtered contrast (which generates an answer for every train prompt) is judged once."""
    from conftest import save_tiny
    from obliteratus.directions import driver
    from obliteratus.optimize import base
    from obliteratus.pipeline import obliterate

    calls = []
    real = driver.contrast_groups
    for module in (driver, base):  # optimize/base.py (train_contrast) imports it by name
        monkeypatch.setattr(module, "contrast_groups", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = save_tiny(tmp_path, "llama")
    overrides = {"data": {"n_train": 8, "n_val": 4, "n_test": 4}, "directions": {"method": "svd"},
                 "layers": {"method": "fixed"}, "evaluate": {"max_new_tokens": 2, "kl_tokens": 2, "perplexity": False}}
    study = {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 2, "confirm_prompts": 0, "confirm_during": False,
             "max_directions": 2, "seed_windows": []}
    result = obliterate(str(src), "optimized", overrides=overrides, study=study, run_dir=str(tmp_path / "st")).study
    assert len(calls) == 1
    assert result.chosen is not None and result.front


def test_pick_confirmed_recounts_early_stopped_checks_before_comparing_them():
    """A failed check that stopped early gives a lower bound. When nothing passes, the fallback
    re-counts them in full, lowest bound first, until no remaining bound can beat the best exact
    rate, so the pick is the exact fewest; the budget caps the re-counts."""
    from obliteratus.optimize.study import pick_confirmed

    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in [(0.03, 0.10), (0.0, 0.12), (0.03, 0.11), (0.2, 0.01), (0.0, 0.30)]:
        study.add_trial(finished(values))  # candidates in KL order 0, 2, 1, 4
    bounds = {0: 0.2, 2: 0.1, 1: 0.3, 4: 0.25}
    exact = {0: 0.22, 2: 0.35, 1: 0.3, 4: 0.25}
    counted = []

    def recount(t, strength):
        counted.append(t.number)
        return exact[t.number]

    chosen, _, checks = pick_confirmed(study, lambda t, s: bounds[t.number], 0.05, 8, recount=recount)
    # by bounds alone trial 2 (0.1) would win; counted in full it has 0.35, and trial 0 (bound 0.2, exact
    # 0.22) wins; trial 4's bound 0.25 cannot beat 0.22, so neither 4 nor 1 is re-counted
    assert counted == [2, 0] and chosen.number == 0
    rows = {c["number"]: c for c in checks}
    assert rows[2]["bound"] == 0.1 and rows[2]["confirm_refusal"] == 0.35 and rows[2]["exact"] is True
    assert "exact" not in rows[4] and rows[4]["confirm_refusal"] == 0.25
    counted.clear()  # a budget of one: the bounds left stand in for the rest (0's 0.2 beats 2's exact 0.35)
    chosen, _, _ = pick_confirmed(study, lambda t, s: bounds[t.number], 0.05, 8, recount=recount, max_recounts=1)
    assert counted == [2] and chosen.number == 0
    counted.clear()  # a candidate that passes needs no re-count
    chosen, _, _ = pick_confirmed(study, lambda t, s: {**bounds, 1: 0.0}[t.number], 0.05, 8, recount=recount)
    assert counted == [] and chosen.number == 1


def test_an_exact_confirmation_does_not_stop_early(monkeypatch):
    """Confirmation(exact=True) judges every prompt, where the plain call stops above the target."""
    from obliteratus.optimize.trial import Confirmation

    monkeypatch.setattr(refusal, "MARKERS", ("",))  # every response is a refusal
    options = StudyOptions(refusal_tokens=3)
    objective = make_objective(tiny_model("llama"), options)
    _, spare = encoded(PROMPTS[:6])
    check = Confirmation(objective.adapter, objective.scorer, spare, 3, objective.mean_diffs, objective.excise, 0.0)
    p = params()
    assert 0.0 < check(p) < 1.0  # stopped at the first refusal: a lower bound
    assert check(p, exact=True) == 1.0
