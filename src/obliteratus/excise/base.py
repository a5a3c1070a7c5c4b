"""EXCISE interface: an excise variant is one edit of the residual writers, registered with what it can do.

Each variant lives in its own module and registers itself once with :func:`register_excise_variant`:
its name (``excise.method``), ``apply(adapter, q [k, d], settings, plan) -> EditReport`` and the
capabilities it declares. Which options combine with which variant is decided here, from those
declarations, in one place (:func:`check_excise` within ``[excise]``, :func:`check_settings` across
sections; settings.py's validators call them): an option a variant would silently drop is an error.

Capabilities (a variant declares what it supports; the defaults are the plain projection's):

* ``hook_form``: mode = "hooks" applies it as inference-time ablation equal to the weight edit;
* ``low_rank``: the edit is a low-rank update of each writer (``--lora`` exports it);
* ``moe``: the MoE steps (expert directions, expert transplant, router refit) may run after it;
* ``strengths``: per-writer strengths from an EditPlan: "any" (kernels, every layer_weights),
  "select" (only 0/1 selection: layer_weights = through_source) or "none";
* ``lm_head``: the lm_head's input side can be edited too; ``layer_bases``: per-layer bases
  (directions.scope = per_layer, biproject); ``lam``: the strength lam means something to it;
  ``neurons``: neuron masking can run alongside; ``attention_only``: it edits attention writers only;
* ``refit(positive [n, d], negative [m, d]) -> (basis [1, d], read [1, d])``: DISTILL replaces the
  direction method's basis by the variant's own fit at the source layer (LEACE's oblique read side);
  such a variant takes only a direction method declared ``mean_difference`` and no direction-side
  transforms of the basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from ..directions import direction_methods, get_direction_method
from ..registry import Registry

if TYPE_CHECKING:
    from ..settings import ExciseSettings, Settings
    from ..models.adapters import ArchitectureAdapter
    from .apply import EditReport
    from .plan import EditPlan

ApplyFn = Callable[["ArchitectureAdapter", torch.Tensor, "ExciseSettings", "EditPlan | None"], "EditReport"]
RefitFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ExciseVariant:
    name: str
    description: str
    apply: ApplyFn
    what: str = ""  # the edit in words, for the messages that reject a combination ("is an orthogonal reflection …")
    hook_form: bool = False
    low_rank: bool = False
    moe: bool = True
    strengths: Literal["any", "select", "none"] = "any"
    lm_head: bool = True
    layer_bases: bool = True
    lam: bool = True
    neurons: bool = False
    attention_only: bool = False
    refit: RefitFn | None = None


EXCISE_VARIANTS: Registry[ExciseVariant] = Registry("excise variant")


def register_excise_variant(name: str, description: str, apply: ApplyFn, **capabilities) -> ExciseVariant:
    return EXCISE_VARIANTS.register(name, ExciseVariant(name, description, apply, **capabilities))


def excise_variants() -> dict[str, ExciseVariant]:
    return EXCISE_VARIANTS.as_dict()


def get_excise_variant(name: str) -> ExciseVariant:
    return EXCISE_VARIANTS.get(name)


def _moe_steps(ex: ExciseSettings) -> bool:
    return ex.moe.expert_directions or ex.moe.transplant or ex.moe.stabilise_routers


def check_excise(ex: ExciseSettings) -> None:
    """The rules within ``[excise]``; ValueError (pydantic reports it as a field error) on the first broken one."""
    if ex.method not in EXCISE_VARIANTS:
        raise ValueError(f"unknown excise.method {ex.method!r}; valid: {', '.join(sorted(EXCISE_VARIANTS))}")
    v, name = EXCISE_VARIANTS.get(ex.method), ex.method
    kernels = ex.kernel_attn is not None or ex.kernel_mlp is not None
    hooks = ex.mode == "hooks"
    if hooks and (ex.norm_preserve or not v.hook_form or ex.neurons is not None):
        raise ValueError("mode = 'hooks' supports only the plain projection (no norm_preserve, neurons or variants)")
    if ex.layer_weights != "none" and kernels:
        raise ValueError("layer_weights and kernels both set per-layer strengths: choose one")
    if ex.passes > 1 and hooks:
        raise ValueError("passes > 1 needs mode = 'weights'")
    if ex.neurons is not None and not v.neurons:
        raise ValueError(f"neurons masks MLP neurons alongside the projection edit; method = {name!r} is a "
                         "different edit that would drop the masking: use one or the other")
    if hooks and (kernels or ex.layer_weights != "none"):
        raise ValueError("mode = 'hooks' ablates one global basis at full strength from every writer: no kernels "
                         "or layer_weights (they need mode = 'weights')")
    if hooks and _moe_steps(ex):
        raise ValueError("mode = 'hooks' does not run the MoE steps (moe.expert_directions, transplant, "
                         "stabilise_routers): they edit expert and router weights; use mode = 'weights'")
    if not v.moe and _moe_steps(ex):
        raise ValueError(f"method = {name!r} {v.what}: the MoE steps (moe.expert_directions, transplant, "
                         "stabilise_routers) do not run after it; turn them off")
    dropped = []
    if v.strengths == "none" and (kernels or ex.layer_weights != "none"):
        dropped.append("kernels or layer_weights")
    if v.strengths == "select" and (kernels or ex.layer_weights not in ("none", "through_source")):
        dropped.append("per-layer strengths (kernels, layer_weights spectral/informed); through_source selects "
                       "writers and works")
    if not v.lm_head and ex.lm_head:
        dropped.append("lm_head")
    if v.attention_only and not ex.attention:
        dropped.append("attention = false (it would leave it nothing)")
    if dropped:
        raise ValueError(f"method = {name!r} {v.what}: no {', '.join(dropped)} with it")
    if not v.lam and ex.lam != 1.0:
        raise ValueError(f"method = {name!r} {v.what}; lam does not apply to it: leave lam at 1")


def check_settings(settings: Settings) -> None:
    """The rules between ``[excise]`` and the other sections."""
    ds, ex = settings.directions, settings.excise
    v = EXCISE_VARIANTS.get(ex.method)
    if v.refit is not None and not get_direction_method(ds.method).mean_difference:
        valid = " or ".join(repr(n) for n, m in direction_methods().items() if m.mean_difference)
        raise ValueError(f"excise.method = {ex.method!r} fits its own rank-1 eraser at the source layer and would "
                         f"replace the {ds.method!r} directions: use directions.method = {valid} with it")
    if v.refit is not None and (ds.project_harmless or ds.biproject or ds.scope == "per_layer" or ds.index is not None):
        raise ValueError(f"excise.method = {ex.method!r} replaces the basis with its own rank-1 eraser (one global "
                         "read side) fitted at the source layer: directions.project_harmless, biproject, "
                         "scope = 'per_layer' and index would be dropped or meet a read side they do not match; "
                         "turn them off with it")
    if not v.layer_bases and (ds.scope == "per_layer" or ds.biproject):
        raise ValueError(f"excise.method = {ex.method!r} edits with one global direction: no "
                         "directions.scope = 'per_layer' or biproject with it")
    if ex.mode == "hooks" and (ds.scope == "per_layer" or ds.biproject):
        raise ValueError("excise.mode = 'hooks' ablates one global basis: no directions.scope = 'per_layer' or "
                         "biproject with it (use mode = 'weights')")
    if ex.mode == "hooks" and settings.optimize.enabled and settings.optimize.search == "grid":
        raise ValueError("optimize.search = 'grid' picks a per-layer kernel, which excise.mode = 'hooks' cannot "
                         "apply: use mode = 'weights'")
