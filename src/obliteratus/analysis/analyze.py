"""What `obliteratus analyze MODEL` runs (the verb: commands/analyze.py): every analysis module on one
model, written to OUTPUT/analysis.json.

Steps: SUMMON the model; split the prompt sets as the pipeline does (train for fitting, test held
out); PROBE train and test activations at the last position; choose the direction's layer (given, or
the candidate layer whose difference-of-means direction best separates the *train* activations by
effect size  δ_l = (m₊ − m₋) / sqrt((v₊ + v₋)/2)  of the projections onto r̂_l); then

* cross-layer cosines of the per-layer mean differences (cross_layer.py),
* held-out linear probe accuracy / AUROC per layer (linear_probes.py),
* logit lens of the direction (logit_lens.py),
* activation patching harmful ↔ harmless on a few prompts and layers (patching.py),
* refusal projection of the test prompts before and after the preset's projection edit, the edit
  applied as activation hooks so no weight changes (projection.py; the plain projection with the
  preset's λ and writer toggles — variants such as kernels or Householder are not modelled),
* concept cones by harm category (cones.py), and 2-D PCA per layer (pca.py).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import get_args

import torch

from ..batching import max_positions
from ..settings import deep_merge, resolve_settings
from ..directions.diff_means import mean_difference
from ..select.layers import candidate_layers, refusal_token_ids
from ..errors import ConfigError, PromptError
from ..excise.hook_form import ablated
from ..models.load import describe, summon
from ..data.prompts import read_text
from ..pipeline import prepare_prompts, split_prompt_sets
from ..presets import load_preset
from ..probe import collect
from ..save import check_output, write_atomically
from ..settings_file import saved_settings
from . import cones, linear_probes, logit_lens, patching, pca, projection
from .cross_layer import cosine_matrix


def effect_sizes(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[n, L+1, d], [m, L+1, d] -> [L+1] float64: δ_l of the projections onto r̂_l = unit(mean diff at l)."""
    r = mean_difference(harmful, harmless).double()  # [L+1, d]
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = torch.einsum("nld,ld->nl", harmful.double(), r), torch.einsum("nld,ld->nl", harmless.double(), r)
    pooled = ((a.var(0, unbiased=False) + b.var(0, unbiased=False)) / 2).sqrt().clamp_min(1e-12)  # [L+1]
    return (a.mean(0) - b.mean(0)) / pooled


def read_labels(source: str, prompt_column: str, category_column: str) -> dict[str, str]:
    """Prompt text (whitespace-normalised, casefolded) -> category, from a .csv or .jsonl prompt file."""
    path = Path(source).expanduser()
    if path.suffix not in (".csv", ".jsonl") or not path.is_file():
        raise PromptError(f"--category-column needs data.harmful to be a .csv/.jsonl file, got {source!r}")
    text = read_text(path, PromptError, "prompt file")
    rows = list(csv.DictReader(text.splitlines())) if path.suffix == ".csv" else [
        json.loads(line) for line in text.splitlines() if line.strip()]
    if rows and category_column not in rows[0]:
        raise PromptError(f"{source}: no column {category_column!r}; columns: {', '.join(rows[0])}")
    return {" ".join(str(r.get(prompt_column) or "").split()).casefold(): str(r[category_column]) for r in rows}


