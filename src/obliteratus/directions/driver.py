"""DISTILL driver: contrast groups → per-layer mean differences → source layer → basis.

Each step calls one technique module; this file only wires the settings to them:

* contrast (contrast.py): which two groups of train activations are compared;
* layer choice: Arditi (layers.py), fixed fraction, knee (knee.py), COSMIC (cosmic.py), or a
  fractional index interpolated between layers (interpolate.py, Heretic's direction_index);
* fit: any registered direction method; the ones that need the model (RDO, jailbreak contrast)
  get it here; LEACE's read side when the LEACE edit is asked for;
* per-layer scope: each layer's writers get the direction at that layer's output (Heretic).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from ..batching import Encoded
from ..errors import ConfigError
from ..probe import ActivationCache, collect
from .base import Directions, get_direction_method, orthonormalize
from .contrast import Contrast, filter_by_refusal, final_logits, split_by_refusal
from .cosmic import evaluation_layers, select_cosmic
from .diff_means import mean_difference
from .interpolate import direction_at
from .knee import mean_norms, select_knee
from .layers import (LayerSelection, candidate_layers, refusal_log_odds, refusal_token_ids, select_arditi,
                     select_fixed)
from .project_harmless import orthogonalize_against

if TYPE_CHECKING:
    from ..config import Settings

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def refusal_scores(adapter, tokenizer, acts: torch.Tensor, encoded: Encoded, settings: Settings) -> tuple[torch.Tensor, float]:
    """(score [n], threshold): a prompt counts as refused when score > threshold."""
    ds = settings.directions
    if ds.label == "logodds":  # last token, final residual: no extra forward pass
        return refusal_log_odds(final_logits(adapter, acts[:, -1, -1]), refusal_token_ids(tokenizer)), ds.refusal_threshold
    from ..evaluate.early import judge

    verdicts = judge(adapter.model, tokenizer, encoded, ds.label_tokens, settings.evaluate.batch_size,
                     share_prefix=shares_prefix(adapter.model, encoded, settings))
    return torch.tensor(verdicts.refused, dtype=torch.float64) * 2 - 1, 0.0  # +1 refused, -1 answered


def shares_prefix(model, encoded: Encoded, settings: Settings) -> bool:
    from ..evaluate.prefix import can_share_prefix

    return settings.evaluate.share_prefix and can_share_prefix(model, encoded)


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
    """`mean_diffs` [positions, L+1, d]."""
    ls, n_layers = settings.layers, adapter.n_layers
    if settings.directions.index is not None:
        index = source_index(settings, n_layers)
        if index > n_layers:
            raise ConfigError(f"directions.index = {index} is outside 0..{n_layers}")
        return LayerSelection(round(index), -1, "index")
    if ls.method == "fixed":
        return select_fixed(n_layers, ls)
    if ls.method == "knee":
        norms = mean_norms(contrast.positive[:, -1], contrast.negative[:, -1]) if ls.knee_normalize else None
        return select_knee(mean_diffs[-1], norms, candidate_layers(n_layers, ls))
    n = mean_diffs.shape[0] * len(candidate_layers(n_layers, ls))
    if ls.method == "cosmic":
        eval_layers = evaluation_layers(contrast.positive[:, -1].double().mean(0),
                                        contrast.negative[:, -1].double().mean(0), ls.cosmic_fraction)
        return select_cosmic(model, adapter, mean_diffs, val["harmful"], val["harmless"], ls, settings.excise,
                             eval_fraction=ls.cosmic_fraction, eval_layers=eval_layers,
                             batch_size=settings.evaluate.batch_size, progress=task("score layers (cosmic)", n),
                             orthogonal_to=orthogonal_to, share_prefix=shares_prefix(model, val["harmless"], settings))
    return select_arditi(model, adapter, mean_diffs, val["harmful"], val["harmless"], tokenizer, ls, settings.excise,
                         settings.evaluate.batch_size, task("score layers", n), orthogonal_to,
                         share_prefix=shares_prefix(model, val["harmless"], settings))


def layer_weights(contrast: Contrast, mean_diffs: torch.Tensor, source: int, settings: Settings) -> dict[int, float] | None:
    """Per-layer strengths for layer i's writers from the signal at its output (axis i + 1);
    `mean_diffs` [L+1, d] at the chosen position."""
    ex = settings.excise
    if ex.layer_weights == "none":
        return None
    if ex.layer_weights == "through_source":
        from ..excise.window import window_weights

        w = window_weights(mean_diffs.shape[0] - 1, source)
    elif ex.layer_weights == "spectral":
        from ..excise.spectral import cascade_signal, spectral_weights

        norms = mean_norms(contrast.positive[:, -1], contrast.negative[:, -1])  # [L+1]
        w = spectral_weights(cascade_signal(mean_diffs[1:], norms[1:]), ex.spectral_bands, ex.spectral_decay)
    else:
        from ..analysis.cross_layer import agreement_weights

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
    chosen features; {} for the closed-form methods)."""
    ds = settings.directions
    method = get_direction_method(ds.method)
    k = ds.n_directions if method.max_directions is None else min(ds.n_directions, method.max_directions)
    options = ds.options_for(method.name)
    p, layer = selection.position, selection.layer
    if ds.index is not None:
        if method.name != "diff_means":
            raise ConfigError("directions.index (a fractional layer) interpolates difference-of-means directions; "
                              f"method {method.name!r} does not support it")
        return direction_at(mean_diffs[p], source_index(settings, loaded.adapter.n_layers))[None], {}
    positive, negative = contrast.positive[:, p, layer], contrast.negative[:, p, layer]
    if method.name == "rdo":
        from .rdo import fit_info, fit_rdo, initial_basis, rdo_targets

        targets = rdo_targets(loaded.model, loaded.adapter, loaded.tokenizer, train["harmful"], train["harmless"],
                              layer, mean_diffs[p, layer], options.target_tokens, settings.evaluate.batch_size,
                              share_prefix=shares_prefix(loaded.model, train["harmful"], settings))
        init = initial_basis(options, mean_diffs[p, layer])
        result = fit_rdo(loaded.model, loaded.adapter, train["harmful"], train["harmless"], targets, layer, init,
                         options, k=k, progress=task("rdo steps", 0))
        return result.basis, {"rdo": fit_info(result, mean_diffs[p, layer])}
    if method.name == "jailbreak":
        from .jailbreak import load_jailbreak_templates, wrap_prompts

        wrapped = encode(wrap_prompts(harmful_texts, load_jailbreak_templates()))
        acts = collect(loaded.adapter, wrapped, settings.probe.positions, settings.probe.batch_size,
                       share_prefix=settings.probe.share_prefix)
        return method.fit(positive, negative, k, options, jailbreak=acts[:, p, layer]), {}
    if method.name == "cone":
        from ..analysis.cones import categorise

        return method.fit(positive, negative, k, options, harmful=cache.harmful[:, p, layer],
                          labels=categorise(harmful_texts), harmless=cache.harmless[:, p, layer]), {}
    if method.needs_model:
        raise ConfigError(f"direction method {method.name!r} needs the model and is not wired into the pipeline")
    device = next(loaded.model.parameters()).device  # e.g. the SAE trains where the model lives
    info: dict = {}  # e.g. the SAE's epochs and held-out losses, when the method reports its fit
    report = {"info": info} if method.reports_fit else {}
    basis = method.fit(positive.to(device), negative.to(device), k, options, **report)
    return basis.float().cpu(), ({method.name: info} if method.reports_fit else {})


