"""EXCISE for mixture-of-experts layers: expert-granular abliteration, router stabilisation and
expert transplant.

Notation, per MoE layer: E experts, tokens i with residual h_i [d] and router probabilities
p_i = softmax(W_r x_i + b_r) [E] over *all* experts (x_i is the router's input; gpt-oss renormalises
only its top-k at run time, the full softmax is used here for every family so the statistics are
comparable), harmful set H, harmless set B.

* Expert-granular abliteration (EGA; OBLITERATUS ``per_expert_directions``): every routed expert
  gets its own refusal direction, the difference of routing-weighted means

      μ_e(S) = Σ_{i∈S} p_ie·h_i / Σ_{i∈S} p_ie,     r_e = normalise(μ_e(H) − μ_e(B))

  and its down projection is edited with r_e alone: W_e' = W_e − λ·r_e r_eᵀ W_e. Guard: when the
  routing mass m_e(S) = Σ_{i∈S} p_ie of either set is below ``min_mass`` (an effective token count)
  the mean is noise, and r_e falls back to the layer's *global* direction
  normalise(mean_H h − mean_B h). Fallbacks are returned, never silent.
* Router stabilisation: after the edit the routers see new inputs x'_i (the residual has lost the
  direction), so their logits drift. The original OBLITERATUS "clamps router weights" after each
  MoE layer (marpogiii-code/OBLITERATUS ``_stabilize_router_weights``, per its audit notes), which
  promises nothing about the logits. Here each router is refitted so that on harmless tokens its
  new logits match the original ones in least squares, shrunk toward the old weights:

      W_r' = argmin_V Σ_i ‖V x'_i − W_r x_i‖² + ρ·s·‖V − W_r‖²_F,   s = tr(X'ᵀX')/d
           = W_r (XᵀX' + ρ s I)(X'ᵀX' + ρ s I)⁻¹         (rows of X, X' are x_i, x'_i)

  With X' = X nothing changes; with ρ → 0 it is the least-squares fit. The bias is kept.
* Expert transplant (OBLITERATUS ``expert_transplant``, ``transplant_blend`` = 0.10 in its
  "nuclear" preset, applied to the top third of safety experts): experts whose routing mass leans
  toward harmful prompts, skew_e = mean_H p_ie − mean_B p_ie, are blended toward the mean of the
  layer's other experts, W_e' = (1 − α)·W_e + α·mean_{f≠e} W_f, for every expert parameter
  (computed from the original weights, so the order of experts does not matter).

Order: transplant, then the projections (EGA + the ordinary excise of the other writers), then
router stabilisation. The top half of this file is torch-only math; the plumbing follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..batching import Encoded
from ..errors import EditError
from ..hook_points import hooked, module_hooks
from ..models.adapters import ArchitectureAdapter, Layout, Writer
from .projection import norm_preserving_project, project_out
from ..models.placement import input_device

# ---------------------------------------------------------------------------- pure math (torch only)



class MoeOptions(BaseModel):
    """``[excise.moe]``: what happens to mixture-of-experts layers (ignored by dense models)."""

    model_config = ConfigDict(extra="forbid")

    expert_directions: bool = Field(False, description="Expert-granular abliteration: project each routed expert "
                                                       "with its own routing-weighted direction.")
    min_routing_mass: float = Field(2.0, gt=0.0, description="Experts routed less than this (summed routing weight "
                                                             "over the probe tokens) use the layer's direction.")
    routing_positions: int | None = Field(1, ge=1, description="Last k tokens per prompt for routing statistics "
                                                               "(None = every token).")
    stabilise_routers: bool = Field(False, description="Refit each router (ridge) so its logits on harmless tokens "
                                                       "match the unedited model's.")
    router_ridge: float = Field(0.1, ge=0.0, description="Ridge penalty of the router refit.")
    transplant: bool = Field(False, description="Blend the experts most skewed toward harmful prompts toward the "
                                                "mean of the others.")
    transplant_fraction: float = Field(1 / 3, gt=0.0, le=1.0, description="Fraction of experts per layer to flag.")
    transplant_alpha: float = Field(0.10, ge=0.0, le=1.0, description="Blend weight toward the others' mean.")

def routing_weighted_directions(h_harmful: torch.Tensor, p_harmful: torch.Tensor, h_harmless: torch.Tensor,
                                p_harmless: torch.Tensor, min_mass: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert refusal directions r_e [E, d] (float32, unit rows) and a fallback mask [E] (True where
    the routing-mass guard replaced r_e by the layer's global direction). h: [N, d], p: [N, E]."""
    hh, ph, hb, pb = (t.double() for t in (h_harmful, p_harmful, h_harmless, p_harmless))
    mass_h, mass_b = ph.sum(0), pb.sum(0)  # [E]
    # μ_e(S) = Σ_i p_ie h_i / Σ_i p_ie
    mu_h = (ph.T @ hh) / mass_h.clamp_min(1e-30)[:, None]  # [E, d]
    mu_b = (pb.T @ hb) / mass_b.clamp_min(1e-30)[:, None]  # [E, d]
    diff = mu_h - mu_b  # [E, d]
    glob = hh.mean(0) - hb.mean(0)  # [d]
    if glob.norm() == 0:
        raise EditError("harmful and harmless mean activations are identical: no global direction to fall back to")
    glob = glob / glob.norm()
    norms = diff.norm(dim=-1)  # [E]
    fallback = (mass_h < min_mass) | (mass_b < min_mass) | (norms <= 1e-12 * hh.abs().max())
    dirs = torch.where(fallback[:, None], glob[None, :], diff / norms.clamp_min(1e-30)[:, None])
    return dirs.float(), fallback


