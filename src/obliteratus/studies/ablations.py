"""Reversible ablations, applied with forward hooks only (no weight copy, no reload): inside the
``with`` block the model computes the ablated function, and every hook is removed in ``finally``.

    layer       decoder layer i is skipped:          resid_post_i = resid_pre_i
    heads       query heads' outputs removed:         o_proj input [.., H·hd] with head slices = 0
                (k/v heads: every query head of their GQA group, see studies/heads.py)
    ffn         MLP (or sparse MoE block) output 0:  mlp_out_i = 0
    embed_dims  residual dimensions of the embedding output set to 0 (the input of layer 0, after
                any embedding scale and position embeddings)

A skipped layer still runs (a forward hook replaces its output with its input), so KV caches keep
their shape during generation; the cost is compute, never correctness.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from ..excise.heads import head_geometry
from ..hook_points import hooked, module_hooks
from ..models.adapters import ArchitectureAdapter
from .heads import query_heads, zero_heads

Kind = Literal["layer", "heads", "ffn", "embed_dims"]


class Ablation(BaseModel):
    """One ablation of a study. ``layers`` may be "all"; with ``each`` it expands into one ablation
    per layer (a sweep)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    name: str | None = Field(None, description="Row label in the table (default: derived from the fields).")
    layers: list[int] | Literal["all"] = Field(default_factory=list, description="Decoder layers (0-based).")
    heads: list[int] = Field(default_factory=list, description="Query heads pruned in each listed layer.")
    kv_heads: list[int] = Field(default_factory=list, description="k/v heads: prunes every query head of each group.")
    dims: list[int] = Field(default_factory=list, description="Residual dimensions zeroed at the embedding output.")
    each: bool = Field(False, description="One ablation per listed layer instead of all layers at once.")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> "Ablation":
        uses = {"layer": {"layers"}, "ffn": {"layers"}, "heads": {"layers", "heads", "kv_heads"},
                "embed_dims": {"dims"}}[self.kind]
        given = {f for f in ("layers", "heads", "kv_heads", "dims") if getattr(self, f)}
        if given - uses:
            raise ValueError(f"kind {self.kind!r} takes {sorted(uses)}, not {sorted(given - uses)}")
        if "layers" in uses and not self.layers:
            raise ValueError(f"kind {self.kind!r} needs layers")
        if self.kind == "heads" and not (self.heads or self.kv_heads):
            raise ValueError("kind 'heads' needs heads and/or kv_heads")
        if self.kind == "embed_dims" and not self.dims:
            raise ValueError("kind 'embed_dims' needs dims")
        if self.each and "layers" not in uses:
            raise ValueError("each: true sweeps layers; kind 'embed_dims' has none")
        return self

    def resolved_layers(self, n_layers: int) -> list[int]:
        layers = list(range(n_layers)) if self.layers == "all" else list(self.layers)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"ablation {self.label}: layers {bad} are outside 0..{n_layers - 1}")
        return layers

    def expand(self, n_layers: int) -> list["Ablation"]:
        """Itself with concrete layers, or one copy per layer when ``each``."""
        if self.kind == "embed_dims":
            return [self]
        layers = self.resolved_layers(n_layers)
        if not self.each:
            return [self.model_copy(update={"layers": layers})]
        return [self.model_copy(update={"layers": [i], "each": False,
                                        "name": None if self.name is None else f"{self.name}[{i}]"}) for i in layers]

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [self.kind]
        if self.layers:
            parts.append(f"L{self.layers}" if self.layers == "all" else "L" + ",".join(map(str, self.layers)))
        if self.heads:
            parts.append("q" + ",".join(map(str, self.heads)))
        if self.kv_heads:
            parts.append("kv" + ",".join(map(str, self.kv_heads)))
        if self.dims:
            shown = ",".join(map(str, self.dims[:6])) + ("…" if len(self.dims) > 6 else "")
            parts.append("d" + shown)
        return " ".join(parts)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def skip_layers(adapter: ArchitectureAdapter, layers: list[int]) -> Iterator[None]:
    """Each listed decoder layer returns its input hidden state: resid_post_i = resid_pre_i."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]  # [b, t, d]
        return _replace_first(output, x)

    with module_hooks([(adapter.layers[i], hook) for i in layers], with_kwargs=True):
        yield


@contextmanager
def zero_ffn(adapter: ArchitectureAdapter, layers: list[int]) -> Iterator[None]:
    """mlp_out of each listed layer (down projection, or the whole sparse MoE block) is 0."""

    def hook(module, args, output):
        return _replace_first(output, torch.zeros_like(_first(output)))

    with module_hooks([(adapter.mlp_out(i), hook) for i in layers]):
        yield


def head_counts(config) -> tuple[int, int, int]:
    """(query heads H, k/v heads K, head_dim) of an HF config; K = H without GQA."""
    n_heads, head_dim = head_geometry(config)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return n_heads, int(n_kv), head_dim


@contextmanager
def prune_heads(adapter: ArchitectureAdapter, layers: list[int], heads: list[int],
                kv_heads: list[int] = ()) -> Iterator[None]:
    """Zero the o_proj input slices of `heads` (and of every query head sharing a k/v head in `kv_heads`)
    in each listed layer; k/v projections are never touched (shared under GQA)."""
    n_heads, n_kv, _ = head_counts(adapter.model.config)
    try:
        chosen = query_heads(list(heads), list(kv_heads), n_heads, n_kv)
    except ValueError as err:
        raise ConfigError(f"heads ablation: {err}") from None

    def hook(module, args):
        return (zero_heads(args[0], chosen, n_heads), *args[1:])  # args[0]: [b, t, H·hd]

    with module_hooks([(adapter.attn_out(i), hook) for i in layers], pre=True):
        yield


@contextmanager
def zero_embed_dims(adapter: ArchitectureAdapter, dims: list[int]) -> Iterator[None]:
    """Residual dimensions `dims` of the embedding output (layer 0's input) are 0."""
    d = adapter.d_model
    bad = [i for i in dims if not 0 <= i < d]
    if bad:
        raise ConfigError(f"embed_dims ablation: dims {bad} are outside 0..{d - 1}")
    keep = torch.ones(d)
    keep[list(dims)] = 0

    with hooked(adapter, {"embed": lambda h: h * keep.to(device=h.device, dtype=h.dtype)}):
        yield


@contextmanager
def ablate(adapter: ArchitectureAdapter, ablation: Ablation) -> Iterator[None]:
    """Apply one ablation for the duration of the block."""
    with ExitStack() as stack:
        if ablation.kind == "embed_dims":
            stack.enter_context(zero_embed_dims(adapter, ablation.dims))
        else:
            layers = ablation.resolved_layers(adapter.n_layers)
            if ablation.kind == "layer":
                stack.enter_context(skip_layers(adapter, layers))
            elif ablation.kind == "ffn":
                stack.enter_context(zero_ffn(adapter, layers))
            else:
                stack.enter_context(prune_heads(adapter, layers, ablation.heads, ablation.kv_heads))
        yield
