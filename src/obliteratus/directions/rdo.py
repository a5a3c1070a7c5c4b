"""Refusal Direction Optimization (RDO) and refusal cones (RCO): gradient descent on a direction
(or an orthonormal cone basis) through real forward passes of the frozen model.

Wollschläger et al. 2025, "The Geometry of Refusal in Large Language Models: Concept Cones and
Representational Independence" (ICML 2025, arXiv:2502.17420; code: github.com/wollschlager/
geometry-of-refusal, ``rdo.py`` and ``generate_utils.py``). With r̂ = r / ‖r‖:

    ablation  A_r(h) = h − (h·r̂) r̂ on resid_pre of every layer and on every attn/mlp output
    addition  h_l ← h_l + α r̂ on resid_pre of the source layer l, α = ‖μ_harmful − μ_harmless‖_l
    L_abl  = CE(model_{A_r}(harmful ⊕ t_abl), t_abl)        t_abl: completion under DIM ablation
    L_add  = CE(model_{+αr̂}(harmless ⊕ t_add), t_add)        t_add: DIM-addition completion up to its first "."
    L_ret  = Σ_positions KL(p_{A_r} ‖ p) on harmless ⊕ t_ret  t_ret: plain completion (max_new_tokens − 1),
             at the last prompt position and every target position
    L      = 1·L_abl + 0.2·L_add + 1·L_ret                  (per prompt: CE is the mean over its target tokens)

Cones (k > 1): the basis B [k, d] is kept orthonormal (Gram–Schmidt after every step). Each step
averages the losses of n_samples random directions of the cone, r = sᵀB with s = |z|/‖|z|‖,
z ~ N(0, I_k) (positive orthant of the sphere, the paper's "hypersphere" sampling), plus the mean of
the losses of the k basis vectors themselves (``optimize_basis``). The paper grows a cone one
dimension at a time, each initialised with the previous result (``grow``).

Optimiser (paper): AdamW(lr 1e-2, betas (0.9, 0.98), weight decay 0, amsgrad), 16 prompts per step,
gradient of each basis vector projected onto its tangent space (g − (g·v)v), clipped to norm 10;
when the step loss has not improved for `patience` (5) steps the lr is divided by 10, and after
`n_lr_reduce` (2) reductions training stops; the lowest-loss basis is returned. Here the improvement
is relative (`min_delta`, paper: 0), `max_steps` caps the run, and the stopping loss is the weighted
objective (the paper logs the unweighted sum).

Start (paper): every basis vector is a standard normal vector, normalised (``RefusalCone`` with no
``init_vectors``); the difference of means only makes the targets and α. ``init = "diff_means"``
starts from it instead (``initial_basis``). Scale of the terms: the retain KL is *summed* over the
answer positions (the paper's ``kl_div(..., reduction="batchmean")`` on one prompt of 30 positions)
while the CEs are means over tokens, so on a model whose refusal direction costs much KL on harmless
prompts the retain term dominates (the demo model, at the difference of means: ablation CE 0.48,
addition CE 0.36, retain KL 4.46, so a direction that leaves refusal alone scores lower;
benchmarks/rdo_terms.py, docs/journal/2026-11-28-rdo.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..batching import Encoded
from ..errors import ObliteratusError, PromptError
from ..evaluate.generate import eos_ids, generate
from ..hook_points import hooked
from .base import Basis, FitContext, orthonormalize, register_direction_method, shares_prefix
from ..models.placement import input_device


class RdoOptions(BaseModel):
    """``[directions.rdo]``; defaults are the paper's ``DEFAULT_CONFIG`` (geometry-of-refusal ``rdo.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-2, ge=0.0, description="AdamW learning rate (paper: 1e-2).")
    effective_batch_size: int = Field(16, ge=1, description="Prompts per optimiser step (paper: 16).")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass (memory only; paper: 1 with accumulation).")
    epochs: int = Field(1, ge=1, description="Passes over the prompt pairs (paper: 1).")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimiser steps per cone dimension (None: epochs decide).")
    patience: int = Field(5, ge=1, description="Steps without improvement before an lr reduction or stop (paper: 5).")
    n_lr_reduce: int = Field(2, ge=0, description="Lr reductions (x0.1) before stopping (paper: 2).")
    min_delta: float = Field(0.0, ge=0.0, description="Relative improvement that counts (paper: 0, any decrease).")
    ablation_weight: float = Field(1.0, ge=0.0, description="Weight of the ablation CE (paper: 1).")
    addition_weight: float = Field(0.2, ge=0.0, description="Weight of the addition CE (paper: 0.2).")
    retain_weight: float = Field(1.0, ge=0.0, description="Weight of the retain KL (paper: 1).")
    n_samples: int = Field(8, ge=0, description="Random cone directions per step when k > 1 (paper: 8).")
    optimize_basis: bool = Field(True, description="k > 1: also train each basis vector on its own (paper: True).")
    grow: bool = Field(True, description="k > 1: fit dimensions one at a time, each from the previous (paper's RCO).")
    grad_clip: float = Field(10.0, gt=0.0, description="Gradient-norm clip (paper: 10).")
    seed: int = Field(42, description="Seed of the shuffles, cone samples and random init rows (paper: 42).")
    init: Literal["random", "diff_means"] = Field(
        "random", description="Start of the first basis vector: a seeded random unit vector (paper: rdo.py's "
                              "--train_direction and --train_cone start every vector at torch.randn; the difference "
                              "of means only sets the targets and alpha) or the difference of means at the source "
                              "layer (fewer steps on small prompt sets).")
    target_tokens: int = Field(30, ge=2, description="max_new_tokens of the target completions, for the caller "
                               "to pass to rdo_targets (paper: num_target_tokens = 30).")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.ablation_weight == self.addition_weight == self.retain_weight == 0:
            raise ValueError("at least one of ablation_weight, addition_weight, retain_weight must be > 0")
        if not self.optimize_basis and self.n_samples == 0:
            raise ValueError("optimize_basis = false needs n_samples > 0 (otherwise a cone has no loss)")
        return self


