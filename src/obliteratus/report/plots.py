"""The report's figures, each a pure function from plain data (lists, dicts) to PNG bytes.

matplotlib is an optional extra, imported lazily with the Agg backend (no display needed)."""

from __future__ import annotations

import importlib.util
import io
import math


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def ready() -> bool:
    """Import matplotlib now if it is installed (False if not): a long-running app (obliteratus ui) does
    it once at start, so that two threads never import it at the same time."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    _plt()
    return True


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _layer_label(i: int) -> str:
    return "emb" if i == 0 else str(i)


def layer_norms(norms: list[float], chosen: int | None = None) -> bytes:
    """Bar chart of ‖mean(harmful) − mean(harmless)‖ per residual position (0 = embeddings)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    colors = ["#d62728" if i == chosen else "#1f77b4" for i in range(len(norms))]
    ax.bar(range(len(norms)), norms, color=colors)
    ax.set_xlabel("layer (resid_pre index; 0 = embeddings)")
    ax.set_ylabel("‖mean diff‖")
    ax.set_title("Direction norm per layer" + (f" (source layer {chosen} in red)" if chosen is not None else ""))
    return _png(fig)


def pareto_front(front: list[dict], picked: int | None = None, target: float | None = None,
                 trials: list[dict] | None = None) -> bytes:
    """The optimizer's Pareto front: validation refusal rate against first-token KL of each front
    trial (``optimize.pareto`` rows: number, refusal, kl), the picked trial circled, the refusal
    target dashed; with `trials` (rows of the same shape) every completed trial as a grey dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    if trials:
        ax.plot([r["kl"] for r in trials], [r["refusal"] for r in trials], "o", color="#bbbbbb", ms=3,
                label=f"completed trials ({len(trials)})")
    rows = sorted(front, key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in rows], [r["refusal"] for r in rows], "o-", color="#1f77b4", ms=4, label="Pareto front")
    for r in rows:
        if r["number"] == picked:
            ax.plot(r["kl"], r["refusal"], "o", ms=11, mfc="none", mec="#d62728", mew=2, label=f"picked: trial {picked}")
    if target is not None:
        ax.axhline(target, color="#7f7f7f", ls="--", lw=1, label=f"refusal target {target:g}")
    ax.set_xlabel("KL at the first answer token (harmless val prompts)")
    ax.set_ylabel("refusal rate (harmful val)")
    ax.set_title("Optimizer: the study's Pareto front")
    ax.legend(fontsize=7)
    return _png(fig)


def selection_scores(candidates: list[dict], baseline: float | None = None) -> bytes:
    """Bypass / induce refusal log-odds and KL of every scored candidate layer (arditi selection);
    `baseline`: the harmful val log-odds without any edit (dotted line)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    scored = [c for c in candidates if not _nan(c.get("bypass"))]
    layers = [c["layer"] for c in scored]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
    a1.plot(layers, [c["bypass"] for c in scored], "o-", label="bypass (harmful, ablated)")
    induce = [(c["layer"], c["induce"]) for c in scored if not _nan(c.get("induce"))]
    if induce:
        a1.plot(*zip(*induce), "s-", label="induce (harmless, added)")
    for c in scored:
        if c.get("status") == "chosen":
            a1.axvline(c["layer"], color="#d62728", ls="--", lw=1, label=f"chosen: {c['layer']}")
    if baseline is not None:
        a1.axhline(baseline, color="#7f7f7f", ls=":", label="harmful, unedited")
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("layer")
    a1.set_ylabel("refusal log-odds")
    a1.legend(fontsize=7)
    a1.set_title("Selection scores")
    a2.plot(layers, [c["kl"] for c in scored], "o-", color="#2ca02c")
    a2.set_xlabel("layer")
    a2.set_ylabel("KL (harmless, last position)")
    a2.set_title("Selection KL")
    return _png(fig)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def cosine_heatmap(matrix: list[list[float]]) -> bytes:
    """Cross-layer cosine matrix of the per-layer mean differences."""
    plt = _plt()
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(im, ax=ax, label="cosine")
    step = max(1, n // 12)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [_layer_label(i) for i in ticks])
    ax.set_yticks(ticks, [_layer_label(i) for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("Cross-layer cosine of refusal directions")
    return _png(fig)


def before_after(rows: list[tuple[str, float | None, float | None]]) -> bytes:
    """Grouped bars (before, after) for rate metrics such as refusal and over-refusal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    x = range(len(rows))
    before = [0.0 if b is None else b for _, b, _ in rows]
    after = [0.0 if a is None else a for _, _, a in rows]
    ax.bar([i - 0.2 for i in x], before, 0.4, label="before", color="#7f7f7f")
    ax.bar([i + 0.2 for i in x], after, 0.4, label="after", color="#d62728")
    ax.set_xticks(list(x), [name for name, _, _ in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.legend()
    ax.set_title("Refusal before / after the edit")
    return _png(fig)


def kl_per_position(kl: list[float]) -> bytes:
    """Mean KL(original ‖ edited) at each generated position (0 = first token)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(kl)), kl, "o-")
    ax.set_xlabel("generated token position")
    ax.set_ylabel("KL")
    ax.set_title("KL per position (harmless test prompts)")
    return _png(fig)


def pca_panels(pca: dict[str, dict[str, list[list[float]]]]) -> bytes:
    """One scatter per layer of the 2-D PCA coordinates of harmful and harmless activations."""
    plt = _plt()
    numeric = lambda k: str(k).lstrip("-").isdigit()  # noqa: E731
    layers = sorted(pca, key=lambda k: (not numeric(k), int(k) if numeric(k) else 0, str(k)))
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        for cls, color in (("harmful", "#d62728"), ("harmless", "#1f77b4")):
            pts = pca[layer].get(cls) or []
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, c=color, alpha=0.7, label=cls)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("PCA of activations (PC1 vs PC2)")
    return _png(fig)
