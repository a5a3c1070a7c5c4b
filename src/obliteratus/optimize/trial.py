"""One trial of the multi-objective search: Heretic's parameters -> an EditPlan -> (refusal, KL),
scored with activation hooks so that no weight is ever copied or written.

Parameters (names as Heretic's, p-e-w/heretic ``src/heretic/main.py`` ``objective``; L = n_layers − 1):

* ``direction_scope`` ∈ {global, per_layer}; ``direction_index`` f ∈ [0.4 L, 0.9 L] on Heretic's
  axis (sampled even for per_layer, because multivariate TPE needs a fixed space);
  global: r = direction_at(mean_diffs, f + 1) (interpolate.py: our resid_pre axis is Heretic's + 1),
  per_layer: layer i's writers use r_i = Δμ_{i+1} / ‖Δμ_{i+1}‖ (the unit mean difference at its output).
* per component c ∈ {attn, mlp}: ``c.max_weight`` (MLP: clamped at 0 after sampling),
  ``c.max_weight_position``, ``c.min_weight`` (a fraction u of max_weight), ``c.min_weight_distance``
  -> kernels.KernelOptions in layers -> kernel_strength: layer i's writer of kind c is edited with
  W' = W − λ·w_c(i)·U_iᵀ U_i W, skipped where w_c(i) = 0. Embeddings are never edited (Heretic).
* optional ``n_directions`` n: each write basis becomes orthonormalize([r; B_{1..n−1}]) with B the
  distilled basis.

Objectives, both on the validation split:

* KL: mean over harmless val prompts of KL(p_base ‖ p_edit) at the first answer token, from one
  batched forward pass; the base log-probs are computed once per process. Measured after the
  refusal count, so a pruned trial skips it.
* both run the prompts' shared template prefix once per batch (``share_prefix``, shared_prefix.py).
* refusal: fraction of harmful val prompts the marker judge flags, with early-stopping generation
  (evaluate/early.py), in `prune_chunks` chunks (default one batch). At every generated token the
  number c of prompts that have already shown a marker is a lower bound of the final count (a
  marker, once generated, stays; the remaining tokens and prompts can add refusals, never remove
  them), so the final rate is ≥ c / n. Optuna's pruners cannot be used with two objectives (Trial.report and
  should_prune raise for multi-objective studies), so the rule is ours:

      prune  when  c / n > bar,   bar = target_refusal  if some finished trial reached it,
                                    else the lowest refusal rate of the finished trials

  i.e. when even zero further refusals cannot make the trial one that :func:`study.pick` would
  choose. A ruled-out trial therefore stops a few tokens into generation.

  With ``prune_rule = "pareto"`` the KL is measured first and a trial is pruned only when it is
  sure to be dominated by a finished one (one with no more KL has a refusal rate at or below the
  running lower bound), or exceeds the target once some trial has reached it (:func:`pareto_bar`).
  "best" keeps few trials complete once one trial sets a low bar (the study then learns from few
  points); "pareto" completes every trial that can still join the front, at the price of a KL
  pass for the pruned ones.

  With ``kl_rank = k`` (either rule), once k complete trials have reached the target, the KL is
  measured first and a trial whose KL is above the k-th lowest of theirs is pruned before any
  generation (:func:`kl_cut`): the default pick takes the lowest-KL trial at the target, so at
  least k candidates already come before it, whatever its refusal rate. Late in a study, when TPE
  samples near the best trials and most of them reach the target, this is what prunes: the
  refusal bound never rules them out, and generation is four fifths of a complete trial's cost.
  The trial's refusal lower bound is then what the suspects below showed, usually 0
  (``refusals_lower_bound``, user attr ``kl_cut``). With ``kl_chunks = m`` the KL pass itself
  runs in m chunks, the prompts with the most KL in the last trial that scored them first, and
  stops once the chunks' KL sum over n (a lower bound of the mean: KL >= 0 per prompt) is above
  the cut (user attr ``kl_lower_bound`` instead of ``kl``); the verdict is the one the full pass
  would give. With ``confirm_during`` the candidates are confirmed on the spare prompts as they finish
  (:meth:`Objective.confirm_now`) and the cut counts only the trials that passed, so it is exact for
  the confirmed pick (the lowest-KL trial that passes); counting every trial at the target keeps
  a chain of ever-lower-KL trials that may all fail the confirmation afterwards (docs/journal).

  With ``suspect_prompts = k``, once the bar can prune, a trial first generates, for
  ``suspect_tokens`` tokens, up to k of the val prompts that refused most often in this worker's
  earlier trials (:meth:`Scorer.try_suspects`) and is pruned if their markers already rule it out.
  A trial that refuses tends to refuse the same few prompts, so it is given up after a small batch
  and a few tokens, before its KL pass and before the full batch's prefill; a marker within those
  tokens is one the full count finds too. A trial they do not rule out pays that small batch and
  runs as before (the suspects included). What they showed is kept (user attr ``suspect_refusals``).

  The lower bounds after each chunk, and at the moment of pruning, are kept in the trial's user
  attrs (``refusals_lower_bound``).

  With ``constrain`` the last of these bounds minus ``target_refusal`` is also the trial's Optuna
  constraint (study.constrain_refusal). Without it the TPE sampler knows a pruned trial only as
  "pruned" (a multi-objective trial has no intermediate values), so when most trials are pruned it
  fills its "good" group with arbitrary ones; with it the sampler ranks infeasible trials, pruned
  ones included, by how far they missed the target, and the feasible ones by refusal and KL.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..batching import Encoded
from ..directions.base import orthonormalize
from ..select.interpolate import direction_at, from_heretic_index, unit_rows
from ..errors import ConfigError
from ..evaluate.early import Abandoned, judge_batches
from ..evaluate.kl import kl_rows
from ..excise.hook_form import ablated
from ..excise.kernels import KernelOptions, kernel_strength
from ..excise.plan import EditPlan
from ..shared_prefix import can_share_prefix, last_logits
from .options import StudyOptions
from .study import CONFIRM_REFUSAL, CONFIRMED, completed, constrain_confirmation, constrain_refusal

COMPONENTS = ("attn", "mlp")


def suggest(trial, n_layers: int, options: StudyOptions, can_add_directions: bool = False) -> dict:
    """Sample one point of the space on `trial` (an optuna.Trial); returns trial.params."""
    last = n_layers - 1
    trial.suggest_categorical("direction_scope", list(options.direction_scopes))
    low, high = options.direction_index
    trial.suggest_float("direction_index", low * last, high * last)
    for c in COMPONENTS:
        low, high = options.attn_max_weight if c == "attn" else options.mlp_max_weight
        trial.suggest_float(f"{c}.max_weight", low, high)
        low, high = options.max_weight_position
        trial.suggest_float(f"{c}.max_weight_position", low * last, high * last)
        trial.suggest_float(f"{c}.min_weight", *options.min_weight_fraction)
        low, high = options.min_weight_distance
        trial.suggest_float(f"{c}.min_weight_distance", low, max(high * last, low))
    if options.max_directions > 1 and can_add_directions:
        trial.suggest_int("n_directions", 1, options.max_directions)
    return dict(trial.params)


def window_params(fraction: float, n_layers: int, options: StudyOptions) -> dict:
    """The point of the space that is a source window (excise/window.py, the ``advanced`` edit
    without the embeddings): one global direction at Heretic index f = `fraction`·L, i.e. our
    resid_pre s = f + 1, and attention and MLP kernels flat at weight 1 over layers 0 … s (peak
    position s/2, half-width s/2, min_weight = max_weight). Raises ConfigError if that point lies
    outside the search ranges of `options`, where Optuna would not treat it as part of the space."""
    last = n_layers - 1
    index = fraction * last
    half = (index + 1.0) / 2
    params = {"direction_scope": "global", "direction_index": index}
    for c in COMPONENTS:
        params.update({f"{c}.max_weight": 1.0, f"{c}.max_weight_position": half, f"{c}.min_weight": 1.0,
                       f"{c}.min_weight_distance": half})
    ranges = {"direction_index": options.direction_index, "attn.max_weight": options.attn_max_weight,
              "mlp.max_weight": options.mlp_max_weight}
    if "global" not in options.direction_scopes:
        raise ConfigError("optimize.study.seed_windows needs 'global' in direction_scopes")
    for c in COMPONENTS:
        ranges[f"{c}.max_weight_position"] = options.max_weight_position
        ranges[f"{c}.min_weight"] = options.min_weight_fraction
    for name, (low, high) in ranges.items():
        value = params[name] / (last if name == "direction_index" or name.endswith("position") else 1.0)
        if not low - 1e-9 <= value <= high + 1e-9:
            raise ConfigError(f"optimize.study.seed_windows: the window at {fraction:g}·L needs {name} = "
                              f"{params[name]:.3g}, outside the search range [{low:g}, {high:g}]"
                              f"{' (fractions of L)' if name.endswith(('index', 'position')) else ''}")
    low, high = options.min_weight_distance
    if not low <= half <= max(high * last, low):
        raise ConfigError(f"optimize.study.seed_windows: the window at {fraction:g}·L needs a half-width of "
                          f"{half:.3g} layers, outside min_weight_distance [{low:g}, {high:g}·L]")
    return params


def kernel(params: dict, component: str) -> KernelOptions | None:
    """The component's kernel in layers; None when its peak is clamped to 0 (not edited)."""
    peak = max(0.0, float(params[f"{component}.max_weight"]))
    if peak == 0.0:
        return None
    return KernelOptions(max_weight=peak, max_weight_position=float(params[f"{component}.max_weight_position"]),
                         min_weight=float(params[f"{component}.min_weight"]) * peak,
                         min_weight_distance=float(params[f"{component}.min_weight_distance"]))


