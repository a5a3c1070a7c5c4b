"""Attention-head surgery: project the refusal directions out of the output projection of only the
heads that write them most.

The attention output projection's input axis is the concatenation of the heads' outputs,
heads × head_dim (independent of how many k/v heads GQA shares), so head h owns

    out_in  (nn.Linear o_proj / dense, [d, H·hd]):  columns  h·hd … (h+1)·hd − 1   → W_h [d, hd]
    in_out  (GPT-2 Conv1D c_proj,     [H·hd, d]):   rows     h·hd … (h+1)·hd − 1   → W_h [hd, d]

Score of head h: ‖Q W_h‖_F (out_in) or ‖W_h Qᵀ‖_F (in_out) — for k = 1, ‖dᵀ W_h‖, the size of
what the head can write along d. The top-n heads (over all layers, or per layer) are edited:
W_h' = W_h − λ·Qᵀ(Q W_h), so Q W_h' = (1 − λ)·Q W_h; every other head's slice and the o_proj bias
(shared by all heads) are left unchanged. Scores are computed on the original weights in float32
before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, EditError
from ..models.adapters import ArchitectureAdapter, Layout
from .apply import EditReport
from .base import register_excise_variant
from .plan import EditPlan, writer_layer
from .projection import project_out

if TYPE_CHECKING:  # config imports the option models of this package
    from ..settings import ExciseSettings


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_heads: int = Field(4, ge=1, description="Heads to edit: in total, or in each layer with per_layer.")
    per_layer: bool = Field(False, description="Rank heads within each layer instead of across all layers.")


def _slices(weight: torch.Tensor, n_heads: int, layout: Layout) -> torch.Tensor:
    """[..., H, d, hd] (out_in) or [..., H, hd, d] (in_out) view of the per-head slices."""
    if layout == "out_in":
        *lead, d, inner = weight.shape
        return weight.reshape(*lead, d, n_heads, inner // n_heads).movedim(-2, -3)
    *lead, inner, d = weight.shape
    return weight.reshape(*lead, n_heads, inner // n_heads, d)


def head_scores(weight: torch.Tensor, q: torch.Tensor, n_heads: int, layout: Layout = "out_in") -> torch.Tensor:
    """s_h = ‖Q W_h‖_F (float32) for every head; [..., H]."""
    w = _slices(weight.float(), n_heads, layout)
    q = q.to(device=weight.device, dtype=torch.float32)
    along = q @ w if layout == "out_in" else w @ q.T  # [..., H, k, hd] or [..., H, hd, k]
    return along.flatten(-2).norm(dim=-1)


def project_heads(weight: torch.Tensor, q: torch.Tensor, heads: list[int], n_heads: int, lam: float = 1.0,
                  layout: Layout = "out_in") -> torch.Tensor:
    """W with W_h ← W_h − λ·Qᵀ(Q W_h) (out_in) / W_h − λ·(W_h Qᵀ) Q (in_out) for h in `heads` (float32)."""
    inner = weight.shape[-1] if layout == "out_in" else weight.shape[-2]
    if inner % n_heads:
        raise EditError(f"output projection input width {inner} is not a multiple of {n_heads} heads")
    hd = inner // n_heads
    out = weight.float().clone()
    for h in heads:
        cols = slice(h * hd, (h + 1) * hd)
        if layout == "out_in":
            out[..., :, cols] = project_out(out[..., :, cols], q, lam, "out_in")
        else:
            out[..., cols, :] = project_out(out[..., cols, :], q, lam, "in_out")
    return out


def head_geometry(config) -> tuple[int, int]:
    """(num_attention_heads, head_dim) from an HF config (head_dim defaults to hidden_size / heads)."""
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not n_heads:
        raise EditError(f"{type(config).__name__} has no num_attention_heads / n_head")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return int(n_heads), int(head_dim)


@torch.no_grad()
def head_surgery(adapter: ArchitectureAdapter, q: torch.Tensor, options: HeadOptions, lam: float = 1.0) -> EditReport:
    """Rank all attention heads by ‖Q W_h‖, then project Q out of the top heads' o_proj slices."""
    q = q.detach().float()
    n_heads, head_dim = head_geometry(adapter.model.config)
    writers = adapter.writers(mlp=False, embeddings=False)
    scores = {}
    for w in writers:
        inner = w.weight.shape[-1] if w.layout == "out_in" else w.weight.shape[-2]
        if inner != n_heads * head_dim:
            raise EditError(f"{w.name}: input width {inner} != heads × head_dim = {n_heads} × {head_dim}")
        scores[w.name] = head_scores(w.weight.detach(), q, n_heads, w.layout)  # [H] on the original weights
    ranked = sorted(((float(s), name, h) for name, row in scores.items() for h, s in enumerate(row.tolist())),
                    reverse=True)
    chosen: dict[str, list[int]] = {}
    if options.per_layer:
        for name, row in scores.items():
            chosen[name] = sorted(torch.topk(row, min(options.n_heads, n_heads)).indices.tolist())
    else:
        for _, name, h in ranked[: options.n_heads]:
            chosen.setdefault(name, []).append(h)
    news = {}
    for w in writers:
        if chosen.get(w.name):
            new = project_heads(w.weight.detach(), q, chosen[w.name], n_heads, lam, w.layout).to(w.weight.dtype)
            if not torch.isfinite(new).all():
                raise EditError(f"editing {w.name} would produce non-finite weights; nothing was changed")
            news[w.name] = (w, new)
    report = EditReport(lam, False, q.shape[0], post_writer_norm=adapter.post_writer_norm, variant="heads")
    for name, (w, new) in news.items():
        w.weight.copy_(new)
        report.edited.append(f"{name}.weight")
        report.writer_weights[name] = 1.0
    report.details = {
        "heads": {name: sorted(hs) for name, hs in chosen.items() if hs},
        "layers": sorted({writer_layer(w) for w, _ in news.values()}),
        "head_dim": head_dim,
        "scores": {name: [round(x, 6) for x in row.tolist()] for name, row in scores.items()},
    }
    return report


def heads_variant(adapter: ArchitectureAdapter, q: torch.Tensor, settings: ExciseSettings,
                  plan: EditPlan | None) -> EditReport:
    """The registered variant: head surgery with the global basis at strength lam (no plan)."""
    if plan is not None:
        raise ConfigError("head surgery edits o_proj slices with the global basis: no kernels, per-layer scope, "
                          "leace or lm_head with it")
    return head_surgery(adapter, q, settings.heads, settings.lam)


register_excise_variant(
    "heads", "project only the top attention heads' o_proj slices", heads_variant,
    what="edits the top heads' o_proj slices (only those, whatever mlp, embeddings and biases say) with the global "
         "basis at strength lam", strengths="none", lm_head=False, layer_bases=False, attention_only=True)
