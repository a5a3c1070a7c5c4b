"""Sparse-autoencoder directions: train a small SAE on the pooled activations, keep the features
whose activations separate harmful from harmless prompts best, and return their decoder columns.

SAE (Bricken et al. 2023, "Towards Monosemanticity", transformer-circuits.pub/2023/monosemantic-features;
Cunningham et al. 2023, "Sparse Autoencoders Find Highly Interpretable Features in Language Models",
arXiv:2309.08600), on inputs x scaled by one scalar s so that E‖x/s‖² = d (Anthropic, "Circuits Updates
April 2024", which makes the L1 coefficient independent of the activation scale):

    f(x) = ReLU(W_e (x − b_d) + b_e)            # [n, m], m = expansion · d
    x̂    = W_d f + b_d                          # W_d: [d, m], every column unit norm
    L    = mean_n ‖x − x̂‖² + λ · mean_n ‖f‖₁

trained with Adam on shuffled minibatches; after each step the decoder columns are renormalised
(and, before it, the gradient component parallel to each column is removed, as in Bricken et al.).
A held-out fraction of the rows gives the early-stopping loss (stop when it has not improved by a
relative `min_delta` for `patience` epochs; the best epoch's weights are kept).

Ranking: Cohen's d of each feature's activation, harmful vs harmless,
    d_j = (mean_h f_j − mean_l f_j) / s_pooled,  s_pooled² = ((n_h−1) s_h² + (n_l−1) s_l²) / (n_h + n_l − 2),
the top-k features by |d_j| give their decoder columns times sign(d_j) (pointing toward harmful),
orthonormalised in rank order. Everything runs on the activations' own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import PromptError
from .base import orthonormalize, register_direction_method


class SaeOptions(BaseModel):
    """``[directions.sae]``. SAE defaults follow Bricken et al. 2023 where they transfer (ReLU, unit-norm
    decoder, L1, Adam); sizes are scaled down to a few hundred prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expansion: int = Field(4, ge=1, description="Features per residual dimension (m = expansion * d); small "
                           "because there are only a few hundred samples (Bricken et al. use 1x-256x).")
    l1_coeff: float = Field(5.0, ge=0.0, description="L1 weight lambda (Anthropic April 2024 update: lambda = 5 "
                            "with sum-over-d MSE on inputs scaled to E||x||^2 = d and unit-norm decoder columns).")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate (Cunningham et al. 2023 use 1e-3).")
    batch_size: int = Field(64, ge=1, description="Minibatch rows.")
    max_epochs: int = Field(300, ge=1, description="Epoch cap.")
    patience: int = Field(10, ge=1, description="Epochs without relative improvement of the held-out loss before stopping.")
    min_delta: float = Field(1e-4, ge=0.0, description="Relative improvement that counts (loss < best * (1 - min_delta)).")
    holdout: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction of rows held out for early stopping.")
    seed: int = Field(0, description="Seed of the initialisation, the split and the shuffles.")


@dataclass(frozen=True)
class SaeFit:
    w_enc: torch.Tensor  # [m, d]
    b_enc: torch.Tensor  # [m]
    w_dec: torch.Tensor  # [d, m] unit columns
    b_dec: torch.Tensor  # [d]
    scale: float  # inputs are x / scale
    history: list[float]  # held-out loss per epoch
    epochs: int
    stopped_early: bool

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d] (unscaled) -> feature activations [n, m]."""
        z = x.float() / self.scale - self.b_dec
        return torch.relu(z @ self.w_enc.T + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[n, m] -> reconstruction [n, d] (unscaled)."""
        return (f @ self.w_dec.T + self.b_dec) * self.scale


def _loss(x, w_enc, b_enc, w_dec, b_dec, l1):
    f = torch.relu((x - b_dec) @ w_enc.T + b_enc)  # [b, m]
    x_hat = f @ w_dec.T + b_dec  # [b, d]
    return (x - x_hat).pow(2).sum(-1).mean() + l1 * f.abs().sum(-1).mean()


