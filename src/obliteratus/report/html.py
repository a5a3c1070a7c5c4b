"""``report.html`` for a run directory: one self-contained page (inline CSS, figures embedded as
base64 PNG data URIs, no scripts, no external resource) that opens offline, plus the same figures
as PNG files under ``plots/``.

Inputs, all from the run directory (REBIRTH, save.py):
  obliteratus.json         metadata (record.RunRecord): directions.layer_norms,
                           selection.candidates (bypass / induce / kl), metrics_before/after
                           (refusal, over_refusal, kl_per_position, ...), edit, settings, timings
  directions.safetensors   ``mean_diffs`` [L+1, d] when the run saved it → cross-layer cosine map
                           (and the per-layer norms when obliteratus.json has none: optimizer runs)
  pca.json                 PCA coordinates of the train prompts' activations at a few layers, written
                           by every run (analysis/pca.py ``run_pca``): ``{"layers": [{"layer": j,
                           "harmful": [[x, y], ...], "harmless": [...], "explained": [...]}, ...]}``
  analysis.json (optional) what ``obliteratus analyze`` writes; its ``pca`` rows are used when the
                           run has no pca.json
A panel whose input is missing is replaced by a one-line note saying why; nothing is invented.
Any ``scheme://`` in displayed text is written with ``&#x2F;`` so the page holds no URL at all.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from ..analysis.cross_layer import cosine_matrix
from ..data.prompts import read_text
from ..errors import ObliteratusError
from ..record import METRIC_ROWS
from . import plots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}h1{font-size:1.5rem}h2{font-size:1.15rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem;margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;
padding:.25rem .6rem;text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f5f5f5}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
.note{color:#8a6d3b;background:#fcf8e3;border:1px solid #faebcc;padding:.4rem .7rem;border-radius:4px}
pre{background:#f7f7f7;padding:.7rem;overflow:auto;font-size:.8rem}
"""

RATE_ROWS = (("refusal", "refusal"), ("over-refusal", "over_refusal"),
             ("over-refusal (sensitive)", "over_refusal_sensitive"))


def esc(value) -> str:
    return html.escape(str(value)).replace("://", ":&#x2F;&#x2F;")


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else esc(v)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _norms(meta: dict) -> list[float] | None:
    norms = meta.get("directions", {}).get("layer_norms")
    if norms and isinstance(norms[0], list):  # one row per kept position: the last one is the default
        norms = norms[-1]
    return norms or None


def load_mean_diffs(run_dir: Path):
    """[L+1, d] per-layer mean differences, or None when the run did not save them."""
    path = run_dir / "directions.safetensors"
    if not path.is_file():
        return None

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("mean_diffs") if "mean_diffs" in f.keys() else None


def load_pca(run_dir: Path) -> tuple[dict, str] | None:
    """({layer: {"harmful": [[x, y], ...], "harmless": ...}}, file name) from the run's ``pca.json``
    (written by every run: analysis/pca.py ``run_pca``), else from an ``analysis.json`` that
    ``obliteratus analyze`` wrote into the run directory; None when neither holds PCA coordinates.
    Both hold a list of {"layer", "harmful", "harmless", ...} rows; a {layer: {...}} table is read too."""
    for name, key in (("pca.json", "layers"), ("analysis.json", "pca")):
        path = run_dir / name
        if not path.is_file():
            continue
        data = read_json(path)
        rows = data.get(key) if isinstance(data, dict) else None
        if isinstance(rows, list):
            rows = {str(r.get("layer", i)): r for i, r in enumerate(rows) if isinstance(r, dict)}
        if not isinstance(rows, dict):
            continue
        panels = {str(k): v for k, v in rows.items() if isinstance(v, dict) and ("harmful" in v or "harmless" in v)}
        if panels:
            return panels, name
    return None


def panels(meta: dict, run_dir: Path) -> list[tuple[str, str, Callable[[], bytes] | None, str]]:
    """(file stem, caption, figure thunk or None, note when None) for every panel, in page order."""
    out = []
    d, sel = meta.get("directions", {}), meta.get("selection", {}) or {}
    before, after = meta.get("metrics_before", {}) or {}, meta.get("metrics_after", {}) or {}
    diffs = load_mean_diffs(run_dir)
    norms = _norms(meta)
    if norms is None and diffs is not None:  # e.g. an optimizer run: its metadata keeps no per-layer norms
        norms = (diffs if diffs.ndim == 2 else diffs[-1]).double().norm(dim=-1).tolist()
    out.append(("layer_norms", "‖mean(harmful) − mean(harmless)‖ per layer; the source layer in red.",
                (lambda: plots.layer_norms(norms, d.get("layer"))) if norms else None,
                "no per-layer norms in obliteratus.json"))
    search = meta.get("optimize") or {}
    if search.get("pareto"):  # an optimizer run: its search's scores are the study's front
        out.append(("selection", "The optimizer's choice: validation refusal rate against first-token KL of the "
                                 "trials on the study's Pareto front, the baked trial circled.",
                    lambda: plots.pareto_front(search["pareto"], search.get("trial"), search.get("target_refusal")),
                    ""))
    else:
        cands = [c for c in sel.get("candidates", []) if c.get("bypass") is not None]
        scored = [c for c in cands if c["bypass"] == c["bypass"]]  # not NaN
        out.append(("selection", "Layer selection: refusal log-odds with the candidate direction ablated (bypass) or "
                                 "added (induce), and KL on harmless prompts.",
                    (lambda: plots.selection_scores(scored, sel.get("baseline_refusal"))) if scored else None,
                    f"layer selection {sel.get('method', '?')!s} scores no candidates"))
    if diffs is not None:
        cos = cosine_matrix(diffs if diffs.ndim == 2 else diffs[-1]).tolist()  # [L+1, L+1]
    out.append(("cosine", "Cosine between the per-layer refusal directions (mean differences).",
                (lambda: plots.cosine_heatmap(cos)) if diffs is not None else None,
                "directions.safetensors has no per-layer mean_diffs: cross-layer cosine map skipped"))
    rates = [(name, before.get(k), after.get(k)) for name, k in RATE_ROWS
             if before.get(k) is not None or after.get(k) is not None]
    out.append(("refusal", "Refusal (harmful test) and over-refusal (harmless test) before and after the edit.",
                (lambda: plots.before_after(rates)) if rates else None, "no refusal metrics in obliteratus.json"))
    kl = after.get("kl_per_position")
    out.append(("kl_per_position", "KL(original ‖ edited) at each generated position, harmless test prompts.",
                (lambda: plots.kl_per_position(kl)) if kl else None, "no metrics_after.kl_per_position"))
    pca = load_pca(run_dir)
    out.append(("pca", "2-D PCA of harmful (red) and harmless (blue) activations at a few layers (the source layer "
                       f"among them), from {pca[1] if pca else 'pca.json'}.",
                (lambda: plots.pca_panels(pca[0])) if pca else None, "no pca.json or analysis.json with PCA coordinates"))
    return out


