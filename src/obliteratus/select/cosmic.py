"""COSMIC layer/direction selection: scored by cosine similarity of activations, no generation
and no refusal tokens.

Siu et al. (2025), "COSMIC: Generalized Refusal Direction Identification in LLM Activations",
ACL Findings; facts taken from wang-research-lab/COSMIC ``pipeline/run_pipeline_cosmic.py``
(``compute_and_save_similarity``) and ``pipeline/submodules/select_direction_cosmic.py``
(linear / LCE variant, which is the edit obliteratus makes).

1. Evaluation layers E: per layer, cos(μ_harmful, μ_harmless) of the last-position residual means;
   E = the ⌊fraction·L⌋ (at least 1) layers with the lowest similarity, fraction = 0.1. Only
   decoder-layer outputs are ranked (HF ``hidden_states[1:]``), i.e. our axes 1..L.
2. References: with h_i,e the last-position residual of prompt i at layer e ∈ E,
       b_harmless = unit(mean_{i,e} h_i,e over val harmless),  b_harmful likewise
   (one global vector: the mean over prompts *and* layers, then normalised, as in the code).
3. For each candidate r = Δμ at (position p, layer l), on the validation prompts:
       ablation score  a = cos(mean_{i,e} h̃_i,e(harmful, r ablated from every writer), b_harmless)
       addition score  s = cos(mean_{i,e} ĥ_i,e(harmless, r added at resid_pre of l),   b_harmful)
       score = a + s      (higher is better: ablated harmful looks harmless, steered harmless harmful)
   plus KL(original ‖ ablated) at the last position of the harmless prompts.
4. Candidates from the last ``prune_fraction`` of layers or with KL > ``kl_threshold`` are
   dropped; the highest score wins.

Deviations: the reference code also drops last-position candidates beyond the median peak layer of
the other positions' scores (a heuristic not in the paper) — not done here; E needs at least one
layer for tiny models; our axis L is the final residual before the final norm (HF normalises it);
by default E is ranked on the validation prompts (the pipeline may pass `eval_layers` ranked on the
train cache with :func:`evaluation_layers`, as the reference does).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from ..batching import Encoded
from ..errors import ObliteratusError
from ..shared_prefix import forward_inputs, last_logits
from ..evaluate.kl import kl_rows
from ..excise.hook_form import ablated
from ..hook_points import hooked
from ..models.adapters import ArchitectureAdapter
from .base import SelectContext, register_layer_selector
from .layers import Candidate, LayerSelection, candidate_basis, candidate_layers, window_plan
from ..models.placement import input_device

if TYPE_CHECKING:  # config validates layers.method against this package's registry
    from ..settings import ExciseSettings, LayerSettings

# --- pure math --------------------------------------------------------------------------------


def layer_cosines(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor) -> torch.Tensor:
    """[L+1, d], [L+1, d] -> [L+1] float64: cos(μ_harmful,l, μ_harmless,l)."""
    return torch.nn.functional.cosine_similarity(mean_harmful.double(), mean_harmless.double(), dim=-1)


def evaluation_layers(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor, fraction: float = 0.1) -> list[int]:
    """Axes 1..L (decoder-layer outputs) ranked by ascending cosine; the first max(1, ⌊fraction·L⌋)."""
    n_layers = mean_harmful.shape[0] - 1
    cos = layer_cosines(mean_harmful, mean_harmless)[1:]  # [L]
    keep = max(1, int(fraction * n_layers))
    return [int(i) + 1 for i in torch.argsort(cos, stable=True)[:keep]]


def mean_unit(acts: torch.Tensor) -> torch.Tensor:
    """[n, m, d] -> [d] float64: the mean over prompts and layers, normalised."""
    mean = acts.double().mean(dim=(0, 1))  # [d]
    return mean / mean.norm().clamp_min(1e-30)


def concept_cosine(acts: torch.Tensor, reference: torch.Tensor) -> float:
    """[n, m, d], [d] unit -> cos(mean_{i,e} acts, reference)."""
    return float(mean_unit(acts) @ reference.double())


@dataclass
class CosmicCandidate(Candidate):
    ablation_cos: float = math.nan  # a: ablated harmful vs the harmless reference
    actadd_cos: float = math.nan  # s: steered harmless vs the harmful reference
    score: float = math.nan  # a + s


@dataclass
class CosmicSelection(LayerSelection):
    eval_layers: list[int] = field(default_factory=list)
    base_cos: float | None = None  # a and s without any edit: cos(harmful mean, harmless mean) over E


def pick_cosmic(candidates: list[CosmicCandidate], kl_threshold: float | None) -> CosmicCandidate:
    """Filter (NaN, KL) and take the highest score; mutates statuses."""
    for c in candidates:
        if c.status != "scored":
            continue
        if math.isnan(c.score) or (kl_threshold is not None and math.isnan(c.kl)):
            c.status = "nan"
        elif kl_threshold is not None and c.kl > kl_threshold:
            c.status = "kl>threshold"
    passing = [c for c in candidates if c.status == "scored"]
    if not passing:
        raise ObliteratusError(
            f"cosmic: no candidate layer passed (KL <= layers.kl_threshold = {kl_threshold}); "
            "relax the threshold or use --layer N")
    best = max(passing, key=lambda c: c.score)
    best.status = "chosen"
    return best


# --- model plumbing ---------------------------------------------------------------------------


def _axis_hook(axis: int) -> str:
    return "embed" if axis == 0 else f"layers.{axis - 1}.resid_post"


@torch.inference_mode()
def last_position_acts(adapter: ArchitectureAdapter, encoded: Encoded, axes: list[int], batch_size: int,
                       edit: Callable[[], ContextManager] = nullcontext, share_prefix: bool = False) -> torch.Tensor:
    """``[n, len(axes), d]`` float32 CPU: the last-position residual at each layer axis, in input
    order, with the hooks of `edit()` active. Only the decoder body runs. With `share_prefix`, the
    prompts' common prefix runs once per batch, under the same hooks (shared_prefix.py)."""
    device = input_device(adapter.model)
    prefix = encoded.common_prefix() if share_prefix else None
    out = torch.empty((len(encoded.ids), len(axes), adapter.d_model), dtype=torch.float32)
    buf: dict[int, torch.Tensor] = {}

    def keep(slot: int):
        def fn(h: torch.Tensor):  # h: [b, t, d]
            buf[slot] = h[:, -1, :].to("cpu", torch.float32)

        return fn

    with edit(), hooked(adapter, [(_axis_hook(a), keep(j)) for j, a in enumerate(axes)]):
        for batch in encoded.batches(batch_size, device, prefix=prefix):
            adapter.body(**forward_inputs(adapter.model, batch, runner=adapter.body))  # a prefix pass refills buf
            out[batch.index] = torch.stack([buf[j] for j in range(len(axes))], dim=1)  # [b, m, d]
    return out


