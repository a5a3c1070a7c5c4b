"""Per-layer linear probes: how linearly separable harmful and harmless activations are, held out.

A probe is a linear score s(x) = w·x + b, fit on the *train* activations and scored on the *test*
activations (never the ones it was fit on), at each residual position of the resid_pre axis.

* ``logistic`` (default): L2-regularised logistic regression on standardised features,
      minimise  (1/n) Σ_i softplus(−y_i (w·z_i + b)) + (l2/2)·|w|²,   y_i ∈ {−1, +1},
      z = (x − μ) / σ  with μ, σ the per-feature mean and sd of the train set,
  solved by L-BFGS with the analytic gradient
      ∂/∂w = −(1/n) Σ_i y_i σ(−y_i m_i) z_i + l2·w,   ∂/∂b = −(1/n) Σ_i y_i σ(−y_i m_i),   m = w·z + b,
  then folded back to raw features: w_x = w / σ, b_x = b − μ·w_x (Alain & Bengio 2016, "Understanding
  intermediate layers using linear classifier probes").
* ``diff_means``: w = μ₊ − μ₋, b = −w·(μ₊ + μ₋)/2 — the difference-of-means direction with the threshold
  at the midpoint of the projected class means (the direction Arditi et al. 2024 ablate).

Accuracy counts s > 0 as harmful. AUROC is the Mann–Whitney rank formula
    AUROC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋),
R₊ = sum of the (mid-)ranks of the positive scores among all scores (ties get their average rank),
i.e. P(s₊ > s₋) + ½ P(s₊ = s₋) (Hanley & McNeil 1982). Pure torch; statistics in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ProbeMethod = Literal["logistic", "diff_means"]


def midranks(x: torch.Tensor) -> torch.Tensor:
    """[n] -> [n] float64 ranks 1..n, tied values sharing the average of their ranks."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # [u]: rank of the last member of each tie group
    avg = ends - (counts.double() - 1) / 2  # [u]: mean of ranks (end − c + 1 .. end)
    return avg[inverse]


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """[n₊], [n₋] scores -> AUROC = (R₊ − n₊(n₊+1)/2) / (n₊ n₋) (0.5 = chance, 1 = positives all higher)."""
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one score of each class")
    ranks = midranks(torch.cat([pos.flatten(), neg.flatten()]))  # [n₊ + n₋]
    r_pos = ranks[:n_pos].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Fraction classified correctly with s > 0 ⇒ positive: (#{s₊ > 0} + #{s₋ ≤ 0}) / (n₊ + n₋)."""
    return (int((pos > 0).sum()) + int((neg <= 0).sum())) / (pos.numel() + neg.numel())


@dataclass(frozen=True)
class LinearProbe:
    """s(x) = x·weight + bias on raw activations; weight [d] float64."""

    weight: torch.Tensor
    bias: float
    method: str

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d] -> [n] float64."""
        return x.double() @ self.weight + self.bias

    @classmethod
    def fit(cls, pos: torch.Tensor, neg: torch.Tensor, method: ProbeMethod = "logistic", l2: float = 1e-2,
            max_iter: int = 100) -> "LinearProbe":
        """Fit on [n₊, d] positive (harmful) and [n₋, d] negative (harmless) train activations."""
        if method == "diff_means":
            return cls._diff_means(pos, neg)
        if method == "logistic":
            return cls._logistic(pos, neg, l2, max_iter)
        raise ValueError(f"unknown probe method {method!r}; valid: logistic, diff_means")

    @classmethod
    def _diff_means(cls, pos: torch.Tensor, neg: torch.Tensor) -> "LinearProbe":
        mu_pos, mu_neg = pos.double().mean(0), neg.double().mean(0)  # [d]
        w = mu_pos - mu_neg  # [d]
        return cls(w, float(-w @ (mu_pos + mu_neg) / 2), "diff_means")

    @classmethod
    def _logistic(cls, pos: torch.Tensor, neg: torch.Tensor, l2: float, max_iter: int) -> "LinearProbe":
        x = torch.cat([pos, neg]).double().clone()  # [n, d]; clone: a plain tensor even from inference mode
        y = torch.cat([torch.ones(len(pos)), -torch.ones(len(neg))]).double()  # [n]
        mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)  # [d]
        z = (x - mu) / sd  # [n, d]
        n = len(y)
        w = torch.zeros(z.shape[1] + 1, dtype=torch.float64)  # [d + 1]: weights, then bias
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            m = z @ w[:-1] + w[-1]  # [n] margins before the label
            loss = torch.nn.functional.softplus(-y * m).mean() + 0.5 * l2 * (w[:-1] @ w[:-1])
            g = -y * torch.sigmoid(-y * m) / n  # [n]: ∂loss/∂m
            w.grad = torch.cat([z.T @ g + l2 * w[:-1], g.sum()[None]])
            return loss

        with torch.no_grad():
            opt.step(closure)
        wx = w[:-1] / sd  # [d]
        return cls(wx.detach().clone(), float(w[-1] - mu @ wx), "logistic")


def layer_probe(train_pos: torch.Tensor, train_neg: torch.Tensor, test_pos: torch.Tensor, test_neg: torch.Tensor,
                method: ProbeMethod = "logistic", l2: float = 1e-2) -> dict:
    """Fit on train [n, d] pairs, score the held-out test [m, d] pairs -> {accuracy, auroc, train_accuracy}."""
    probe = LinearProbe.fit(train_pos, train_neg, method, l2)
    s_pos, s_neg = probe.scores(test_pos), probe.scores(test_neg)  # [m₊], [m₋]
    return {"accuracy": accuracy(s_pos, s_neg), "auroc": auroc(s_pos, s_neg),
            "train_accuracy": accuracy(probe.scores(train_pos), probe.scores(train_neg))}


def probe_layers(train_pos: torch.Tensor, train_neg: torch.Tensor, test_pos: torch.Tensor, test_neg: torch.Tensor,
                 method: ProbeMethod = "logistic", l2: float = 1e-2) -> list[dict]:
    """Activations [n, L+1, d] (one position) -> one :func:`layer_probe` dict per layer index, with "layer"."""
    if not train_pos.shape[1:] == train_neg.shape[1:] == test_pos.shape[1:] == test_neg.shape[1:]:
        raise ValueError("probe_layers: all four activation sets must be [n, L+1, d] with the same L and d")
    return [{"layer": j, **layer_probe(train_pos[:, j], train_neg[:, j], test_pos[:, j], test_neg[:, j], method, l2)}
            for j in range(train_pos.shape[1])]
