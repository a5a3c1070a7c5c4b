"""Safety-neuron masking: zero the MLP neurons whose output writes along the refusal directions.

Neuron j of an MLP writes the residual-space vector w_j = W_down[:, j] (nn.Linear [d, ffn]) or
W_down[j, :] (GPT-2 Conv1D [ffn, d]). Its score is

    relative (default):  s_j = ‖Q w_j‖ / ‖w_j‖     (for k = 1, |cos(d, w_j)|)
    absolute:            s_j = ‖Q w_j‖

The relative score is chosen by default because it measures what fraction of a neuron's output
lies along the refusal directions, independent of how large the neuron is; the absolute score
also favours high-norm neurons that write mostly elsewhere. A zero column scores 0.

Masking sets w_j = 0 for the top `count` (or `fraction`) neurons, per layer or across all layers.

Scores are computed in float32 on the ORIGINAL weights, before any projection: after a λ = 1
projection Q w_j' is only rounding noise (in fp16, ~1e-3 of the weight), so scoring afterwards
ranks noise (the OBLITERATUS audit found exactly that). :func:`excise_and_mask` therefore scores,
then projects, then masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.adapters import ArchitectureAdapter, Layout
from .apply import EditReport, excise
from .plan import EditPlan

if TYPE_CHECKING:  # config imports the option models of this package
    from ..settings import ExciseSettings


class NeuronOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float | None = Field(None, gt=0.0, le=1.0, description="Fraction of neurons to mask.")
    count: int | None = Field(None, ge=1, description="Number of neurons to mask (instead of fraction).")
    per_layer: bool = Field(True, description="Select within each layer (else across all layers).")
    relative: bool = Field(True, description="Score by ‖Q w_j‖ / ‖w_j‖ (else ‖Q w_j‖).")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of `fraction` and `count`")
        return self


def neuron_scores(weight: torch.Tensor, q: torch.Tensor, layout: Layout = "out_in", relative: bool = True) -> torch.Tensor:
    """s_j for every neuron, float32 [..., n] (see the module docstring); input may be fp16/bf16."""
    w = weight.float()
    q = q.to(device=weight.device, dtype=torch.float32)
    if layout == "out_in":
        along, norms = (q @ w).norm(dim=-2), w.norm(dim=-2)  # [..., n]
    else:
        along, norms = (w @ q.T).norm(dim=-1), w.norm(dim=-1)
    if not relative:
        return along
    return torch.where(norms > 0, along / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(along))


def mask_neurons(weight: torch.Tensor, neurons: list[int], layout: Layout = "out_in") -> torch.Tensor:
    """A copy of W with w_j = 0 for j in `neurons` (same dtype)."""
    out = weight.detach().clone()
    if layout == "out_in":
        out[..., :, neurons] = 0
    else:
        out[..., neurons, :] = 0
    return out


def _select(scores: dict[str, torch.Tensor], options: NeuronOptions) -> dict[str, list[int]]:
    def size(n: int) -> int:
        return options.count if options.count is not None else max(1, round(options.fraction * n))

    if options.per_layer:
        return {name: sorted(torch.topk(s, min(size(len(s)), len(s))).indices.tolist()) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    picked = torch.topk(flat, min(size(len(flat)), len(flat))).indices.tolist()
    offsets = torch.tensor([0] + [len(scores[n]) for n in names]).cumsum(0).tolist()
    chosen: dict[str, list[int]] = {}
    for i in picked:
        layer = max(j for j, off in enumerate(offsets[:-1]) if off <= i)
        chosen.setdefault(names[layer], []).append(i - offsets[layer])
    return {name: sorted(js) for name, js in chosen.items()}


@torch.no_grad()
def select_neurons(adapter: ArchitectureAdapter, q: torch.Tensor, options: NeuronOptions) -> dict[str, list[int]]:
    """{mlp writer name: neuron indices to mask}, scored on the weights as they are now. Fused expert
    tensors ([E, ...]: a neuron index would mean a different neuron in every expert) are left out;
    see :func:`fused_writers`."""
    q = q.detach().float()
    scores = {}
    for w in adapter.writers(attention=False, embeddings=False):
        if w.weight.ndim != 2:
            continue
        scores[w.name] = neuron_scores(w.weight.detach(), q, w.layout, options.relative)
    return _select(scores, options)


@torch.no_grad()
def excise_and_mask(adapter: ArchitectureAdapter, q: torch.Tensor, options: NeuronOptions,
                    settings: ExciseSettings | None = None, plan: EditPlan | None = None) -> EditReport:
    """Score neurons on the original weights, then (when `settings` is given) run the projection
    ``excise(adapter, q, settings, plan)``, then zero the selected down-projection columns/rows."""
    chosen = select_neurons(adapter, q, options)  # BEFORE any edit
    if settings is not None:
        report = excise(adapter, q, settings, plan)
    else:
        report = EditReport(0.0, False, q.shape[0], post_writer_norm=adapter.post_writer_norm)
    by_name = {w.name: w for w in adapter.writers(attention=False, embeddings=False)}
    for name, neurons in chosen.items():
        w = by_name[name]
        w.weight.copy_(mask_neurons(w.weight, neurons, w.layout))
        if f"{name}.weight" not in report.edited:
            report.edited.append(f"{name}.weight")
    report.variant = "neurons" if settings is None else f"{report.variant}+neurons"
    report.details["masked_neurons"] = chosen
    report.details["neurons_not_scored"] = [w.name for w in adapter.writers(attention=False, embeddings=False)
                                            if w.weight.ndim != 2]  # fused experts
    report.details["neuron_score"] = "relative" if options.relative else "absolute"
    return report