@dataclass(frozen=True)
class RdoTargets:
    """Target completions (token ids, no special tokens), per prompt in input order."""

    ablation: list[list[int]]  # per harmful prompt: completion under DIM ablation
    addition: list[list[int]]  # per harmless prompt: DIM-addition completion up to its first "."
    retain: list[list[int]]  # per harmless prompt: the unedited model's completion
    alpha: float  # addition scale: norm of the DIM difference of means at the source layer


@dataclass(frozen=True)
class RdoResult:
    basis: torch.Tensor  # [k, d] orthonormal float32, CPU
    history: list[float] = field(default_factory=list)  # step loss (before each update), all dimensions
    steps: int = 0  # optimiser updates, all dimensions
    stopped_early: bool = False  # the last dimension stopped on patience rather than the step cap


# ---- hooks --------------------------------------------------------------------------------------

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def ablation_hooks(n_layers: int, r: torch.Tensor) -> list[tuple[str, Callable]]:
    """h − (h·r̂) r̂ on every layer's input and attention/MLP output (differentiable in r)."""
    def ablate(h: torch.Tensor) -> torch.Tensor:
        u = _unit(r).to(h.dtype)
        return h - (h @ u)[..., None] * u  # [b, t, d]

    return [(f"layers.{i}.{p}", ablate) for i in range(n_layers) for p in ("resid_pre", "attn_out", "mlp_out")]


def addition_hooks(n_layers: int, layer: int, r: torch.Tensor, alpha: float) -> list[tuple[str, Callable]]:
    """h + α r̂ at the residual stream of cache index `layer` (resid_pre of `layer`; the last layer's
    output when layer == n_layers), at every position."""
    name = f"layers.{layer}.resid_pre" if layer < n_layers else f"layers.{n_layers - 1}.resid_post"
    return [(name, lambda h: h + alpha * _unit(r).to(h.dtype))]


# ---- targets ------------------------------------------------------------------------------------

def _strip(ids: list[int], stop: set[int]) -> list[int]:
    return [t for t in ids if t not in stop]


def _before_period(tokenizer, ids: list[int]) -> list[int]:
    """The paper keeps ``text.split(".")[0]``; cut at the first token whose text holds a "." (in token
    space, since decoding and re-encoding is not lossless for byte-level tokenizers)."""
    for j, t in enumerate(ids):
        if "." in tokenizer.decode([t]):
            return ids[:j]
    return ids


