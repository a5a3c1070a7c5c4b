"""DISTILL driver: contrast groups → per-layer mean differences → source layer → basis.

Each step calls one technique module; this file only wires the settings to them:

* contrast (contrast.py): which two groups of train activations are compared;
* layer choice: the registered layer selector (select/: Arditi, fixed, knee, COSMIC), or a
  fractional index interpolated between layers (select/interpolate.py, Heretic's direction_index);
* fit: the registered direction method, from a FitContext (the model and prompts included, for the
  methods that need them); an excise variant that refits (LEACE's read side) replaces the basis;
* per-layer scope: each layer's writers get the direction at that layer's output (Heretic).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from ..analysis.cross_layer import agreement_weights
from ..batching import Encoded
from ..data.prompts import encode_texts
from ..errors import ConfigError
from ..evaluate.early import judge
from ..excise.base import get_excise_variant
from ..excise.spectral import cascade_signal, spectral_weights
from ..excise.window import window_weights
from ..probe import ActivationCache
from ..select import SelectContext, get_layer_selector
from ..select.interpolate import direction_at
from ..select.knee import mean_norms
from ..select.layers import LayerSelection, refusal_log_odds, refusal_token_ids
from .base import Directions, FitContext, get_direction_method, orthonormalize, shares_prefix
from .contrast import Contrast, filter_by_refusal, final_logits, split_by_refusal
from .diff_means import mean_difference
from .project_harmless import orthogonalize_against
from ..models.placement import input_device

if TYPE_CHECKING:
    from ..pipeline import PromptSets
    from ..run import Reporter
    from ..settings import Settings

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def refusal_scores(adapter, tokenizer, acts: torch.Tensor, encoded: Encoded, settings: Settings) -> tuple[torch.Tensor, float]:
    """(score [n], threshold): a prompt counts as refused when score > threshold."""
    ds = settings.directions
    if ds.label == "logodds":  # last token, final residual: no extra forward pass
        return refusal_log_odds(final_logits(adapter, acts[:, -1, -1]), refusal_token_ids(tokenizer)), ds.refusal_threshold

    verdicts = judge(adapter.model, tokenizer, encoded, ds.label_tokens, settings.evaluate.batch_size,
                     share_prefix=shares_prefix(adapter.model, encoded, settings))
    return torch.tensor(verdicts.refused, dtype=torch.float64) * 2 - 1, 0.0  # +1 refused, -1 answered


def contrast_groups(adapter, tokenizer, cache: ActivationCache, settings: Settings,
                    train: dict[str, Encoded]) -> Contrast:
    ds = settings.directions
    if ds.contrast == "prompts":
        return Contrast(cache.harmful, cache.harmless, "prompts")
    score, threshold = refusal_scores(adapter, tokenizer, cache.harmful, train["harmful"], settings)
    if ds.contrast == "filtered":
        score_harmless, _ = refusal_scores(adapter, tokenizer, cache.harmless, train["harmless"], settings)
        c = filter_by_refusal(cache.harmful, cache.harmless, score, score_harmless, threshold, ds.min_group)
    else:
        c = split_by_refusal(cache.harmful, cache.harmless, score, threshold, ds.min_group)
    c.labels = ds.label
    return c


def choose_layer(model, adapter, tokenizer, contrast: Contrast, mean_diffs: torch.Tensor, val: dict[str, Encoded],
                 settings: Settings, task: Progress, orthogonal_to: torch.Tensor | None) -> LayerSelection:
    """`mean_diffs` [positions, L+1, d]. directions.index, else the registered layer selector (select/)."""
    n_layers = adapter.n_layers
    if settings.directions.index is not None:
        index = source_index(settings, n_layers)
        if index > n_layers:
            raise ConfigError(f"directions.index = {index} is outside 0..{n_layers}")
        return LayerSelection(round(index), -1, "index")
    ctx = SelectContext(model, adapter, tokenizer, contrast, mean_diffs, val, settings, task, orthogonal_to,
                        share_prefix=lambda: shares_prefix(model, val["harmless"], settings))
    return get_layer_selector(settings.layers.method).select(ctx)


def layer_weights(contrast: Contrast, mean_diffs: torch.Tensor, source: int, settings: Settings) -> dict[int, float] | None:
    """Per-layer strengths for layer i's writers from the signal at its output (axis i + 1);
    `mean_diffs` [L+1, d] at the chosen position."""
    ex = settings.excise
    if ex.layer_weights == "none":
        return None
    if ex.layer_weights == "through_source":
        w = window_weights(mean_diffs.shape[0] - 1, source)
    elif ex.layer_weights == "spectral":
        norms = mean_norms(contrast.positive[:, -1], contrast.negative[:, -1])  # [L+1]
        w = spectral_weights(cascade_signal(mean_diffs[1:], norms[1:]), ex.spectral_bands, ex.spectral_decay)
    else:
        w = agreement_weights(mean_diffs, source, ex.informed_floor)[1:]
    return {i: float(v) for i, v in enumerate(w.tolist())}


def source_index(settings: Settings, n_layers: int) -> float:
    """directions.index on the resid_pre axis (0 = embeddings, n_layers = final residual)."""
    ds = settings.directions
    return ds.index * n_layers if ds.index_relative else ds.index


def _unit(v: torch.Tensor) -> torch.Tensor:
    return (v / v.norm().clamp_min(1e-12)).float()


def fit_basis(loaded, contrast: Contrast, selection: LayerSelection, mean_diffs: torch.Tensor, settings: Settings,
              train: dict[str, Encoded], encode: Callable[[list[str]], Encoded], harmful_texts: list[str],
              task: Progress, cache: ActivationCache) -> tuple[torch.Tensor, dict]:
    """[k, d] orthonormal basis at the selected layer and position, and what the method reports about
    its fit (RDO: steps, losses, cosine to the difference of means; SAE: epochs, held-out losses,
    chosen features; {} for the closed-form methods). Every method is fitted the same way, from a
    FitContext (directions/base.py)."""
    ds = settings.directions
    method = get_direction_method(ds.method)
    k = ds.n_directions if method.max_directions is None else min(ds.n_directions, method.max_directions)
    options = ds.options_for(method.name)
    p, layer = selection.position, selection.layer
    if ds.index is not None:
        if not method.fractional_index:
            raise ConfigError("directions.index (a fractional layer) interpolates difference-of-means directions; "
                              f"method {method.name!r} does not support it")
        return direction_at(mean_diffs[p], source_index(settings, loaded.adapter.n_layers))[None], {}
    ctx = FitContext(contrast.positive[:, p, layer], contrast.negative[:, p, layer], k, options, layer, p,
                     mean_diffs[p, layer], device=input_device(loaded.model), loaded=loaded,
                     settings=settings, train=train, encode=encode, harmful_texts=harmful_texts, cache=cache, task=task)
    fitted = method.fit_context(ctx)
    return fitted.rows, fitted.fit


def distill(loaded, cache: ActivationCache, prompts: PromptSets, settings: Settings, reporter: Reporter,
            selection: LayerSelection | None = None, contrast: Contrast | None = None) -> tuple[Directions, LayerSelection]:
    """Choose the source layer (unless `selection` is given, e.g. shared by runs with the same layer
    settings) and fit the direction method there, from the train and val parts of `prompts`.
    `contrast`: the groups of `cache`, when the caller has already judged them (contrast_groups
    generates answers for the filtered/behaviour contrasts)."""
    ds = settings.directions
    task = reporter.task
    train, val = ({cls: prompts.encoded[f"{cls}.{part}"] for cls in ("harmful", "harmless")} for part in ("train", "val"))
    harmful_texts = prompts.harmful.train

    def encode(texts: list[str]) -> Encoded:
        return encode_texts(loaded.tokenizer, settings, texts)

    if contrast is None:
        contrast = contrast_groups(loaded.adapter, loaded.tokenizer, cache, settings, train)
    mean_diffs = mean_difference(contrast.positive, contrast.negative)  # [positions, L+1, d]
    harmless_means = cache.harmless.double().mean(0).float()  # [positions, L+1, d]
    project = harmless_means if ds.project_harmless else None
    if selection is None:
        selection = choose_layer(loaded.model, loaded.adapter, loaded.tokenizer, contrast, mean_diffs, val, settings,
                                 task, project)
    p, layer = selection.position, selection.layer
    basis, fit = fit_basis(loaded, contrast, selection, mean_diffs, settings, train, encode, harmful_texts, task,
                           cache)
    raw = basis
    if project is not None:
        basis = orthogonalize_against(basis, harmless_means[p, layer])
    layer_bases = None
    if ds.biproject:  # the settings guarantee project_harmless and the global scope
        layer_bases = {i: orthogonalize_against(raw, harmless_means[p, i + 1]) for i in range(loaded.adapter.n_layers)}
    if ds.scope == "per_layer":  # layer i's writers use the direction at its output (resid_pre of i + 1)
        if basis.shape[0] != 1:
            raise ConfigError("directions.scope = 'per_layer' uses one difference-of-means direction per layer; "
                              "set n_directions = 1")
        layer_bases = {}
        for i in range(loaded.adapter.n_layers):
            r = _unit(mean_diffs[p, i + 1].double())[None]
            layer_bases[i] = orthogonalize_against(r, harmless_means[p, i + 1]) if project is not None else r
    weights = layer_weights(contrast, mean_diffs[p], layer, settings)
    read = None
    refit = get_excise_variant(settings.excise.method).refit  # e.g. LEACE fits its own (basis, read side)
    if refit is not None:
        basis, read = refit(contrast.positive[:, p, layer], contrast.negative[:, p, layer])  # [1, d], [1, d]
    mean_diff = mean_diffs[p, layer] if ds.index is None else basis[0] * float(mean_diffs[p, layer].norm())
    directions = Directions(orthonormalize(basis) if basis.shape[0] > 1 else basis, ds.method, layer, p, mean_diff,
                            mean_diffs[p].norm(dim=-1).tolist(), contrast.info(), layer_bases=layer_bases, read=read,
                            harmless_mean=harmless_means[p, layer], layer_weights=weights, mean_diffs=mean_diffs[p],
                            fit=fit)
    if ds.index is not None and not math.isclose(ds.index, layer):
        directions.contrast["index"] = ds.index
    return directions, selection