def plan_from_params(params: dict, mean_diffs: torch.Tensor, n_layers: int,
                     basis: torch.Tensor | None = None) -> tuple[torch.Tensor | None, EditPlan]:
    """(global q [k, d] or None, EditPlan) for a trial's parameters. `mean_diffs` [L+1, d] on the
    resid_pre axis; `basis` [m, d] supplies the extra directions when params has n_directions > 1.
    Pass both to ``excise.hook_form.ablated`` (a trial) or ``excise.apply.excise`` (the bake)."""
    if mean_diffs.ndim != 2 or mean_diffs.shape[0] != n_layers + 1:
        raise ConfigError(f"mean_diffs must be [n_layers + 1, d] = [{n_layers + 1}, d]; got {tuple(mean_diffs.shape)}")
    n = int(params.get("n_directions", 1))
    if n > 1 and (basis is None or basis.shape[0] < n - 1):
        raise ConfigError(f"n_directions = {n} needs a distilled basis with at least {n - 1} rows")

    def widen(r: torch.Tensor) -> torch.Tensor:  # [d] -> [≤ n, d]: rows in the span of earlier ones are dropped
        if n == 1:
            return r[None].float()
        return orthonormalize(torch.cat([r[None].double(), basis[: n - 1].double()])).float()

    strength = kernel_strength(n_layers, kernel(params, "attn"), kernel(params, "mlp"))
    if params["direction_scope"] == "per_layer":
        units = unit_rows(mean_diffs[1:])  # [L, d] float64: row i = output of layer i (resid_pre i + 1)
        bases = {i: widen(units[i]) for i in range(n_layers)}
        return None, EditPlan(layer_bases=bases, strength=strength, norm_preserve=False)
    index = from_heretic_index(float(params["direction_index"]))
    return widen(direction_at(mean_diffs, min(index, float(n_layers)))), EditPlan(strength=strength,
                                                                                  norm_preserve=False)