def rdo_targets(model, adapter, tokenizer, harmful: Encoded, harmless: Encoded, layer: int, mean_diff: torch.Tensor,
                max_new_tokens: int = 30, batch_size: int = 32, share_prefix: bool = False) -> RdoTargets:
    """The paper's targets: greedy completions (``max_new_tokens``, paper 30) of harmful prompts under
    DIM ablation, of harmless prompts under DIM addition (α = ‖mean_diff‖, cut before the first "."),
    and of harmless prompts unedited (max_new_tokens − 1). With `share_prefix`, the prompts' common
    prefix runs once per batch, under the same hooks (shared_prefix.py; check the model with
    ``can_share_prefix`` first)."""
    alpha = float(mean_diff.double().norm())
    if not alpha > 0:
        raise ObliteratusError("rdo targets: the difference of means at the source layer is zero")
    r = mean_diff.detach().float().to(input_device(model))
    stop = eos_ids(model, tokenizer) | set(tokenizer.all_special_ids)
    with hooked(adapter, ablation_hooks(adapter.n_layers, r)):
        ablation = generate(model, tokenizer, harmful, max_new_tokens, batch_size, share_prefix=share_prefix)
    with hooked(adapter, addition_hooks(adapter.n_layers, layer, r, alpha)):
        addition = generate(model, tokenizer, harmless, max_new_tokens, batch_size, share_prefix=share_prefix)
    retain = generate(model, tokenizer, harmless, max(1, max_new_tokens - 1), batch_size, share_prefix=share_prefix)
    addition = [_before_period(tokenizer, _strip(t, stop)) for t in addition]
    return RdoTargets([_strip(t, stop) for t in ablation], addition, [_strip(t, stop) for t in retain], alpha)


# ---- losses -------------------------------------------------------------------------------------

def _forward(model, batch, keep: int) -> torch.Tensor:
    return model(**batch.inputs(), use_cache=False, logits_to_keep=keep).logits  # [b, keep, vocab]