def train_sae(x: torch.Tensor, options: SaeOptions = SaeOptions()) -> SaeFit:
    """Fit an SAE to the rows of x [n, d] (float32 on x's device)."""
    n, d = x.shape
    n_hold = max(1, round(options.holdout * n))
    if n - n_hold < 2:
        raise PromptError(f"sae needs at least 3 activation rows, got {n}")
    device = x.device
    gen = torch.Generator(device=device).manual_seed(options.seed)
    x = x.float()
    scale = float((x.double().pow(2).sum(-1).mean() / d).sqrt())
    if not scale > 0:
        raise PromptError("sae: activations are all zero")
    x = x / scale
    perm = torch.randperm(n, generator=gen, device=device)
    hold, train = x[perm[:n_hold]], x[perm[n_hold:]]

    m = options.expansion * d
    w_dec = torch.randn(d, m, generator=gen, device=device)
    w_dec = w_dec / w_dec.norm(dim=0, keepdim=True)  # unit columns
    params = [w_dec.T.clone(), torch.zeros(m, device=device), w_dec, train.mean(0)]  # W_e = W_dᵀ, b_e, W_d, b_d
    for p in params:
        p.requires_grad_(True)
    w_enc, b_enc, w_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=options.lr)

    def held_out() -> float:
        with torch.no_grad():
            return float(_loss(hold, *params, options.l1_coeff))

    best, best_state, history, bad, epochs, stopped = held_out(), None, [], 0, 0, False
    best_state = [p.detach().clone() for p in params]
    for epoch in range(options.max_epochs):
        order = torch.randperm(len(train), generator=gen, device=device)
        for start in range(0, len(train), options.batch_size):
            batch = train[order[start:start + options.batch_size]]
            loss = _loss(batch, *params, options.l1_coeff)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                # keep the step tangent to the unit-norm constraint: g -= (g·w) w per column
                w_dec.grad -= (w_dec.grad * w_dec).sum(0, keepdim=True) * w_dec
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=0, keepdim=True)
        epochs = epoch + 1
        loss = held_out()
        history.append(loss)
        if loss < best * (1 - options.min_delta):
            best, bad = loss, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= options.patience:
                stopped = True
                break
    w_enc, b_enc, w_dec, b_dec = best_state
    return SaeFit(w_enc, b_enc, w_dec, b_dec, scale, history, epochs, stopped)


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m], [k, m] -> [m] effect size of a vs b per column (0 where both are constant)."""
    a, b = a.double(), b.double()
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(0) + (nb - 1) * b.var(0)) / (na + nb - 2)  # [m]
    diff = a.mean(0) - b.mean(0)
    out = diff / pooled.sqrt()
    return torch.where(pooled > 0, out, torch.zeros_like(out))


def sae_directions(harmful: torch.Tensor, harmless: torch.Tensor, k: int = 1,
                   options: SaeOptions | None = None, info: dict | None = None) -> torch.Tensor:
    """[n, d], [m, d] -> [k, d] orthonormal float32 rows (on the inputs' device), each the decoder
    column of a top-|Cohen's d| SAE feature, signed toward harmful. `info`, when given, receives what
    the fit did (:func:`fit_info`) for the run's metadata."""
    options = options or SaeOptions()
    if len(harmful) < 2 or len(harmless) < 2:
        raise PromptError("sae needs at least 2 harmful and 2 harmless activation rows")
    fit = train_sae(torch.cat([harmful, harmless]), options)
    effect = cohens_d(fit.encode(harmful), fit.encode(harmless))  # [m]
    if k > len(effect):
        raise PromptError(f"sae has {len(effect)} features, fewer than k = {k}: raise expansion")
    top = effect.abs().argsort(descending=True, stable=True)[:k]
    if not bool((effect[top] != 0).all()):
        raise PromptError("sae: fewer than k features separate harmful from harmless (raise expansion or lower l1_coeff)")
    basis = fit.w_dec[:, top].T * torch.sign(effect[top]).float()[:, None]  # [k, d]
    if info is not None:
        info.update(fit_info(fit, top, effect))
    return orthonormalize(basis)


def fit_info(fit: SaeFit, top: torch.Tensor, effect: torch.Tensor) -> dict:
    """Epochs run, whether patience stopped the fit (else the epoch cap did), the held-out loss per
    epoch, and the chosen features with their Cohen's d."""
    return {"epochs": fit.epochs, "stopped_early": fit.stopped_early, "held_out_loss": list(fit.history),
            "best_held_out_loss": min(fit.history) if fit.history else None,
            "features": top.tolist(), "cohens_d": effect[top].tolist()}


register_direction_method(
    "sae", "top-k sparse-autoencoder features by harmful-vs-harmless effect size (decoder columns)",
    sae_directions, options=SaeOptions, reports_fit=True,
)