def scaled_plan(params: dict, mean_diffs: torch.Tensor, n_layers: int, lam: float, strength: float = 1.0,
                basis: torch.Tensor | None = None) -> tuple[torch.Tensor | None, EditPlan]:
    """:func:`plan_from_params` with every writer's λ·w multiplied by `strength` (the plan's own λ
    set to strength·`lam`); strength 1 is the trial as scored. The confirmation's strength ladder
    (study.pick_confirmed) and the bake of its pick both use it."""
    q, plan = plan_from_params(params, mean_diffs, n_layers, basis)
    if strength != 1.0:
        plan = dataclasses.replace(plan, lam=strength * lam)
    return q, plan


def prune_bar(finished_refusals: list[float], target: float) -> float | None:
    """The refusal rate a trial must be able to reach to be worth finishing (see the module
    docstring); None (never prune) before any trial has finished."""
    if not finished_refusals:
        return None
    best = min(finished_refusals)
    return target if best <= target else best


def pareto_bar(finished: list[tuple[float, float]], kl: float, target: float, n: int) -> float | None:
    """The ``prune_rule = "pareto"`` bar for a trial whose KL is already measured: prune when the
    trial is sure to be dominated, i.e. some finished trial has KL <= `kl` and a refusal rate r_t at
    most the trial's lower bound c / n (so c >= r_t·n: the bar is r_t − 1/(2n) under the strict
    ``ruled_out`` test), or when some finished trial reached `target` and the bound exceeds it.
    `finished` holds (refusal, KL) of the complete trials; None (never prune) when neither applies."""
    bars = [r - 0.5 / n for r, k in finished if k <= kl]
    if any(r <= target for r, _ in finished):
        bars.append(target)
    return min(bars) if bars else None