def _ce_rows(logits: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Per-row mean CE of the targets that end each (left-padded) row; logits are the last
    max_len + 1 positions. Rows without a target give 0. -> [b]"""
    b, keep, _ = logits.shape
    labels = torch.full((b, keep), -100, dtype=torch.long, device=logits.device)
    for j, t in enumerate(targets):
        if t:
            labels[j, keep - len(t):] = torch.tensor(t, device=logits.device)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    count = (labels[:, 1:] != -100).sum(1)  # [b]
    return ce.sum(1) / count.clamp_min(1)


def _retain_rows(model, adapter, batch, targets: list[list[int]], r: torch.Tensor) -> torch.Tensor:
    """Σ over the last prompt position and the target positions of KL(p_ablated ‖ p_original). -> [b]"""
    keep = max(len(t) for t in targets) + 1
    with torch.no_grad():
        base = F.log_softmax(_forward(model, batch, keep).double(), -1)  # [b, keep, V]
    with hooked(adapter, ablation_hooks(adapter.n_layers, r)):
        abl = F.log_softmax(_forward(model, batch, keep).double(), -1)
    kl = (abl.exp() * (abl - base)).sum(-1)  # [b, keep]
    mask = torch.zeros_like(kl, dtype=torch.bool)
    for j, t in enumerate(targets):
        mask[j, keep - len(t) - 1:] = True
    return (kl * mask).sum(1)


class _Problem:
    """The three losses of one step for one direction; backward runs per forward pass."""

    def __init__(self, model, adapter, harmful, harmless, targets: RdoTargets, layer: int, options: RdoOptions):
        self.model, self.adapter, self.harmful, self.harmless = model, adapter, harmful, harmless
        self.targets, self.layer, self.o = targets, layer, options
        self.device = input_device(model)

    def run(self, direction: Callable[[], torch.Tensor], idx: list[int], scale: float, backward: bool) -> float:
        """Σ weighted losses of direction() over the prompt pairs idx, times scale / len(idx)."""
        o, a, L, total = self.o, self.adapter, self.adapter.n_layers, 0.0
        terms = [(o.ablation_weight, self.harmful, self.targets.ablation, "ablation"),
                 (o.addition_weight, self.harmless, self.targets.addition, "addition"),
                 (o.retain_weight, self.harmless, self.targets.retain, "retain")]
        for weight, enc, all_targets, kind in terms:
            if weight == 0:
                continue
            sub_targets = [all_targets[i] for i in idx]
            for batch in enc.subset(idx).batches(o.batch_size, self.device, suffix=sub_targets):
                tg = [sub_targets[i] for i in batch.index]
                r = direction()
                if kind == "retain":
                    rows = _retain_rows(self.model, a, batch, tg, r)
                else:
                    hooks = ablation_hooks(L, r) if kind == "ablation" else addition_hooks(L, self.layer, r, self.targets.alpha)
                    with hooked(a, hooks):
                        rows = _ce_rows(_forward(self.model, batch, max(len(t) for t in tg) + 1), tg)
                loss = weight * scale * rows.sum() / len(idx)
                if backward:
                    loss.backward()
                total += float(loss.detach())
        return total

    def step_loss(self, basis: torch.Tensor, idx: list[int], gen: torch.Generator, backward: bool) -> float:
        """The paper's per-step objective for basis [k, d]: basis vectors (k = 1 or optimize_basis)
        plus n_samples random cone directions (k > 1)."""
        k, total = basis.shape[0], 0.0
        if k > 1 and self.o.n_samples > 0:
            z = torch.randn(self.o.n_samples, k, generator=gen).abs()
            s = (z / z.norm(dim=1, keepdim=True)).to(basis.device)  # [n_samples, k]
            for row in s:
                total += self.run(lambda row=row: _unit(row @ basis), idx, 1 / self.o.n_samples, backward)
        if k == 1 or self.o.optimize_basis:
            for i in range(k):
                total += self.run(lambda i=i: basis[i], idx, 1 / k, backward)
        return total


# ---- optimisation -------------------------------------------------------------------------------

def _check_inputs(harmful: Encoded, harmless: Encoded, targets: RdoTargets) -> int:
    if len(targets.ablation) != len(harmful.ids) or len(targets.addition) != len(harmless.ids) \
            or len(targets.retain) != len(harmless.ids):
        raise PromptError("rdo: targets do not match the prompts (build them with rdo_targets on the same encodings)")
    n = min(len(harmful.ids), len(harmless.ids))
    if n == 0:
        raise PromptError("rdo needs at least one harmful and one harmless prompt")
    return n


def _fit_dim(problem: _Problem, init: torch.Tensor, n: int, options: RdoOptions, gen: torch.Generator,
             progress: Callable[[int], None] | None) -> tuple[torch.Tensor, list[float], int, bool]:
    basis = orthonormalize(init.float()).to(problem.device).requires_grad_(True)  # [k, d], the only leaf
    opt = torch.optim.AdamW([basis], lr=options.lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    per_epoch = max(1, n // options.effective_batch_size)
    max_steps = per_epoch * options.epochs if options.max_steps is None else options.max_steps
    best, best_basis, history, bad, reductions, stopped, steps = float("inf"), basis.detach().clone(), [], 0, 0, False, 0
    order: list[int] = []
    while steps < max_steps:
        if len(order) < min(n, options.effective_batch_size):
            order = torch.randperm(n, generator=gen).tolist()
        idx, order = order[:options.effective_batch_size], order[options.effective_batch_size:]
        opt.zero_grad(set_to_none=True)
        loss = problem.step_loss(basis, idx, gen, backward=True)
        history.append(loss)
        if loss < best * (1 - options.min_delta) or best == float("inf"):
            best, best_basis, bad = loss, basis.detach().clone(), 0
        else:
            bad += 1
            if bad >= options.patience:
                if reductions >= options.n_lr_reduce:
                    stopped = True
                    break
                reductions, bad = reductions + 1, 0
                for group in opt.param_groups:
                    group["lr"] /= 10
        with torch.no_grad():
            basis.grad -= (basis.grad * basis).sum(1, keepdim=True) * basis  # tangent to each unit vector
        torch.nn.utils.clip_grad_norm_([basis], options.grad_clip)
        opt.step()
        with torch.no_grad():
            basis.copy_(orthonormalize(basis, min_rows=len(basis)))  # the k rows must stay independent
        steps += 1
        if progress:
            progress(1)
    return best_basis.float().cpu(), history, steps, stopped


def initial_basis(options: RdoOptions, mean_diff: torch.Tensor) -> torch.Tensor:
    """[1, d] start of the first basis vector: ``options.init`` = "random" (the paper: a standard normal
    vector, seeded by ``options.seed``, normalised) or "diff_means" (the unit difference of means)."""
    if options.init == "diff_means":
        return _unit(mean_diff.double()).float()[None]
    gen = torch.Generator().manual_seed(options.seed)
    return _unit(torch.randn(mean_diff.shape[-1], generator=gen, dtype=torch.float64)).float()[None]


def fit_info(result: RdoResult, reference: torch.Tensor) -> dict:
    """What the optimisation did, for the run's metadata: steps, whether patience stopped it, the
    first and last step losses, the lowest one, and |cos| of each basis vector with `reference` [d]
    (the difference of means)."""
    r = _unit(reference.double())
    h = result.history
    return {"steps": result.steps, "stopped_early": result.stopped_early,
            "first_loss": h[0] if h else None, "last_loss": h[-1] if h else None,
            "best_loss": min(h) if h else None,
            "abs_cos_to_diff_means": [abs(float(v)) for v in result.basis.double() @ r]}


def fit_rdo(model, adapter, harmful_enc: Encoded, harmless_enc: Encoded, targets: RdoTargets, layer: int,
            init_basis: torch.Tensor, options: RdoOptions = RdoOptions(), k: int | None = None,
            progress: Callable[[int], None] | None = None) -> RdoResult:
    """Optimise a k-dimensional refusal cone (k = 1: a direction) at source layer `layer`, starting
    from init_basis [k0, d] (e.g. the DIM direction); rows beyond k0 start random. The model's weights
    are never modified and get no gradient; only the basis is a leaf tensor."""
    k = init_basis.shape[0] if k is None else k
    n = _check_inputs(harmful_enc, harmless_enc, targets)
    if init_basis.shape[0] > k:
        raise ObliteratusError(f"rdo: init_basis has {init_basis.shape[0]} rows, more than k = {k}")
    gen = torch.Generator().manual_seed(options.seed)
    problem = _Problem(model, adapter, harmful_enc, harmless_enc, targets, layer, options)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        basis, history, steps, stopped = init_basis.detach().float().cpu(), [], 0, False
        k0 = init_basis.shape[0]
        first = k0 + 1 if options.grow and k0 < k else k  # RCO: dimension k0 + 1, ..., k in turn
        for dim in range(max(first, 1), k + 1):
            extra = torch.randn(dim - basis.shape[0], basis.shape[1], generator=gen)
            basis, h, s, stopped = _fit_dim(problem, torch.cat([basis, extra]), n, options, gen, progress)
            history, steps = history + h, steps + s
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return RdoResult(basis, history, steps, stopped)


@torch.no_grad()
def rdo_loss(model, adapter, harmful_enc: Encoded, harmless_enc: Encoded, targets: RdoTargets, layer: int,
             basis: torch.Tensor, options: RdoOptions = RdoOptions()) -> float:
    """The weighted objective of basis [k, d] on every prompt pair, basis vectors only (deterministic)."""
    n = _check_inputs(harmful_enc, harmless_enc, targets)
    problem = _Problem(model, adapter, harmful_enc, harmless_enc, targets, layer, options)
    b = orthonormalize(basis.float()).to(problem.device)
    return sum(problem.run(lambda i=i: b[i], list(range(n)), 1 / len(b), backward=False) for i in range(len(b)))


def _needs_model(harmful, harmless, k, options=None):
    raise ObliteratusError("rdo optimises through the model's forward passes: the pipeline must call "
                           "obliteratus.directions.rdo.fit_rdo (after rdo_targets), not the pure fit(harmful, harmless)")


def fit_in_pipeline(ctx: FitContext) -> Basis:
    """The targets from the model's own completions, then the optimisation from `initial_basis`;
    the fit reports :func:`fit_info` under ``"rdo"``."""
    loaded, settings, train = ctx.loaded, ctx.settings, ctx.train
    targets = rdo_targets(loaded.model, loaded.adapter, loaded.tokenizer, train["harmful"], train["harmless"],
                          ctx.layer, ctx.mean_diff, ctx.options.target_tokens, settings.evaluate.batch_size,
                          share_prefix=shares_prefix(loaded.model, train["harmful"], settings))
    init = initial_basis(ctx.options, ctx.mean_diff)
    result = fit_rdo(loaded.model, loaded.adapter, train["harmful"], train["harmless"], targets, ctx.layer, init,
                     ctx.options, k=ctx.k, progress=ctx.task("rdo steps", 0))
    return Basis(result.basis, {"rdo": fit_info(result, ctx.mean_diff)})


register_direction_method(
    "rdo", "refusal direction / cone optimisation through the frozen model (Wollschläger et al. 2025)",
    _needs_model, needs_model=True, options=RdoOptions, pipeline_fit=fit_in_pipeline,
)
