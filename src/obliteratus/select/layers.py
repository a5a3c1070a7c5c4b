"""Layer (and position) selection.

``arditi`` follows Arditi et al. (2024), appendix C / ``select_direction.py`` of their code: for
every candidate source layer l (and kept position p), take the difference-of-means direction r
and measure, on the **validation** prompts,

* bypass score: mean refusal log-odds on harmful prompts with r ablated from every residual
  writer (the edit, done with hooks) — lower is better;
* induce score: mean refusal log-odds on harmless prompts with r added at layer l — must be
  above ``induce_threshold`` (0), i.e. the direction must actually cause refusal (with
  ``induce_relative``: above the un-steered harmless log-odds plus the threshold, for small models
  where one layer's addition raises refusal but not past even odds);
* KL score: mean KL at the last position between the original and the ablated model on harmless
  prompts — must not exceed ``kl_threshold`` (0.1).

Layers in the last ``prune_fraction`` (20%) of the model are never chosen. Among the candidates
that pass, the lowest bypass score wins. Refusal log-odds = log p(R) − log(1 − p(R)) where p(R)
is the next-token probability mass on refusal-start tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..batching import Encoded
from ..errors import ObliteratusError
from ..shared_prefix import last_logits
from ..evaluate.kl import kl_rows
from ..excise.hook_form import ablated
from ..excise.plan import EditPlan, layer_strength
from ..excise.window import window_weights
from ..hook_points import hooked
from ..models.adapters import ArchitectureAdapter
from ..directions.project_harmless import orthogonalize_against
from .base import SelectContext, register_layer_selector
from ..models.placement import input_device

if TYPE_CHECKING:  # config validates layers.method against this package's registry
    from ..settings import ExciseSettings, LayerSettings

REFUSAL_STARTS = ("I", "As", "Sorry", "I'm", "Unfortunately", "I cannot", "I can't", "No")


def refusal_token_ids(tokenizer) -> list[int]:
    """First token of each common refusal opening, as the model would emit it at the start of its turn."""
    ids = []
    for text in REFUSAL_STARTS:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    return ids


def refusal_log_odds(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """[n, vocab] -> [n]: log p(R) − log(1 − p(R)), p(R) = Σ_{t ∈ R} softmax(logits)_t."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    log_pr = torch.logsumexp(logp[:, token_ids], dim=-1)  # [n]
    return log_pr - torch.log1p(-log_pr.exp().clamp(max=1 - 1e-12))


@dataclass
class Candidate:
    layer: int
    position: int
    bypass: float = math.nan
    induce: float | None = None
    kl: float = math.nan
    status: str = "scored"  # scored | pruned | kl>threshold | no-induce | chosen


@dataclass
class LayerSelection:
    layer: int
    position: int
    method: str
    baseline_refusal: float | None = None  # val harmful log-odds without any edit
    candidates: list[Candidate] = field(default_factory=list)
    baseline_harmless: float | None = None  # val harmless log-odds without any edit

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_layers(n_layers: int, settings: LayerSettings) -> list[int]:
    first = math.ceil(settings.min_fraction * n_layers)
    last = int(n_layers * (1.0 - settings.prune_fraction))  # exclusive, as in Arditi et al.
    return list(range(first, last))


def select_fixed(n_layers: int, settings: LayerSettings) -> LayerSelection:
    layer = settings.layer if settings.layer is not None else int(settings.fraction * n_layers)  # Sumandora: int()
    if not 0 <= layer <= n_layers:
        raise ObliteratusError(f"layers.layer = {layer} is outside 0..{n_layers}")
    return LayerSelection(layer, -1, "fixed")


def pick(candidates: list[Candidate], settings: LayerSettings, harmless_baseline: float = 0.0) -> Candidate:
    """Pure filter-and-argmin over scored candidates (mutates their status). With
    ``settings.induce_relative`` the induce threshold is added to `harmless_baseline`."""
    induce_floor = None if settings.induce_threshold is None else (
        settings.induce_threshold + (harmless_baseline if settings.induce_relative else 0.0))
    for c in candidates:
        if c.status != "scored":
            continue
        if any(math.isnan(x) for x in (c.bypass, c.kl)):
            c.status = "nan"
        elif settings.kl_threshold is not None and c.kl > settings.kl_threshold:
            c.status = "kl>threshold"
        elif induce_floor is not None and c.induce is not None and c.induce < induce_floor:
            c.status = "no-induce"
    passing = [c for c in candidates if c.status == "scored"]
    if not passing:
        scored = sorted((c for c in candidates if c.status not in ("pruned", "zero-direction")),
                        key=lambda c: (math.isnan(c.bypass), c.bypass))[:3]
        if not scored:
            zero = sorted({c.layer for c in candidates if c.status == "zero-direction"})
            why = (f"the difference of means is zero at every candidate layer {zero} (the prompts' last tokens look "
                   "the same there, e.g. a chat template's closing tokens seen by layers that reach only a few tokens "
                   "back), and no other layer is a candidate" if zero else "every layer is pruned")
            raise ObliteratusError(f"no candidate layer to score: {why} (layers.min_fraction, layers.prune_fraction; "
                                   "the final residual never is a candidate). Choose the layer: --layer N")
        best = "; ".join(f"layer {c.layer}: bypass {c.bypass:.2f}, kl {c.kl:.3f}, induce "
                         f"{'-' if c.induce is None else f'{c.induce:.2f}'} ({c.status})" for c in scored)
        raise ObliteratusError(
            f"no candidate layer passed the filters (KL <= layers.kl_threshold = {settings.kl_threshold}, induce "
            f">= {induce_floor}); lowest bypass: {best}. Relax the thresholds or use --layer N"
        )
    best = min(passing, key=lambda c: c.bypass)
    best.status = "chosen"
    return best