def distill(loaded, cache: ActivationCache, settings: Settings, val: dict[str, Encoded], train: dict[str, Encoded],
            encode: Callable[[list[str]], Encoded], harmful_texts: list[str], task: Progress,
            selection: LayerSelection | None = None, contrast: Contrast | None = None) -> tuple[Directions, LayerSelection]:
    """Choose the source layer (unless `selection` is given, e.g. shared by runs with the same layer
    settings) and fit the direction method there. `contrast`: the groups of `cache`, when the caller
    has already judged them (contrast_groups generates answers for the filtered/behaviour contrasts)."""
    ds = settings.directions
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
    if settings.excise.method == "leace":
        from .leace import fit_leace

        x = torch.cat([contrast.positive[:, p, layer], contrast.negative[:, p, layer]])  # [n + m, d]
        z = torch.cat([torch.ones(len(contrast.positive)), torch.zeros(len(contrast.negative))])
        eraser = fit_leace(x, z)  # binary concept: rank 1
        scale = eraser.write[0].norm()
        basis = _unit(eraser.write[0].double())[None]  # [1, d]: the range (∝ the mean difference)
        read = (eraser.read[:1] * scale).float()  # rescaled so that read·basisᵀ = 1 still holds
    mean_diff = mean_diffs[p, layer] if ds.index is None else basis[0] * float(mean_diffs[p, layer].norm())
    directions = Directions(orthonormalize(basis) if basis.shape[0] > 1 else basis, ds.method, layer, p, mean_diff,
                            mean_diffs[p].norm(dim=-1).tolist(), contrast.info(), layer_bases=layer_bases, read=read,
                            harmless_mean=harmless_means[p, layer], layer_weights=weights, mean_diffs=mean_diffs[p],
                            fit=fit)
    if ds.index is not None and not math.isclose(ds.index, layer):
        directions.contrast["index"] = ds.index
    return directions, selection
