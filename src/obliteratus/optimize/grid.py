"""A small grid over Heretic's per-layer kernel (the ``optimized`` preset until the multi-objective
optimizer lands).

Every grid point is an :class:`~obliteratus.excise.plan.EditPlan` with the same kernel for
attention and MLP writers, scored with activation hooks (``excise.hook_form.ablated``), so the model's
weights are never copied or touched:

* refusal: mean refusal log-odds of the first answer token on the **validation** harmful prompts;
* KL: mean first-token KL(original ‖ edited) on the validation harmless prompts (the original's
  log-probs computed once).

The reference point is the plain edit (strength 1 on every writer, embeddings included). A grid
point is *admissible* when its refusal score is at most the reference's plus ``tolerance``; the
admissible point with the lowest KL wins (the reference itself when nothing beats it). Kernel
positions and widths are given as fractions of depth so one grid serves every model size.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..batching import Encoded
from ..settings import OptimizeSettings as GridOptions
from ..shared_prefix import last_logits
from ..evaluate.kl import kl_rows
from ..excise.hook_form import ablated
from ..excise.kernels import KernelOptions, kernel_strength
from ..excise.plan import EditPlan
from ..select.layers import refusal_log_odds


@dataclass
class Trial:
    kernel: dict | None  # None = the plain edit (reference)
    refusal: float  # mean refusal log-odds, val harmful
    kl: float  # mean first-token KL, val harmless
    admissible: bool = False


@dataclass
class GridResult:
    best: Trial
    trials: list[Trial]

    def to_dict(self) -> dict:
        return {"best": asdict(self.best), "trials": [asdict(t) for t in self.trials]}


def kernels(n_layers: int, options: GridOptions) -> list[KernelOptions]:
    last = n_layers - 1
    out = []
    for w, pos, dist, ratio in itertools.product(options.max_weight, options.position, options.distance,
                                                 options.min_ratio):
        out.append(KernelOptions(max_weight=w, max_weight_position=pos * last, min_weight=ratio * w,
                                 min_weight_distance=max(1.0, dist * n_layers)))
    return out


def choose(trials: list[Trial], tolerance: float) -> Trial:
    """Pure: the reference is trials[0]; lowest KL among those within `tolerance` of its refusal."""
    bar = trials[0].refusal + tolerance
    for t in trials:
        t.admissible = t.refusal <= bar
    return min((t for t in trials if t.admissible), key=lambda t: (t.kl, t.refusal))


@torch.inference_mode()
def search(adapter, q: torch.Tensor, lam: float, val_harmful: Encoded, val_harmless: Encoded, token_ids: list[int],
           options: GridOptions, *, embeddings: bool = True, biases: bool = True, batch_size: int = 32,
           progress: Callable[[int], None] | None = None, attention: bool = True, mlp: bool = True,
           experts: bool | None = None) -> GridResult:
    """Score the plain edit and every kernel of the grid on the writers the bake edits (`attention`,
    `mlp`, `experts`, `embeddings`, `biases`: the excise settings)."""
    model = adapter.model
    base = torch.log_softmax(last_logits(model, val_harmless, batch_size).double(), -1)

    def score(plan: EditPlan | None, kernel: dict | None) -> Trial:
        with ablated(adapter, q, lam, attention=attention, mlp=mlp, experts=experts, embeddings=embeddings,
                     biases=biases, plan=plan):
            refusal = float(refusal_log_odds(last_logits(model, val_harmful, batch_size), token_ids).mean())
            kl = float(kl_rows(base, torch.log_softmax(last_logits(model, val_harmless, batch_size).double(), -1)).mean())
        if progress:
            progress(1)
        return Trial(kernel, refusal, kl)

    trials = [score(None, None)]
    for k in kernels(adapter.n_layers, options):
        strength = kernel_strength(adapter.n_layers, k, k)
        if embeddings:
            strength[("embed", None)] = 1.0
        trials.append(score(EditPlan(strength=strength), k.model_dump()))
    return GridResult(choose(trials, options.tolerance), trials)