def json_ready(x):
    """Tensors to lists and non-finite floats to None, recursively (strict JSON)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def default_patch_layers(layers: list[int], n: int = 5) -> list[int]:
    """Up to n evenly spaced entries of `layers`, first and last included."""
    if len(layers) <= n:
        return list(layers)
    return sorted({layers[round(i * (len(layers) - 1) / (n - 1))] for i in range(n)})


def analyze(model: str, output: str, n_train: int = 64, n_test: int = 32, layers: list[int] | None = None,
            layer: int | None = None, preset: str = "basic", probe_method: str = "logistic",
            patch_prompts: int = 4, patch_layers: list[int] | None = None, patch_positions: int = 1,
            top_k: int = 20, min_category: int = 3, category_column: str | None = None, overwrite: bool = False,
            overrides: dict | None = None) -> dict:
    """Run every analysis on MODEL and write OUTPUT/analysis.json (atomically); returns the same dict.

    `layers`: resid_pre-axis indices (0..L) for the per-layer analyses (default all); `layer`: the
    direction's layer (default: best train effect size among the preset's candidate layers)."""
    methods = get_args(linear_probes.ProbeMethod)
    if probe_method not in methods:  # every check that needs no model runs before SUMMON
        raise ConfigError(f"unknown probe method {probe_method!r}; valid: {', '.join(methods)}")
    for j in [*(layers or []), *(patch_layers or []), *([] if layer is None else [layer])]:
        if j < 0:
            raise ConfigError(f"layer {j} is negative (layers are resid_pre indices 0..n_layers)")
    check_output(output, overwrite, source=model)
    data = {"n_train": n_train, "n_val": 1, "n_test": n_test}
    settings = resolve_settings(load_preset(preset), deep_merge(overrides or {}, {"data": data}))
    splits = split_prompt_sets(settings)
    table = None if category_column is None else read_labels(settings.data.harmful, settings.data.column,
                                                             category_column)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        timings[name] = time.perf_counter() - start
        start = time.perf_counter()

    loaded = summon(model, settings.model)
    adapter, L = loaded.adapter, loaded.adapter.n_layers
    prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
    layers = list(range(L + 1)) if layers is None else list(layers)
    for j in [*layers, *(patch_layers or []), *([] if layer is None else [layer])]:
        if not 0 <= j <= L:
            raise ConfigError(f"layer {j} is outside 0..{L} (resid_pre of layer j; {L} = final residual)")
    lap("summon")

    bs = settings.probe.batch_size
    acts = {key: collect(adapter, prompts.encoded[key], settings.probe.positions, bs,
                         share_prefix=settings.probe.share_prefix)[:, -1]
            for key in ("harmful.train", "harmless.train", "harmful.test", "harmless.test")}  # [n, L+1, d]
    tr_h, tr_s, te_h, te_s = (acts[k] for k in ("harmful.train", "harmless.train", "harmful.test", "harmless.test"))
    lap("probe")

    mean_diffs = mean_difference(tr_h, tr_s)  # [L+1, d]
    delta = effect_sizes(tr_h, tr_s)  # [L+1]
    chosen_by = "given" if layer is not None else "effect_size"
    if layer is None:
        allowed = candidate_layers(L, settings.layers) or list(range(L + 1))
        layer = max(allowed, key=lambda j: float(delta[j]))
    r = mean_diffs[layer]  # [d]
    q = (r / r.norm())[None, :].float()  # [1, d]
    result: dict = {
        "tool": "obliteratus", "model": {k: v for k, v in describe(loaded).items() if k != "config"},
        "settings": saved_settings(settings), "layers": layers,
        "direction": {"layer": layer, "chosen_by": chosen_by,
                      "effect_size": delta, "mean_diff_norms": mean_diffs.norm(dim=-1)},
        "cross_layer_cosines": cosine_matrix(mean_diffs),
        "probe": linear_probes.probe_layers(tr_h[:, layers], tr_s[:, layers], te_h[:, layers], te_s[:, layers], probe_method),
    }
    for row, j in zip(result["probe"], layers):
        row["layer"] = j
    lap("probe_layers")

    result["logit_lens"] = logit_lens.logit_lens(adapter, r, loaded.tokenizer, top_k)
    lap("logit_lens")

    plist = default_patch_layers(layers) if patch_layers is None else list(patch_layers)
    patched = patching.patching(adapter, prompts.encoded["harmful.test"], prompts.encoded["harmless.test"], plist,
                                refusal_token_ids(loaded.tokenizer), patch_positions, patch_prompts,
                                settings.evaluate.batch_size)
    result["patching"] = {name: p.to_dict() for name, p in patched.items()}
    lap("patching")

    ex = settings.excise
    before = projection.compare(te_h[:, layers], te_s[:, layers], r)
    with ablated(adapter, q, ex.lam, attention=ex.attention, mlp=ex.mlp, embeddings=ex.embeddings, biases=ex.biases,
                 experts=ex.experts):
        after = projection.measure(adapter, prompts.encoded["harmful.test"], prompts.encoded["harmless.test"], r,
                                   batch_size=bs)
    after = {k: [v[j] for j in layers] if k == "gap" else {s: [x[j] for j in layers] for s, x in v.items()}
             for k, v in after.items()}
    result["projection"] = {"layers": layers, "before": before, "after": after,
                            "edit": {"lam": ex.lam, "attention": ex.attention, "mlp": ex.mlp,
                                     "embeddings": ex.embeddings, "biases": ex.biases, "form": "activation hooks"}}
    lap("projection")

    if table is not None:
        labels, source = [table.get(p.casefold(), "other") for p in prompts.harmful.train], category_column
    else:
        labels, source = cones.categorise(prompts.harmful.train), "keywords"
    result["cones"] = {"layer": layer, "labels_from": source, **cones.cone(tr_h[:, layer], labels, tr_s[:, layer],
                                                                            min_category),
                       "per_layer": {"layers": layers, **cones.cone_layers(tr_h[:, layers], labels, tr_s[:, layers],
                                                                            min_category)}}
    lap("cones")

    result["pca"] = pca.pca_layers(te_h, te_s, layers)
    lap("pca")
    result["timings_s"] = timings
    result = json_ready(result)

    def fill(tmp: Path) -> None:
        (tmp / "analysis.json").write_text(json.dumps(result, indent=1, allow_nan=False), "utf-8")

    write_atomically(Path(output), overwrite, fill)
    return result


__all__ = ["analyze", "effect_sizes", "read_labels"]