FIGURE_TITLES = {"layer_norms": "direction norm per layer", "selection": "layer selection / Pareto front",
                 "cosine": "cosine between layer directions", "refusal": "refusal before and after",
                 "kl_per_position": "KL per generated position", "pca": "PCA of the activations"}


def figures(run_dir: str | Path) -> list[tuple[Path, str]]:
    """The figures :func:`build_report` wrote under ``plots/`` (page order), each with a short title:
    what the web app shows inline. A run saved without matplotlib has none."""
    plots_dir = Path(run_dir) / "plots"
    return [(plots_dir / f"{stem}.png", title) for stem, title in FIGURE_TITLES.items()
            if (plots_dir / f"{stem}.png").is_file()]


def read_json(path: Path):
    """A run file's JSON, or an ObliteratusError naming the file and what is wrong with it."""
    try:
        return json.loads(read_text(path, ObliteratusError, "run file"))
    except json.JSONDecodeError as err:
        raise ObliteratusError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def build_report(run_dir: str | Path) -> Path:
    """Write ``plots/*.png`` and ``report.html`` into `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "obliteratus.json"
    if not meta_path.is_file():
        raise ObliteratusError(f"{run_dir} has no obliteratus.json: not an obliteratus run directory")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise ObliteratusError(f"{meta_path}: a JSON object is expected, not {type(meta).__name__}")
    for key in ("model", "directions", "selection", "edit", "metrics_before", "metrics_after", "timings_s",
                "settings", "optimize"):
        if not isinstance(meta.get(key, {}), (dict, type(None))):
            raise ObliteratusError(f"{meta_path}: {key!r} should be a JSON object, not {type(meta[key]).__name__} "
                                   "(not written by obliteratus?)")

    missing = None if importlib.util.find_spec("matplotlib") else \
        "matplotlib is not installed (pip install 'obliteratus[report]'): figures skipped"
    figures = []
    plots_dir = run_dir / "plots"
    for stem, caption, make, note in panels(meta, run_dir):
        if make is None or missing:
            figures.append(f'<p class="note">{esc(stem.replace("_", " "))} panel skipped: {esc(missing or note)}</p>')
            continue
        png = make()
        plots_dir.mkdir(exist_ok=True)
        (plots_dir / f"{stem}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        figures.append(f'<figure><img alt="{esc(stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    path = run_dir / "report.html"
    path.write_text(page(meta, figures), "utf-8")
    return path


def page(meta: dict, figures: list[str]) -> str:
    model, d, sel, edit = meta.get("model", {}), meta.get("directions", {}), meta.get("selection", {}) or {}, \
        meta.get("edit", {})
    before, after = meta.get("metrics_before", {}) or {}, meta.get("metrics_after", {}) or {}
    title = f"{Path(str(model.get('source', 'model'))).name} · {meta.get('preset', '?')}"
    summary = _table(["", ""], [
        ["model", model.get("source")], ["family", model.get("family")], ["layers", model.get("n_layers")],
        ["preset", meta.get("preset")], ["direction method", d.get("method")], ["k", d.get("k")],
        ["source layer", d.get("layer")], ["position", d.get("position")], ["layer selection", sel.get("method")],
        ["lambda", edit.get("lam")], ["norm-preserving", edit.get("norm_preserve")],
        ["tensors edited", len(edit.get("edited", []))], ["seed", meta.get("seed")]])
    metrics = _table(["metric", "before", "after"], [[name, before.get(k), after.get(k)] for name, k in METRIC_ROWS
                                                     if before.get(k) is not None or after.get(k) is not None])
    timings = meta.get("timings_s") or {}
    times = _table(list(timings), [[float(t) for t in timings.values()]]) if timings else ""
    settings = esc(json.dumps(meta.get("settings", {}), indent=2, default=str))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>obliteratus report — {esc(title)}</h1>"
            f"<h2>Run</h2>{summary}<h2>Metrics (held-out test prompts)</h2>{metrics}"
            f"<h2>Figures</h2>{''.join(figures)}<h2>Stage times (s)</h2>{times}"
            f"<h2>Settings</h2><details><summary>resolved settings</summary><pre>{settings}</pre></details>"
            "</body></html>\n")