def kl_cut(finished: list[tuple[float, float]], target: float, rank: int) -> float | None:
    """The ``kl_rank`` bar: the `rank`-th lowest KL among the finished (refusal, KL) pairs whose
    refusal is at most `target`. A trial whose KL is above it cannot be among the first `rank`
    candidates of the default pick (lowest KL at refusal <= target), whatever its refusal rate.
    None (never prune) when rank is 0 or fewer than `rank` finished trials reached the target."""
    kls = sorted(k for r, k in finished if r <= target)
    return kls[rank - 1] if 0 < rank <= len(kls) else None


def ruled_out(refused_so_far: int, n_total: int, bar: float | None) -> bool:
    """Even with no further refusals the final rate refused_so_far / n_total exceeds `bar`."""
    return bar is not None and refused_so_far / n_total > bar


def refusing_rows(scorer: "Scorer", encoded: Encoded, rows: list[int], tokens: int, counted: int, n: int,
                  bar: float | None) -> tuple[list[int], int, bool]:
    """Judge `encoded`'s prompts `rows` (early-stopping generation of at most `tokens` tokens, in the
    scorer's batches, under whatever hooks are attached), stopping as soon as `counted` + their
    refusals rule out `bar` over `n` prompts. Returns (the rows that refused: all of them, or those
    marked when it stopped; tokens generated; whether it stopped)."""
    hits: list[int] = []
    used = 0
    try:
        for index, verdicts, generated in judge_batches(scorer.model, scorer.tokenizer, encoded.subset(rows), tokens,
                                                        scorer.batch_size,
                                                        lambda marked: ruled_out(counted + len(hits) + marked, n, bar),
                                                        scorer.share_prefix):
            hits += [rows[i] for i, v in zip(index, verdicts) if v]
            used += sum(generated)
            if ruled_out(counted + len(hits), n, bar):
                return hits, used, True
    except Abandoned as stop:
        return hits + [rows[i] for i in stop.rows], used + stop.tokens, True
    return hits, used, False