def candidate_basis(r: torch.Tensor, harmless_mean: torch.Tensor | None) -> torch.Tensor | None:
    """The [1, d] basis a layer candidate ablates: r normalised, projected off `harmless_mean` when
    given (projected abliteration); None when nothing is left (r lies along the harmless mean)."""
    q = (r / r.norm())[None, :]
    if harmless_mean is not None:
        q = orthogonalize_against(q, harmless_mean, min_rows=0)
    return q if len(q) else None


def window_plan(n_layers: int, layer: int, excise: ExciseSettings) -> EditPlan | None:
    """The edit a candidate at resid_pre index `layer` would get: the source window's writers when
    ``excise.layer_weights = "through_source"`` (excise/window.py), else None (every writer)."""
    if excise.layer_weights != "through_source":
        return None
    weights = window_weights(n_layers, layer)
    return EditPlan(strength=layer_strength(weights, n_layers, attention=excise.attention, mlp=excise.mlp,
                                            embeddings=excise.embeddings))


@torch.inference_mode()
def select_arditi(model, adapter: ArchitectureAdapter, mean_diffs: torch.Tensor, val_harmful: Encoded,
                  val_harmless: Encoded, tokenizer, settings: LayerSettings, excise: ExciseSettings,
                  batch_size: int = 32, on_candidate: Callable[[int], None] | None = None,
                  orthogonal_to: torch.Tensor | None = None, share_prefix: bool = False) -> LayerSelection:
    """`mean_diffs`: ``[positions, n_layers + 1, d]`` harmful − harmless means from the train split.
    `orthogonal_to` (same shape, optional): score the ablation of r made orthogonal to these vectors
    (the harmless means, for projected abliteration); the induce test still adds the raw r.
    With `share_prefix`, the prompts' common prefix runs once per batch (shared_prefix.py;
    check the model with ``can_share_prefix`` first)."""
    n_pos = mean_diffs.shape[0]
    tokens = refusal_token_ids(tokenizer)

    def logits(encoded: Encoded) -> torch.Tensor:
        return last_logits(model, encoded, batch_size, share_prefix)

    base_harmless = torch.log_softmax(logits(val_harmless).double(), -1)
    baseline = float(refusal_log_odds(logits(val_harmful), tokens).mean())
    harmless_baseline = float(refusal_log_odds(base_harmless, tokens).mean())
    toggles = dict(attention=excise.attention, mlp=excise.mlp, experts=excise.experts, embeddings=excise.embeddings,
                   biases=excise.biases)
    allowed = set(candidate_layers(adapter.n_layers, settings))
    candidates: list[Candidate] = []
    for p in range(n_pos):
        position = p - n_pos  # negative offset from the end
        for layer in range(adapter.n_layers + 1):
            c = Candidate(layer, position)
            candidates.append(c)
            if layer not in allowed:
                c.status = "pruned"
                continue
            r = mean_diffs[p, layer].float()  # [d]
            if not float(r.norm()) > 1e-8 * float(mean_diffs[p].norm(dim=-1).max()):
                c.status = "zero-direction"  # e.g. the embedding of a fixed template token: nothing to ablate
                if on_candidate:
                    on_candidate(1)
                continue
            q = candidate_basis(r, None if orthogonal_to is None else orthogonal_to[p, layer])
            if q is None:
                c.status = "zero-direction"
                if on_candidate:
                    on_candidate(1)
                continue
            with ablated(adapter, q, excise.lam, **toggles, plan=window_plan(adapter.n_layers, layer, excise)):
                c.bypass = float(refusal_log_odds(logits(val_harmful), tokens).mean())
                now = torch.log_softmax(logits(val_harmless).double(), -1)
                c.kl = float(kl_rows(base_harmless, now).mean())
            if settings.induce_threshold is not None and layer < adapter.n_layers and not (
                    settings.kl_threshold is not None and c.kl > settings.kl_threshold):  # already out: skip
                vec = r.to(input_device(model))
                with hooked(adapter, {f"layers.{layer}.resid_pre": lambda h, v=vec: h + v.to(h.dtype)}):
                    c.induce = float(refusal_log_odds(logits(val_harmless), tokens).mean())
            if on_candidate:
                on_candidate(1)
    best = pick(candidates, settings, harmless_baseline)
    return LayerSelection(best.layer, best.position, "arditi", baseline, candidates, harmless_baseline)


def _fixed(ctx: SelectContext) -> LayerSelection:
    return select_fixed(ctx.adapter.n_layers, ctx.settings.layers)


def _arditi(ctx: SelectContext) -> LayerSelection:
    s = ctx.settings
    n = ctx.mean_diffs.shape[0] * len(candidate_layers(ctx.adapter.n_layers, s.layers))
    return select_arditi(ctx.model, ctx.adapter, ctx.mean_diffs, ctx.val["harmful"], ctx.val["harmless"], ctx.tokenizer,
                         s.layers, s.excise, s.evaluate.batch_size, ctx.task("score layers", n), ctx.orthogonal_to,
                         share_prefix=ctx.share_prefix())


register_layer_selector("arditi", "Arditi et al.'s bypass / induce / KL scores of every candidate layer's "
                                  "difference of means on the validation prompts", _arditi)
register_layer_selector("fixed", "a fixed layer, or int(fraction * n_layers) (Sumandora's rule)", _fixed)