def project_experts(weight: torch.Tensor, q: torch.Tensor, lam: float = 1.0, layout: Layout = "out_in",
                    norm_preserve: bool = False) -> torch.Tensor:
    """Project each expert slice with its own basis: W'_e = W_e − λ·Q_eᵀQ_e W_e (out_in; W_e Q_eᵀQ_e
    for in_out). weight [E, ·, ·], q [E, d] or [E, k, d] (orthonormal rows per expert)."""
    q = q[:, None, :] if q.ndim == 2 else q  # [E, k, d]
    if q.shape[0] != weight.shape[0]:
        raise EditError(f"{q.shape[0]} expert directions for {weight.shape[0]} experts")
    edit = norm_preserving_project if norm_preserve else project_out
    return torch.stack([edit(weight[e], q[e], lam, layout) for e in range(weight.shape[0])])


def project_expert_biases(bias: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """b'_e = b_e − λ·Q_eᵀQ_e b_e; bias [E, d], q [E, d] or [E, k, d]."""
    q = (q[:, None, :] if q.ndim == 2 else q).to(device=bias.device, dtype=torch.float32)  # [E, k, d]
    b = bias.float()
    return b - lam * torch.einsum("ek,ekd->ed", torch.einsum("ekd,ed->ek", q, b), q)


def routed_bias_mix(bias: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_ik·b_{e_ik}: the bias part of a fused experts output. bias [E, d], indices/weights [N, k] -> [N, d]."""
    return (weights[..., None].to(bias.dtype) * bias[indices]).sum(-2)


def refit_router(weight: torch.Tensor, x_before: torch.Tensor, x_after: torch.Tensor,
                 ridge: float = 0.1) -> torch.Tensor:
    """W' = W (XᵀX' + ρsI)(X'ᵀX' + ρsI)⁻¹, s = tr(X'ᵀX')/d: logits on the new inputs X' [N, d] match the
    old logits W x on X [N, d] in ridge-regularised least squares. weight [E, d] -> [E, d] float32."""
    w, x, xa = weight.double(), x_before.double(), x_after.double()
    d = w.shape[1]
    gram = xa.T @ xa  # [d, d]
    reg = ridge * torch.trace(gram) / d * torch.eye(d, dtype=torch.float64, device=w.device)
    # Solve V (X'ᵀX' + R) = W (XᵀX' + R): both sides transposed, the Gram matrix is symmetric.
    rhs = (w @ (x.T @ xa + reg)).T  # [d, E]
    return torch.linalg.solve(gram + reg, rhs).T.float()


def routing_skew(p_harmful: torch.Tensor, p_harmless: torch.Tensor) -> torch.Tensor:
    """skew_e = mean_H p_ie − mean_B p_ie [E]: how much more routing mass expert e gets on harmful prompts."""
    return (p_harmful.double().mean(0) - p_harmless.double().mean(0)).float()


def flag_experts(skew: torch.Tensor, fraction: float = 1 / 3) -> list[int]:
    """The ceil(fraction·E) experts with the largest positive skew, largest first."""
    n = math.ceil(fraction * skew.numel())
    order = torch.argsort(skew, descending=True, stable=True)[:n]
    return [int(e) for e in order if skew[e] > 0]


def transplant(weights: torch.Tensor, flagged: list[int], alpha: float) -> torch.Tensor:
    """W_e' = (1 − α)·W_e + α·mean_{f≠e} W_f for e in `flagged` (original weights); weights [E, ...]."""
    w = weights.float()
    n = w.shape[0]
    if n < 2:
        raise EditError("expert transplant needs at least two experts")
    others = (w.sum(0, keepdim=True) - w) / (n - 1)  # [E, ...] mean of the other experts
    out = w.clone()
    idx = torch.tensor(flagged, dtype=torch.long, device=w.device)
    out[idx] = (1 - alpha) * w[idx] + alpha * others[idx]
    return out


# ---------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class RoutingSample:
    """Per MoE layer: residual (``layers.{i}.resid_post``) [N, d] and router probabilities [N, E] of the
    same N tokens (float32, CPU)."""

    hidden: dict[int, torch.Tensor]
    probs: dict[int, torch.Tensor]


def _token_mask(mask: torch.Tensor, positions: int | None) -> torch.Tensor:
    """[b, t] bool: real (non-pad) tokens, restricted to the last `positions` columns when given."""
    keep = mask.bool()
    if positions is not None:
        keep = keep & (torch.arange(mask.shape[1], device=mask.device) >= mask.shape[1] - positions)
    return keep


def collect_routing(adapter: ArchitectureAdapter, encoded: Encoded, positions: int | None = 1,
                    batch_size: int = 32) -> RoutingSample:
    """Router probabilities and residuals on every MoE layer. The router sees the batch flattened to
    [b·t, d], so its logits [b·t, E] are reshaped to [b, t, E] and pad tokens (left padding) dropped;
    `positions` = k keeps the last k tokens of each prompt, None keeps all real tokens."""
    layers = adapter.moe_layers
    hidden: dict[int, list] = {i: [] for i in layers}
    probs: dict[int, list] = {i: [] for i in layers}
    buf: dict = {}

    def keep_h(i):
        def fn(h):  # [b, t, d]
            buf[("h", i)] = h
        return fn

    def keep_p(i):
        def fn(module, args, out):
            logits = out[0] if isinstance(out, tuple) else out  # [b·t, E]
            buf[("p", i)] = torch.softmax(logits.float(), dim=-1)
        return fn

    device = input_device(adapter.model)
    names = [(f"layers.{i}.resid_post", keep_h(i)) for i in layers]
    routers = [(adapter.router(i), keep_p(i)) for i in layers]
    with torch.inference_mode(), hooked(adapter, names), module_hooks(routers):
        for batch in encoded.batches(batch_size, device):
            adapter.body(**batch.inputs(), use_cache=False)
            sel = _token_mask(batch.attention_mask, positions)  # [b, t]
            b, t = sel.shape
            for i in layers:
                hidden[i].append(buf[("h", i)][sel].to("cpu", torch.float32))  # [n, d]
                probs[i].append(buf[("p", i)].reshape(b, t, -1)[sel].to("cpu", torch.float32))  # [n, E]
    return RoutingSample({i: torch.cat(v) for i, v in hidden.items()}, {i: torch.cat(v) for i, v in probs.items()})


@dataclass(frozen=True)
class ExpertDirections:
    """EGA result per MoE layer: unit directions [E, d] and the fallback mask [E]."""

    directions: dict[int, torch.Tensor]
    fallback: dict[int, torch.Tensor]
    min_mass: float
    skew: dict[int, torch.Tensor] = field(default_factory=dict)  # routing skew [E] per layer

    def n_fallback(self) -> int:
        return int(sum(int(m.sum()) for m in self.fallback.values()))


def expert_directions(harmful: RoutingSample, harmless: RoutingSample, min_mass: float = 2.0) -> ExpertDirections:
    dirs, fallback, skew = {}, {}, {}
    for i in harmful.hidden:
        dirs[i], fallback[i] = routing_weighted_directions(harmful.hidden[i], harmful.probs[i],
                                                           harmless.hidden[i], harmless.probs[i], min_mass)
        skew[i] = routing_skew(harmful.probs[i], harmless.probs[i])
    return ExpertDirections(dirs, fallback, min_mass, skew)


@torch.no_grad()
def excise_experts(adapter: ArchitectureAdapter, directions: Mapping[int, torch.Tensor], lam: float = 1.0, *,
                   norm_preserve: bool = False, biases: bool = True) -> list[str]:
    """Edit every routed expert's down projection (and bias) of the given layers with its own direction
    ({layer: [E, d]}); checked finite on copies before anything is written. Returns edited names."""
    planned: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for i, q in directions.items():
        q = q.detach().float()
        for writer in adapter.expert_writers(i):
            qe = q if writer.fused else q[int(writer.name.rsplit(".", 1)[1])][None]  # [E, d] or [1, d]
            w = writer.weight
            new = (project_experts(w.detach(), qe.to(w.device), lam, writer.layout, norm_preserve) if writer.fused
                   else (norm_preserving_project if norm_preserve else project_out)(w.detach(), qe, lam, writer.layout))
            planned.append((f"{writer.name}.{writer.param}", w, new.to(w.dtype)))
            if biases and writer.bias is not None:
                b = writer.bias
                nb = project_expert_biases(b.detach().reshape(-1, b.shape[-1]), qe, lam).reshape(b.shape)
                planned.append((f"{writer.name}.{writer.bias_param}", b, nb.to(b.dtype)))
    for name, _, new in planned:
        if not torch.isfinite(new).all():
            raise EditError(f"editing {name} would produce non-finite weights; nothing was changed")
    for _, param, new in planned:
        param.copy_(new)
    return [name for name, _, _ in planned]


def routed_bias_hook(writer: Writer, q: torch.Tensor, lam: float = 1.0):
    """Forward hook (register with ``with_kwargs=True``) for a fused experts writer whose bias is left
    unprojected: y' = y − λ·((y − Σ_k w_k b_{e_k}) Qᵀ) Q, the exact output of the weight-only edit.
    The experts forward is called as (hidden [N, d], top_k_index [N, k], top_k_weights [N, k])."""
    bias = writer.bias.detach()
    q = q.detach().float()

    def hook(module, args, kwargs, y):
        vals = list(args) + list(kwargs.values())
        indices, weights = vals[1], vals[2]
        qq = q.to(device=y.device, dtype=y.dtype)
        base = y - routed_bias_mix(bias.to(y.dtype), indices, weights)  # [N, d]
        return y - lam * (base @ qq.T) @ qq

    return hook


def router_inputs(adapter: ArchitectureAdapter, encoded: Encoded, batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Every MoE router's input on the real (non-pad) tokens, {layer: [N, d]} float32 on CPU, in a fixed
    token order (so two calls on the same prompts pair up token by token)."""
    out: dict[int, list] = {i: [] for i in adapter.moe_layers}
    buf: dict = {}

    def keep(i):
        def fn(module, args):
            buf[i] = args[0]  # [b·t, d] (or [b, t, d])
        return fn

    device = input_device(adapter.model)
    with torch.inference_mode(), module_hooks([(adapter.router(i), keep(i)) for i in adapter.moe_layers], pre=True):
        for batch in encoded.batches(batch_size, device):
            adapter.body(**batch.inputs(), use_cache=False)
            sel = batch.attention_mask.bool()
            for i in adapter.moe_layers:
                x = buf[i].reshape(*sel.shape, -1)
                out[i].append(x[sel].to("cpu", torch.float32))
    return {i: torch.cat(v) for i, v in out.items()}


@torch.no_grad()
def stabilise_routers(adapter: ArchitectureAdapter, before: Mapping[int, torch.Tensor],
                      after: Mapping[int, torch.Tensor], ridge: float = 0.1) -> dict[int, float]:
    """Refit each router (see module docstring) from router inputs collected on the same harmless prompts
    before and after the edit; returns {layer: ‖W' − W‖/‖W‖}."""
    changes = {}
    new = {}
    for i, x in before.items():
        router = adapter.router(i)
        if x.shape != after[i].shape:
            raise EditError(f"router {i}: {tuple(x.shape)} inputs before the edit, {tuple(after[i].shape)} after")
        w = refit_router(router.weight.detach().cpu(), x, after[i], ridge)
        if not torch.isfinite(w).all():
            raise EditError(f"refitting router {i} gave non-finite weights; nothing was changed")
        new[i] = w
    for i, w in new.items():
        weight = adapter.router(i).weight
        changes[i] = float((w - weight.detach().float().cpu()).norm() / weight.detach().float().norm().clamp_min(1e-12))
        weight.copy_(w.to(device=weight.device, dtype=weight.dtype))
    return changes


def _expert_params(adapter: ArchitectureAdapter, i: int) -> list[tuple[str, list[torch.Tensor]]]:
    """Each expert parameter of layer i as E tensors of one shape: fused [E, ...] params are split along
    axis 0, per-module experts give one tensor per module for each parameter name."""
    experts = adapter.experts(i)
    if isinstance(experts, nn.ModuleList):
        names = [n for n, _ in experts[0].named_parameters()]
        return [(n, [dict(m.named_parameters())[n] for m in experts]) for n in names]
    return [(n, list(p)) for n, p in experts.named_parameters(recurse=False)]


@torch.no_grad()
def transplant_experts(adapter: ArchitectureAdapter, skew: Mapping[int, torch.Tensor], fraction: float = 1 / 3,
                       alpha: float = 0.1) -> dict[int, list[int]]:
    """Blend the flagged experts of each layer toward the mean of the others (see :func:`transplant`);
    returns {layer: flagged experts}."""
    flagged = {i: flag_experts(s, fraction) for i, s in skew.items()}
    for i, experts in flagged.items():
        if not experts:
            continue
        for _, slices in _expert_params(adapter, i):
            stacked = torch.stack([s.detach() for s in slices])  # [E, ...]
            new = transplant(stacked, experts, alpha).to(stacked.dtype)
            for e in experts:
                slices[e].copy_(new[e])
    return flagged