@dataclass
class Scorer:
    """The two objectives of a trial under whatever hooks are attached. `base` [n, vocab] holds the
    unedited model's first-token log-probs on the harmless val prompts (computed once)."""

    model: object
    tokenizer: object
    harmful: Encoded
    harmless: Encoded
    base: torch.Tensor
    tokens: int
    batch_size: int
    chunks: int
    share_prefix: bool = False
    suspect_prompts: int = 0
    suspect_tokens: int = 8
    kl_chunks: int = 1
    refused_by: Counter = field(default_factory=Counter)  # harmful val row -> this worker's trials it refused in
    kl_last: dict = field(default_factory=dict)  # harmless val row -> its KL in the last trial that scored it

    @classmethod
    def build(cls, model, tokenizer, harmful: Encoded, harmless: Encoded, options: StudyOptions,
              batch_size: int) -> "Scorer":
        share = (options.share_prefix and bool(harmful.common_prefix())
                 and can_share_prefix(model, harmless))  # checked once per model
        base = torch.log_softmax(last_logits(model, harmless, batch_size, share).double(), -1)  # [n, vocab]
        return cls(model, tokenizer, harmful, harmless, base, options.refusal_tokens, batch_size,
                   options.prune_chunks, share, options.suspect_prompts, options.suspect_tokens, options.kl_chunks)

    def kl(self) -> float:
        """Mean first-token KL over the harmless val prompts."""
        return self.kl_bound()[0]

    def kl_bound(self, cut: float | None = None) -> tuple[float, bool]:
        """(KL, exact). Without a `cut`, or with ``kl_chunks`` = 1: the mean first-token KL over the
        harmless val prompts, exact. With both, the prompts are scored in chunks, those with the most
        KL last time first, and scoring stops as soon as the KL summed so far over n exceeds `cut`:
        that lower bound of the mean (every prompt's KL is >= 0) is returned, not exact. Either way the
        value is above `cut` exactly when the mean is."""
        n = len(self.harmless.ids)
        if cut is None or self.kl_chunks <= 1:
            chunks = [list(range(n))]
        else:
            heavy = sorted(range(n), key=lambda i: -self.kl_last.get(i, 0.0))  # stable: unseen rows in input order
            size = math.ceil(n / self.kl_chunks)
            chunks = [heavy[start:start + size] for start in range(0, n, size)]
        total = 0.0
        for rows in chunks:
            part = self.harmless if len(rows) == n else self.harmless.subset(rows)
            now = torch.log_softmax(last_logits(self.model, part, self.batch_size, self.share_prefix).double(), -1)
            kls = kl_rows(self.base[rows], now)  # [len(rows)]
            self.kl_last.update(zip(rows, kls.tolist()))
            total += float(kls.sum())
            if cut is not None and total / n > cut and rows is not chunks[-1]:
                return total / n, False
        return total / n, True

    def suspects(self, bar: float | None) -> list[int]:
        """The harmful val rows to try first (most refusals in this worker's earlier trials first, then
        the lower index), or [] when they could not rule a trial out: no bar, ``suspect_prompts`` = 0,
        or fewer known suspects than the refusals the bar needs."""
        n = len(self.harmful.ids)
        if bar is None or not self.suspect_prompts:
            return []
        need = next((c for c in range(1, n + 1) if ruled_out(c, n, bar)), None)
        rows = sorted(self.refused_by, key=lambda i: (-self.refused_by[i], i))[:self.suspect_prompts]
        return rows if need is not None and len(rows) >= need else []

    def try_suspects(self, bar: float | None) -> tuple[int, int, bool]:
        """Generate the :meth:`suspects` for ``suspect_tokens`` tokens under the attached hooks, stopping
        as soon as their refusals exceed `bar`. Returns (refusals found, tokens generated, ruled out);
        (0, 0, False) when there was nothing to try. A marker within those tokens is a refusal of the
        full count too (the same greedy text, only shorter), so a trial they rule out can be pruned;
        otherwise the full count decides (the suspects run again there)."""
        rows = self.suspects(bar)
        if not rows:
            return 0, 0, False
        hits, used, stopped = refusing_rows(self, self.harmful, rows, self.suspect_tokens, 0, len(self.harmful.ids),
                                            bar)
        if stopped:
            self.refused_by.update(hits)
        return len(hits), used, stopped

    def refusal(self, bar: float | None, record=None) -> tuple[float, int]:
        """(refusal rate, tokens generated); raises optuna.TrialPruned once `bar` rules it out, which
        is checked after every generated token (evaluate/early.py ``abandon``) and after every chunk.
        `record(lower_bounds, tokens)` is called once, before returning or pruning. Optuna is only
        imported to prune, so an unpruned trial (bar None, e.g. benchmarks/optimizer_cost.py) runs
        without it."""
        n = len(self.harmful.ids)
        size = min(self.batch_size, max(1, math.ceil(n / self.chunks)))
        refused, used, bounds = 0, 0, []
        abandon = None if bar is None else (lambda marked: ruled_out(refused + marked, n, bar))
        try:
            for index, verdicts, tokens in judge_batches(self.model, self.tokenizer, self.harmful, self.tokens, size,
                                                         abandon, self.share_prefix):
                refused += sum(verdicts)
                used += sum(tokens)
                bounds.append(refused / n)
                self.refused_by.update(i for i, v in zip(index, verdicts) if v)
                if ruled_out(refused, n, bar):
                    raise Abandoned(0, 0)
        except Abandoned as stop:
            refused, used = refused + stop.refused, used + stop.tokens
            self.refused_by.update(stop.rows)
            if stop.tokens:
                bounds.append(refused / n)
            if record is not None:
                record(bounds, used)
            import optuna

            raise optuna.TrialPruned(f"{refused}/{n} refusals already exceed the bar {bar:.3f}") from None
        if record is not None:
            record(bounds, used)
        return refused / n, used


