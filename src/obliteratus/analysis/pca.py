"""2-D PCA of harmful and harmless activations, per layer.

At one layer, stack X = [harmful; harmless] [n + m, d], centre on the pooled mean μ, and take the
thin SVD  X − μ = U S Vᵀ  (float64). The first two right singular vectors V₁, V₂ [2, d] are the
principal axes; coordinates are (x − μ) V_kᵀ and the explained-variance ratio of axis k is
S_k² / Σ_j S_j². Signs are fixed so that the harmful mean has a non-negative coordinate on each axis
(SVD signs are arbitrary; this keeps plots of neighbouring layers comparable).
"""

from __future__ import annotations

import torch


def pca_2d(harmful: torch.Tensor, harmless: torch.Tensor) -> dict:
    """[n, d], [m, d] -> {"harmful": [n, 2], "harmless": [m, 2], "explained": [2], "components": [2, d]}
    as float64 tensors (axes beyond the data's rank get zero coordinates and zero variance)."""
    x = torch.cat([harmful, harmless]).double()  # [n + m, d]
    mu = x.mean(0)  # [d]
    _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)  # s [r], vh [r, d]
    total = (s ** 2).sum()
    comps = torch.zeros((2, x.shape[1]), dtype=torch.float64)
    explained = torch.zeros(2, dtype=torch.float64)
    r = min(2, vh.shape[0])
    comps[:r] = vh[:r]
    if total > 0:
        explained[:r] = s[:r] ** 2 / total
    sign = torch.where((harmful.double().mean(0) - mu) @ comps.T < 0, -1.0, 1.0).double()  # [2]
    comps = comps * sign[:, None]
    coords = (x - mu) @ comps.T  # [n + m, 2]
    n = harmful.shape[0]
    return {"harmful": coords[:n], "harmless": coords[n:], "explained": explained, "components": comps}


def pca_layers(harmful: torch.Tensor, harmless: torch.Tensor, layers: list[int] | None = None) -> list[dict]:
    """[n, L+1, d], [m, L+1, d] -> per layer axis j (every axis, or those in `layers`) {"layer": j,
    "harmful": [[x, y], ...], "harmless": ..., "explained": [2]} as lists (JSON-ready; components
    left out)."""
    out = []
    for j in range(harmful.shape[1]) if layers is None else layers:
        p = pca_2d(harmful[:, j], harmless[:, j])
        out.append({"layer": j, "harmful": p["harmful"].float().tolist(), "harmless": p["harmless"].float().tolist(),
                    "explained": p["explained"].tolist()})
    return out


def report_layers(n_axes: int, source: int | None = None) -> list[int]:
    """The layer axes a run's report shows PCA panels for: a quarter, half, three quarters and all of
    the depth (axis 0, the embeddings, left out), and the source layer when there is one."""
    last = n_axes - 1
    axes = {max(1, round(f * last)) for f in (0.25, 0.5, 0.75, 1.0)}
    if isinstance(source, int) and 0 <= source <= last:
        axes.add(source)
    return sorted(axes)


def run_pca(harmful: torch.Tensor, harmless: torch.Tensor, source: int | None = None) -> dict:
    """A run's PCA panels (written as ``pca.json``, drawn by the report) from its PROBE activations
    [n, L+1, d] and [m, L+1, d] (the train prompts, one position) at :func:`report_layers`;
    coordinates rounded to 4 decimals."""
    rows = pca_layers(harmful, harmless, report_layers(harmful.shape[1], source))
    for row in rows:
        for cls in ("harmful", "harmless"):
            row[cls] = [[round(x, 4), round(y, 4)] for x, y in row[cls]]
    return {"prompts": "train (the PROBE activations the directions came from), last position", "layers": rows}
