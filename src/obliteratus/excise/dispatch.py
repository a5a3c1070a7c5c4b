"""EXCISE driver: turn the settings' choice of variant into one edit of the loaded model.

The pipeline calls :func:`apply_edit` once per pass; it builds the :class:`EditPlan` from the
settings (per-layer bases, Heretic kernels, a refitting variant's read side, the lm_head option),
runs the registered variant that ``excise.method`` names (excise/base.py; optional neuron masking),
and handles mixture-of-experts layers (expert-granular directions, expert transplant, router refit).
Every variant is in its own module; this file only wires them and never names one.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from ..batching import Encoded
from ..errors import ConfigError
from ..models.adapters import ArchitectureAdapter
from ..models.quantized import has_offload, quantized, track_modules
from .apply import EditReport, excise
from .base import get_excise_variant
from .hook_form import ablated
from .kernels import kernel_strength
from .moe import (collect_routing, excise_experts, expert_directions, router_inputs, stabilise_routers,
                  transplant_experts)
from .neurons import excise_and_mask
from .plan import EditPlan, layer_strength

if TYPE_CHECKING:
    from ..settings import ExciseSettings
    from ..directions import Directions


def build_plan(adapter: ArchitectureAdapter, directions: Directions, settings: ExciseSettings) -> EditPlan | None:
    """The EditPlan the settings ask for, or None for the plain global projection."""
    strength = None
    if settings.kernel_attn is not None or settings.kernel_mlp is not None:
        strength = kernel_strength(adapter.n_layers, settings.kernel_attn, settings.kernel_mlp)
        if settings.kernel_attn is None and settings.attention:  # a component without a kernel keeps weight 1
            strength.update({("attn", i): 1.0 for i in range(adapter.n_layers)})
        if settings.kernel_mlp is None and settings.mlp:
            strength.update({("mlp", i): 1.0 for i in range(adapter.n_layers)})
        if settings.embeddings:
            strength[("embed", None)] = 1.0
    if directions.layer_weights is not None:
        strength = layer_strength(directions.layer_weights, adapter.n_layers, attention=settings.attention,
                                  mlp=settings.mlp, embeddings=settings.embeddings)
    refits = get_excise_variant(settings.method).refit is not None
    read = directions.read if refits else None
    if refits and read is None:
        raise ConfigError(f"excise.method = {settings.method!r} needs the read basis its refit gives in DISTILL")
    # an empty table is a plan too: every writer it leaves out (here: all of them) has strength 0
    if directions.layer_bases is None and strength is None and read is None and not (settings.lm_head and not adapter.tied_lm_head):
        return None
    # A tied lm_head is the embedding matrix: the embeddings edit already covers it.
    head = settings.lm_head and not adapter.tied_lm_head
    return EditPlan(layer_bases=directions.layer_bases, strength=strength, read=read, lm_head_input=head)


def weights_held(adapter: ArchitectureAdapter) -> str | None:
    """How the model's weights are held when they are not plain tensors: 'quantized (nf4)' and the
    like (bitsandbytes' packed weights), 'offloaded' (accelerate streams them in: not in memory to
    edit), else None. Either way the edit is scored as hooks where it has a hook form
    (:func:`edit_held`) and REBIRTH bakes it into the full-precision checkpoint (run.Run.bake_source)."""
    kind = quantized(adapter.model)
    if kind is not None:
        track_modules(adapter.model)
        return f"quantized ({kind})"
    return "offloaded" if has_offload(adapter.model) else None


def check_held(adapter: ArchitectureAdapter, settings: ExciseSettings, moe: bool | None = None) -> str | None:
    """:func:`weights_held`, after checking that the edit `settings` ask for can be made on such weights
    (the pipeline calls it right after SUMMON, before any work). `moe`: whether the MoE options apply
    (default: from the adapter and the settings)."""
    held = weights_held(adapter)
    if held is None:
        return None
    if moe is None:
        m = settings.moe
        moe = bool(adapter.moe_layers) and (m.expert_directions or m.transplant or m.stabilise_routers)
    variant = get_excise_variant(settings.method)
    if not variant.low_rank or settings.neurons is not None or moe:
        raise ConfigError(f"the model's weights are {held}: only the projection edit (excise.method = project "
                          f"or leace, without neurons or MoE options) is made on such weights; {settings.method!r}"
                          " with these options edits by its own rule; load the model with model.quantization = "
                          "none and without model.max_memory")
    if held == "offloaded" and settings.norm_preserve:
        raise ConfigError("the model's weights are offloaded (model.max_memory): the edit is scored as hooks, and "
                          "a norm-preserving edit has no hook form; set excise.norm_preserve = false, or load "
                          "with model.quantization = nf4 instead of offloading")
    return held


def edit_held(adapter: ArchitectureAdapter, q, settings: ExciseSettings, plan: EditPlan | None,
              moe: bool = False) -> EditReport | None:
    """The edit of a model whose weights are held (:func:`weights_held`): None when they are plain
    tensors (edit as usual) or quantized with an edit that has no hook form (excise edits them through
    dequantize -> quantize); else the report of the edit attached as hooks. Refuses what cannot be made."""
    held = check_held(adapter, settings, moe)
    if held is None:
        return None
    # Offloaded weights are not in memory to edit; quantized ones are edited through dequantize ->
    # quantize only when the edit has no hook form (norm preservation): re-quantizing leaves part of
    # the direction in the weights (16 % of it for nf4 on tests/models/test_quantized.py's model),
    # while REBIRTH bakes the exact edit into the full-precision source, which the hooks score.
    if settings.norm_preserve:
        return None
    report = excise(adapter, q, settings, plan, write=False)
    report.hooks = ExitStack()
    report.hooks.enter_context(ablated(adapter, q, settings.lam, attention=settings.attention, mlp=settings.mlp,
                                       embeddings=settings.embeddings, biases=settings.biases, plan=plan,
                                       experts=settings.experts))
    report.details["applied_as"] = f"hooks ({held} weights; REBIRTH bakes the edit into the source)"
    return report


def apply_edit(adapter: ArchitectureAdapter, directions: Directions, settings: ExciseSettings, *,
               harmful: Encoded | None = None, harmless: Encoded | None = None, batch_size: int = 32) -> EditReport:
    """Edit the model in place as `settings` say. `harmful`/`harmless` (train prompts) are needed
    only for MoE routing statistics."""
    q = directions.basis
    plan = build_plan(adapter, directions, settings)
    moe = settings.moe
    use_moe = bool(adapter.moe_layers) and (moe.expert_directions or moe.transplant or moe.stabilise_routers)
    found = before = None
    if use_moe:
        if harmful is None or harmless is None:
            raise ConfigError("MoE options need the train prompts for routing statistics")
        if moe.expert_directions or moe.transplant:
            found = expert_directions(collect_routing(adapter, harmful, moe.routing_positions, batch_size),
                                      collect_routing(adapter, harmless, moe.routing_positions, batch_size),
                                      moe.min_routing_mass)
        if moe.stabilise_routers:
            before = router_inputs(adapter, harmless, batch_size)
        if moe.transplant:
            flagged = transplant_experts(adapter, found.skew, moe.transplant_fraction, moe.transplant_alpha)
    held = edit_held(adapter, q, settings, plan, use_moe)
    if held is not None:
        return held
    if moe.expert_directions and use_moe:
        settings = settings.model_copy(update={"experts": False})  # routed experts get their own directions below

    if settings.neurons is not None:  # only variants declaring neurons=True accept it (excise/base.py)
        report = excise_and_mask(adapter, q, settings.neurons, settings, plan)
    else:
        report = get_excise_variant(settings.method).apply(adapter, q, settings, plan)
    # the edit as tensor ops (an edit plan to bake elsewhere) exists for the projection family only
    missing = (f"excise.method = {settings.method!r} edits by its own rule" if report.ops is None else
               "excise.neurons masks neurons after the projection" if settings.neurons is not None else
               "the MoE options (expert directions, transplant, router refit) edit experts and routers by their own "
               "rules" if use_moe else None)
    if missing is not None:
        report.ops, report.ops_missing = None, missing

    if use_moe:
        if moe.expert_directions:
            edited = excise_experts(adapter, found.directions, settings.lam, norm_preserve=settings.norm_preserve,
                                    biases=settings.biases)
            report.edited += edited
            report.details["expert_fallbacks"] = {i: int(m.sum()) for i, m in found.fallback.items()}
        if moe.transplant:
            report.details["transplanted_experts"] = flagged
        if moe.stabilise_routers:
            report.details["router_change"] = stabilise_routers(adapter, before, router_inputs(adapter, harmless, batch_size),
                                                                moe.router_ridge)
    return report