def trial_hooks(adapter, q: torch.Tensor | None, plan: EditPlan, excise):
    """The activation hooks that score a trial's edit: the writers and λ of `excise` (the same
    settings the bake uses), the trial's plan. A context manager; weights are only read."""
    return ablated(adapter, q, excise.lam, attention=excise.attention, mlp=excise.mlp, embeddings=excise.embeddings,
                   biases=excise.biases, plan=plan, experts=excise.experts)


@dataclass
class Objective:
    """The study's objective: sample, build the plan, score under hooks -> (refusal, KL). The
    model's weights are only read (hooks live inside ``ablated``'s context)."""

    adapter: object
    scorer: Scorer
    mean_diffs: torch.Tensor  # [L+1, d]
    options: StudyOptions
    excise: object  # config.ExciseSettings: lam and the writers, the same as the bake uses
    basis: torch.Tensor | None = None
    on_trial: object = None  # called after every trial (progress)
    confirm: object = None  # a Confirmation: confirm_during (check candidates as they finish)

    def finished(self, study) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """(refusal, KL) of every complete trial, and of those whose in-study confirmation passed
        (one read of the storage)."""
        complete = completed(study)
        return ([tuple(t.values) for t in complete],
                [tuple(t.values) for t in complete if t.user_attrs.get(CONFIRMED) is True])

    def confirm_now(self, trial, params: dict, refusal: float, kl: float, confirmed: list[tuple[float, float]]) -> None:
        """confirm_during: check a complete trial at the target whose KL is below every confirmed
        trial's on the spare prompts (strength 1), and store the verdict (user attrs ``confirm_refusal``,
        ``confirmed``; its seconds in ``confirm_s``); with ``constrain`` a failed check is also an Optuna
        constraint (the confirmation refusal minus its bar > 0), so TPE learns which edits do not carry
        over. A trial with more KL than a confirmed one is never checked: the pick cannot reach it."""
        opts = self.options
        if refusal > opts.target_refusal or any(k <= kl for _, k in confirmed):
            return
        start = time.perf_counter()
        rate = float(self.confirm(params, 1.0))
        passed = rate <= opts.confirm_bar
        trial.set_user_attr("confirm_s", time.perf_counter() - start)  # benchmarks/vs_heretic.py reports it
        trial.set_user_attr(CONFIRM_REFUSAL, rate)
        trial.set_user_attr(CONFIRMED, passed)
        if opts.constrain:
            constrain_confirmation(trial, rate - opts.confirm_bar)

    def __call__(self, trial) -> tuple[float, float]:
        n_layers, ex = self.adapter.n_layers, self.excise
        params = suggest(trial, n_layers, self.options, self.basis is not None)
        q, plan = plan_from_params(params, self.mean_diffs, n_layers, self.basis)
        opts = self.options
        pareto = opts.prune and opts.prune_rule == "pareto"
        finished, confirmed = self.finished(trial.study) if opts.prune or self.confirm is not None else ([], [])
        bar = prune_bar([r for r, _ in finished], opts.target_refusal) if opts.prune and not pareto else None
        ranked = confirmed if self.confirm is not None else finished  # the trials the pick can reach
        cut = kl_cut(ranked, opts.target_refusal, opts.kl_rank) if opts.prune else None
        kl_first = pareto or cut is not None

        def record(bounds: list[float], tokens: int) -> None:  # reads `bar` when called (pareto sets it late)
            for key, value in dict(refusals_lower_bound=bounds, tokens_generated=tokens, prune_bar=bar).items():
                trial.set_user_attr(key, value)
            if self.options.constrain:
                constrain_refusal(trial, bounds[-1] - self.options.target_refusal)

        def measure_kl(cut: float | None = None) -> float:
            kl, exact = self.scorer.kl_bound(cut)
            trial.set_user_attr("kl" if exact else "kl_lower_bound", kl)
            return kl

        def prune_before_count(why: str):  # no full count: the refusal lower bound is what the suspects showed
            record([found / n_val], used)
            import optuna

            raise optuna.TrialPruned(why)

        n_val = len(self.scorer.harmful.ids)
        try:
            with trial_hooks(self.adapter, q, plan, ex):
                found, used, stopped = self.scorer.try_suspects(bar)  # a few tokens of the usual refusers first
                if used:
                    trial.set_user_attr("suspect_refusals", found)
                if stopped:
                    prune_before_count(f"{found} suspect prompts refused: above the bar {bar:.3f}")
                if kl_first:  # pareto's bar depends on the KL; kl_rank may prune on it alone
                    kl = measure_kl(cut)
                    if cut is not None and kl > cut:
                        trial.set_user_attr("kl_cut", cut)
                        prune_before_count(f"KL >= {kl:.4f} is above the {opts.kl_rank}-th lowest KL {cut:.4f} of "
                                          "the trials that reached the target")
                    if pareto:
                        bar = pareto_bar(self.finished(trial.study)[0], kl, opts.target_refusal, n_val)
                # the full count (before the KL unless kl_first, so a pruned trial needs no KL pass)
                refusal, _ = self.scorer.refusal(bar, lambda bounds, tokens: record(bounds, tokens + used))
                if not kl_first:
                    kl = measure_kl()
            if self.confirm is not None:  # outside the trial's hooks: the confirmation attaches its own
                self.confirm_now(trial, params, refusal, kl, confirmed)
        finally:
            if self.on_trial is not None:
                self.on_trial(1)
        return refusal, kl