@torch.inference_mode()
def select_cosmic(model, adapter: ArchitectureAdapter, mean_diffs: torch.Tensor, val_harmful: Encoded,
                  val_harmless: Encoded, settings: LayerSettings, excise: ExciseSettings, *,
                  eval_fraction: float = 0.1, eval_layers: list[int] | None = None, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None,
                  orthogonal_to: torch.Tensor | None = None, share_prefix: bool = False) -> CosmicSelection:
    """`mean_diffs` ``[positions, L+1, d]`` (train split). Candidates are pruned as in
    :func:`candidate_layers`; `progress(1)` after each scored one. `orthogonal_to` (same shape,
    optional) scores the ablation of r made orthogonal to these vectors, like ``select_arditi``.
    With `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py; check
    the model with ``can_share_prefix`` first)."""
    def acts(encoded: Encoded, axes: list[int], edit: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
        return last_position_acts(adapter, encoded, axes, batch_size, edit, share_prefix)

    def logp() -> torch.Tensor:
        return torch.log_softmax(last_logits(model, val_harmless, batch_size, share_prefix).double(), -1)

    n_axes = adapter.n_layers + 1
    if mean_diffs.ndim != 3 or mean_diffs.shape[1] != n_axes:
        raise ObliteratusError(f"cosmic: mean_diffs must be [positions, {n_axes}, d], got {tuple(mean_diffs.shape)}")
    if eval_layers is None:
        everything = list(range(n_axes))
        h = acts(val_harmful, everything)  # [n, L+1, d]
        b = acts(val_harmless, everything)
        eval_layers = evaluation_layers(h.double().mean(0), b.double().mean(0), eval_fraction)
        base_harmful, base_harmless = h[:, eval_layers], b[:, eval_layers]  # [n, m, d]
    else:
        base_harmful = acts(val_harmful, eval_layers)
        base_harmless = acts(val_harmless, eval_layers)
    n_pos = mean_diffs.shape[0]
    ref_harmful, ref_harmless = mean_unit(base_harmful), mean_unit(base_harmless)  # [d] each
    need_kl = settings.kl_threshold is not None
    base_logp = logp() if need_kl else None
    toggles = dict(attention=excise.attention, mlp=excise.mlp, experts=excise.experts, embeddings=excise.embeddings,
                   biases=excise.biases)
    allowed = set(candidate_layers(adapter.n_layers, settings)) - {adapter.n_layers}  # axis L cannot be steered
    device = input_device(model)
    candidates: list[CosmicCandidate] = []
    for p in range(n_pos):
        for layer in range(n_axes):
            c = CosmicCandidate(layer, p - n_pos)
            candidates.append(c)
            if layer not in allowed:
                c.status = "pruned"
                continue
            r = mean_diffs[p, layer].float()  # [d]
            norm = r.norm()
            if not torch.isfinite(norm) or norm == 0:  # e.g. the embedding of a shared last token
                c.status = "zero-direction"
                if progress:
                    progress(1)
                continue
            q = candidate_basis(r, None if orthogonal_to is None else orthogonal_to[p, layer])
            if q is None:  # r lies along the harmless mean: projected, nothing is left to ablate
                c.status = "zero-direction"
                if progress:
                    progress(1)
                continue
            plan = window_plan(adapter.n_layers, layer, excise)  # None unless layer_weights = through_source
            ablate = lambda: ablated(adapter, q, excise.lam, **toggles, plan=plan)  # noqa: E731
            add = lambda v=r.to(device): hooked(  # noqa: E731
                adapter, {f"layers.{layer}.resid_pre": lambda x: x + v.to(x.dtype)})
            c.ablation_cos = concept_cosine(acts(val_harmful, eval_layers, ablate), ref_harmless)
            c.actadd_cos = concept_cosine(acts(val_harmless, eval_layers, add), ref_harmful)
            c.score = c.ablation_cos + c.actadd_cos
            if need_kl:
                with ablate():
                    now = logp()
                c.kl = float(kl_rows(base_logp, now).mean())
            if progress:
                progress(1)
    best = pick_cosmic(candidates, settings.kl_threshold)
    return CosmicSelection(best.layer, best.position, "cosmic", candidates=candidates, eval_layers=list(eval_layers),
                           base_cos=concept_cosine(base_harmful, ref_harmless))


def _cosmic(ctx: SelectContext) -> CosmicSelection:
    s, c = ctx.settings, ctx.contrast
    ls = s.layers
    n = ctx.mean_diffs.shape[0] * len(candidate_layers(ctx.adapter.n_layers, ls))
    eval_layers = evaluation_layers(c.positive[:, -1].double().mean(0), c.negative[:, -1].double().mean(0),
                                    ls.cosmic_fraction)
    return select_cosmic(ctx.model, ctx.adapter, ctx.mean_diffs, ctx.val["harmful"], ctx.val["harmless"], ls, s.excise,
                         eval_fraction=ls.cosmic_fraction, eval_layers=eval_layers,
                         batch_size=s.evaluate.batch_size, progress=ctx.task("score layers (cosmic)", n),
                         orthogonal_to=ctx.orthogonal_to, share_prefix=ctx.share_prefix())


register_layer_selector("cosmic", "COSMIC's cosine scores of the candidate layers (Siu et al. 2025)", _cosmic)