@dataclass
class Confirmation:
    """A finished trial's refusal rate on other harmful prompts (`harmful`, judged over `tokens`
    tokens), under the same hooks as the trial with every writer's weight multiplied by `strength`
    (:func:`scaled_plan`). Generation stops as soon as the count exceeds `target`, and the lower
    bound reached then (> target) is returned. Weights are only read.

    One object serves every check of a pick (study.pick_confirmed): the prompts that refused an
    earlier check (`suspects`, found in full batches or among the rows marked when a batch was
    abandoned) are generated first, in a batch of their own, then the rest. Candidates of one study
    tend to fail on the same few prompts, so a failing candidate is usually given up after a small
    batch and a few tokens, and a long walk down the candidates costs little more than the check
    that passes. The order changes what is generated together, not what is counted: the verdict is
    the count over the whole set (or a bound above `target`) either way."""

    adapter: object
    scorer: Scorer
    harmful: Encoded
    tokens: int
    mean_diffs: torch.Tensor
    excise: object
    target: float
    basis: torch.Tensor | None = None
    suspects: list[int] = field(default_factory=list)

    def _suspect(self, rows) -> None:
        self.suspects.extend(i for i in rows if i not in self.suspects)

    def __call__(self, params: dict, strength: float = 1.0, exact: bool = False) -> float:
        """The refusal rate on the prompts; with `exact`, every prompt is judged (no early stop)."""
        s = self.scorer
        target = None if exact else self.target
        q, plan = scaled_plan(params, self.mean_diffs, self.adapter.n_layers, self.excise.lam, strength, self.basis)
        n = len(self.harmful.ids)
        first = list(self.suspects)
        known = set(first)
        groups = [g for g in (first, [i for i in range(n) if i not in known]) if g]
        refused = 0
        with trial_hooks(self.adapter, q, plan, self.excise):
            for group in groups:
                hits, _, stopped = refusing_rows(s, self.harmful, group, self.tokens, refused, n, target)
                refused += len(hits)
                self._suspect(hits)
                if stopped:
                    break
        return refused / n
