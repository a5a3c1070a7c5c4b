"""Architecture adapters: where each family keeps its decoder layers and residual-stream writers.

Every activation we read or edit has a stable hook name:

    embed                 output of the token (+ position) embeddings     [batch, seq, d]
    layers.{i}.resid_pre  input of decoder layer i (= resid_post of i-1)   [batch, seq, d]
    layers.{i}.resid_post output of decoder layer i                         [batch, seq, d]
    layers.{i}.attn_out   output of layer i's attention output projection  [batch, seq, d]
    layers.{i}.mlp_out    output of layer i's MLP down projection          [batch, seq, d]
                          (MoE layers: output of the whole sparse block, routed + shared experts)
    layers.{i}.experts_out        MoE layers with fused experts: output of the routed experts module
                                  (routing-weighted sum of every expert's down projection) [tokens, d]
    layers.{i}.shared_expert_out  MoE layers with a shared expert: output of its down projection
                                  (before its sigmoid gate)                              [tokens, d]
    lm_head_in            input of the lm_head (after the final norm)     [batch, seq, d]

Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss) have several writers behind
``mlp_out``. transformers 5 stores the routed experts *fused*: one 3-D parameter
``experts.down_proj`` ``[E, d, I]`` (``F.linear`` per expert, residual axis −2: "out_in") or, with
``experts.is_transposed`` (gpt-oss), ``[E, I, d]`` (``x @ W``, residual axis −1: "in_out"), plus an
optional ``down_proj_bias`` ``[E, d]``. One Writer covers all E experts of a layer; its ``layout``
applies to the last two axes and the projection broadcasts over the leading expert axis. Older
checkpoints/code with an ``nn.ModuleList`` of experts give one Writer per expert module instead.
The experts module returns y = Σ_k w_k·(W_{e_k} g_k + b_{e_k}) with routing weights w that do not
depend on the expert weights, so projecting every expert's down projection equals projecting the
experts module's output (``Writer.hook_module``); with an unprojected expert bias the hook needs
the routed bias mix Σ_k w_k b_{e_k} (``Writer.routed_bias``; see ``excise.moe``). Qwen2-MoE's
shared expert is scaled by sigmoid(shared_expert_gate(x)), a per-token scalar, so its own
``down_proj`` is an ordinary writer. Routers (``mlp.gate`` / ``mlp.router``) and the shared-expert
gate only *read* the residual stream and are never writers.

A *writer* is a module whose output is added to the residual stream. Which side of its weight
lives in the residual stream follows from the module's role and type, never from the shape of
the tensor (a square o_proj would be ambiguous): ``nn.Linear`` stores ``[out=d, in]``, GPT-2's
``Conv1D`` stores ``[in, out=d]``, ``nn.Embedding`` stores ``[vocab, d]``.

Two sources, one adapter. The hand table ``SPECS`` below is the fast path for its 14 families (no
forward pass). Any other model type falls back to architecture discovery (``discover.py``: one
traced forward pass on a tiny text input and perturbations of it find the layers, embeddings, final
norm, lm_head, every residual writer with its residual axis, and the MoE parts), which also covers
hybrid layers (several token mixers, layers that differ) and fused experts classes the table does not
know (the layout discovery found is used). A multimodal wrapper is edited in its text decoder only:
every discovered writer must lie in the decoder layers or the token embeddings, never in a vision
tower. A vector parameter that code adds to the residual stream outside any module's output (JetMoE's
attention and MoE biases, GPT-NeoX-Japanese's ``dense_bias``) is a *bias-only writer*:
``bias_writers()`` lists them apart from ``writers()`` (they have no matrix), and the edit projects
them like any writer's bias. Writers followed by a norm before the residual add
(``post_writer_norm``) are still edited; the edit is then not an exact projection, which is logged
as a warning and reported in ``EditReport.post_writer_norm``. What discovery cannot find is one
``UnsupportedArchitectureError`` that names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ObliteratusError, UnsupportedArchitectureError
from .discover import ArchSpec, Discovery, Layout, MoERole, MoESpec, discover, resolve

log = logging.getLogger(__name__)

LLAMA_LIKE = dict(
    body="model",
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Llama", ("llama",), **LLAMA_LIKE),
    ArchSpec("Mistral", ("mistral",), **LLAMA_LIKE),
    ArchSpec("Qwen2", ("qwen2",), **LLAMA_LIKE),
    ArchSpec("Qwen3", ("qwen3",), **LLAMA_LIKE),
    ArchSpec("Gemma", ("gemma",), **LLAMA_LIKE),
    ArchSpec("Gemma2", ("gemma2",), **LLAMA_LIKE, post_writer_norm=True),
    ArchSpec("Gemma3 (text)", ("gemma3_text",), **LLAMA_LIKE, post_writer_norm=True),
    ArchSpec("Phi-3", ("phi3",), **LLAMA_LIKE),
    ArchSpec("Mixtral (MoE)", ("mixtral",), **LLAMA_LIKE,
             moe=MoESpec(expert_down="down_proj|w2")),  # w2: per-module experts of transformers 4
    ArchSpec("Qwen2-MoE", ("qwen2_moe",), **LLAMA_LIKE,
             moe=MoESpec(shared_expert="mlp.shared_expert.down_proj", shared_expert_gate="mlp.shared_expert_gate")),
    ArchSpec("Qwen3-MoE", ("qwen3_moe",), **LLAMA_LIKE, moe=MoESpec()),
    ArchSpec("gpt-oss (MoE)", ("gpt_oss",), **LLAMA_LIKE, moe=MoESpec(router="mlp.router")),
    ArchSpec(
        "GPT-2",
        ("gpt2",),
        body="transformer",
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    ArchSpec(
        "GPT-NeoX",
        ("gpt_neox",),
        body="gpt_neox",
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head|embed_out",  # transformers 5 renamed embed_out
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in SPECS for mt in spec.model_types}


def supported_families() -> list[str]:
    return [spec.family for spec in SPECS]


def spec_for(model_type: str) -> ArchSpec:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported families: {', '.join(supported_families())} "
            f"(model_type: {', '.join(sorted(_BY_MODEL_TYPE))})"
        ) from None


# Fused experts modules by class name -> which axis of the 3-D tensor is the residual stream, for
# transformers versions whose experts modules do not carry ``is_transposed``.
_FUSED_LAYOUTS: dict[str, Layout] = {
    "MixtralExperts": "out_in", "Qwen2MoeExperts": "out_in", "Qwen3MoeExperts": "out_in", "GptOssExperts": "in_out",
}


def fused_layout(module: nn.Module) -> Layout:
    """Residual axis of a fused experts module's down projection, decided by the module (type)."""
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} normalises each expert's output: the projection would not be linear in it")
    transposed = getattr(module, "is_transposed", None)
    if transposed is not None:
        return "in_out" if transposed else "out_in"
    try:
        return _FUSED_LAYOUTS[type(module).__name__]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown fused experts module {type(module).__name__}; known: {', '.join(_FUSED_LAYOUTS)}") from None


@dataclass(frozen=True)
class Writer:
    """One module (or one fused parameter of a module) that writes into the residual stream.

    kind is "attn", "mlp" or "embed"; every MLP-side writer of an MoE layer (routed experts, shared
    expert, dense MLP) has kind "mlp", and ``moe`` says which ("routed" / "shared", None otherwise)."""

    name: str  # hook name, e.g. "layers.3.attn_out", "embed.wte", "layers.3.experts", "layers.3.experts.5"
    module: nn.Module
    kind: Literal["attn", "mlp", "embed"]
    moe: MoERole | None = None
    param: str = "weight"  # attribute of `module` holding the edited tensor
    bias_param: str | None = "bias"
    fused: bool = False  # `param` is a 3-D [E, .., ..] tensor holding every routed expert of the layer
    found_layout: Layout | None = None  # the residual axis as discovery found it (None: decided by module type)
    post_norm: str | None = None  # discovered: the norm between this writer and the residual add, if any
    # a discovered writer whose module normalises its own output (an embedding with a norm inside): the
    # hook form projects that norm's input, where the weight edit acts, not the module's output
    hook_input: nn.Module | None = None
    # a bias-only writer (``ArchitectureAdapter.bias_writers``): ``param`` is a vector [d] that code adds
    # to the residual stream outside any module's output; ``weight`` is that vector and ``bias`` None
    bias_only: bool = False

    @property
    def layout(self) -> Layout:
        """Which axis of ``weight`` is the residual stream: decided by module type (for a fused
        [E, ·, ·] tensor: of its last two axes, by the experts module); for a discovered writer, the
        axis discovery found by perturbation."""
        if self.found_layout is not None:
            return self.found_layout
        if self.fused:
            return fused_layout(self.module)
        if isinstance(self.module, nn.Linear):
            return "out_in"
        if isinstance(self.module, nn.Embedding):
            return "in_out"  # [vocab, d]: each row is a residual vector
        if type(self.module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b
            return "in_out"
        raise ObliteratusError(f"writer {self.name}: unsupported module type {type(self.module).__name__}")

    @property
    def weight(self) -> torch.Tensor:
        """The parameter whose residual side is edited (``layout`` says which axis that is):
        ``[d, in]``/``[n, d]``, or ``[E, d, I]``/``[E, I, d]`` for fused experts."""
        return getattr(self.module, self.param)

    @property
    def bias(self) -> torch.Tensor | None:
        """``[d]``, or ``[E, d]`` for fused experts (one bias per expert)."""
        bias = getattr(self.module, self.bias_param, None) if self.bias_param else None
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0] if self.fused else 1

    @property
    def routed_bias(self) -> bool:
        """True when the bias reaches the residual weighted by routing (fused experts with a bias):
        the hook form of an edit that leaves biases alone needs the routing weights."""
        return self.fused and self.bias is not None

    @property
    def hook_module(self) -> nn.Module:
        """The module whose output the activation-hook form of the edit projects: the writer's
        module; for fused experts that is the experts module, whose output is the routing-weighted
        sum of every expert's down projection. (A writer with ``hook_input`` is hooked at that norm's
        input instead.)"""
        return self.module


def _get(root: nn.Module, path: str) -> nn.Module:
    """Module at a dotted path; "a|b" tries the alternatives in order (names that differ across versions)."""
    *alternatives, last = path.split("|")
    for alt in alternatives:
        try:
            return _get(root, alt)
        except AttributeError:
            pass
    module = root
    for part in last.split("."):
        module = getattr(module, part)
    return module


class ArchitectureAdapter:
    """Maps a loaded HF causal LM to hook names and residual writers: by the table (``SPECS``) for
    its families, by architecture discovery (``discovery`` is then the :class:`Discovery`) otherwise."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.discovery: Discovery | None = None
        model_type = model.config.model_type
        if model_type not in _BY_MODEL_TYPE:
            self.spec: ArchSpec | None = None
            self._init_discovered(model, model_type)
            return
        self.spec = spec_for(model_type)
        self._bias_writers: list[Writer] = []
        try:
            self.body = _get(model, self.spec.body)
            self.layers = _get(model, self.spec.layers)
            self.embeddings = [_get(model, p) for p in self.spec.embeddings]
            self.final_norm = _get(model, self.spec.final_norm)
            self.lm_head = _get(model, self.spec.lm_head)
            self.moe_layers = [i for i, layer in enumerate(self.layers) if self._has_experts(layer)]
            for i, layer in enumerate(self.layers):
                _get(layer, self.spec.attn_out)
                if i in self.moe_layers:
                    self.router(i), self.expert_writers(i), self.shared_expert_writer(i), self.mlp_out(i)
                else:
                    _get(layer, self.spec.mlp_out)
        except AttributeError as err:
            raise UnsupportedArchitectureError(
                f"{self.spec.family} adapter does not match this checkpoint's modules ({err}); "
                "the transformers version may have renamed them"
            ) from None

    def _init_discovered(self, model: nn.Module, model_type: str) -> None:
        try:
            found = discover(model)
        except UnsupportedArchitectureError as err:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r}: architecture discovery could not find it: {err} "
                f"(families of the table: {', '.join(supported_families())})") from None
        allowed = (found.layers, *found.embeddings)
        outside = [w.path for w in found.writers if not any(_within(w.path, p) for p in allowed)]
        if outside:  # e.g. a vision tower: only the text decoder is edited
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r}: discovered writers outside the decoder layers "
                f"{found.layers} and the token embeddings: {', '.join(outside)}")
        self.discovery = found
        self.body = resolve(model, found.body)
        self.layers = resolve(model, found.layers)
        self.embeddings = [resolve(model, p) for p in found.embeddings]
        # no final norm module (a functional norm, or none): the last layer's output reaches the lm_head as it is
        self.final_norm = resolve(model, found.final_norm) if found.final_norm is not None else nn.Identity()
        self.lm_head = resolve(model, found.lm_head)
        self.moe_layers = found.moe_layers
        every = [
            Writer(w.name, w.module, w.kind, moe=w.moe, param=w.param, bias_param=w.bias_param, fused=w.fused,
                   found_layout=w.layout, post_norm=w.post_norm,
                   hook_input=resolve(model, w.post_norm) if w.post_norm and _within(w.post_norm, w.path) else None,
                   bias_only=w.bias_only)
            for w in found.writers]
        self._found_writers = [w for w in every if not w.bias_only]
        self._bias_writers = [w for w in every if w.bias_only]
        normed = [w.name for w in self._found_writers if w.post_norm]
        if normed:
            log.warning("%s: %d residual writers are normalised before the residual add (%s%s): the edit still "
                        "runs, but it is not an exact projection of the residual stream (post_writer_norm in the "
                        "edit report)", model_type, len(normed), ", ".join(normed[:4]),
                        ", ..." if len(normed) > 4 else "")

    @property
    def family(self) -> str:
        if self.spec is None:
            return f"{self.model.config.model_type} (discovered)"
        return self.spec.family

    @property
    def post_writer_norm(self) -> bool:
        """True when some writer's output is normalised before the residual add (Gemma 2/3 sandwich
        norms): the projection of its weights is then not exact on the residual stream."""
        return self.discovery.post_writer_norm if self.spec is None else self.spec.post_writer_norm

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.embeddings[0].weight.shape[-1]

    @property
    def tied_lm_head(self) -> bool:
        """True when lm_head shares its weight with the token embedding (editing one edits both)."""
        return self.lm_head.weight is self.embeddings[0].weight

    def _layer_found(self, i: int, kind: str, moe: str | None = "any") -> list[Writer]:
        return [w for w in self._found_writers if w.name.startswith(f"layers.{i}.") and w.kind == kind
                and (moe == "any" or w.moe == moe)]

    def attn_out(self, i: int) -> nn.Module:
        if self.spec is None:
            found = self._layer_found(i, "attn")
            if not found:
                raise ObliteratusError(f"layer {i} of this {self.family} model has no token-mixing writer "
                                       f"(its writers: {self.discovery.layer_kinds[i]})")
            return found[0].module
        return _get(self.layers[i], self.spec.attn_out)

    def mlp_out(self, i: int) -> nn.Module:
        """The module whose output is layer i's mlp_out: the down projection, or the sparse MoE block."""
        if self.spec is None:
            if i in self.moe_layers:
                return resolve(self.model, self.discovery.moe[i].block)
            found = self._layer_found(i, "mlp", None)
            if not found:
                raise ObliteratusError(f"layer {i} of this {self.family} model has no MLP writer "
                                       f"(its writers: {self.discovery.layer_kinds[i]})")
            return found[0].module
        if self.spec.moe is not None and i in self.moe_layers:
            return _get(self.layers[i], self.spec.moe.block)
        return _get(self.layers[i], self.spec.mlp_out)

    # -- mixture of experts ---------------------------------------------------------------------

    def _has_experts(self, layer: nn.Module) -> bool:
        if self.spec.moe is None:
            return False
        try:
            _get(layer, self.spec.moe.experts)
        except AttributeError:
            return False
        return True

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def _moe_spec(self, i: int) -> MoESpec | None:
        """The table's MoESpec of an MoE layer (None for a discovered model); an error for a dense layer."""
        if i not in self.moe_layers or (self.spec is not None and self.spec.moe is None):
            raise ObliteratusError(f"layer {i} of this {self.family} model is not a mixture-of-experts layer "
                                   f"(MoE layers: {self.moe_layers})")
        return self.spec.moe if self.spec is not None else None

    def router(self, i: int) -> nn.Module:
        """Layer i's router: weight [E, d] (+ bias [E]); its forward returns (logits [tokens, E], ...)
        with the batch and sequence axes flattened into one tokens axis."""
        if self.spec is None:
            self._moe_spec(i)
            path = self.discovery.moe[i].router
            if path is None:
                raise ObliteratusError(f"layer {i} of this {self.family} model: discovery found no router")
            return resolve(self.model, path)
        return _get(self.layers[i], self._moe_spec(i).router)

    def experts(self, i: int) -> nn.Module:
        if self.spec is None:
            self._moe_spec(i)
            return resolve(self.model, self.discovery.moe[i].experts)
        return _get(self.layers[i], self._moe_spec(i).experts)

    def n_experts(self, i: int) -> int:
        if self.spec is None:
            return sum(w.n_experts for w in self.expert_writers(i))
        return self.router(i).weight.shape[0]

    def shared_expert_gate(self, i: int) -> nn.Module | None:
        if self.spec is None:
            self._moe_spec(i)
            path = self.discovery.moe[i].shared_expert_gate
            return None if path is None else resolve(self.model, path)
        path = self._moe_spec(i).shared_expert_gate
        return None if path is None else _get(self.layers[i], path)

    def expert_writers(self, i: int) -> list[Writer]:
        """Layer i's routed experts: one fused Writer ([E, ..] tensor), or one Writer per expert module."""
        if self.spec is None:
            self._moe_spec(i)
            return self._layer_found(i, "mlp", "routed")
        moe = self._moe_spec(i)
        experts = self.experts(i)
        if isinstance(experts, nn.ModuleList):
            return [Writer(f"layers.{i}.experts.{e}", _get(expert, moe.expert_down), "mlp", moe="routed")
                    for e, expert in enumerate(experts)]
        names = moe.expert_down.split("|")
        param = next((p for p in names if isinstance(getattr(experts, p, None), torch.Tensor)), None)
        if param is None:
            raise AttributeError(f"{type(experts).__name__} has no expert down projection {moe.expert_down!r}")
        writer = Writer(f"layers.{i}.experts", experts, "mlp", moe="routed", param=param,
                        bias_param=moe.expert_down_bias, fused=True)
        w, d = writer.weight, self.d_model
        if w.ndim != 3 or w.shape[-2 if writer.layout == "out_in" else -1] != d:
            raise UnsupportedArchitectureError(
                f"{writer.name}: fused down projection {tuple(w.shape)} has no residual axis of size d = {d} "
                f"where layout {writer.layout!r} puts it")
        return [writer]

    def shared_expert_writer(self, i: int) -> Writer | None:
        """Layer i's shared expert (the first, where discovery found several: ``writers`` lists them all)."""
        if self.spec is None:
            self._moe_spec(i)
            return next(iter(self._layer_found(i, "mlp", "shared")), None)
        path = self._moe_spec(i).shared_expert
        return None if path is None else Writer(f"layers.{i}.shared_expert", _get(self.layers[i], path), "mlp",
                                                moe="shared")

    def writers(self, *, attention: bool = True, mlp: bool = True, embeddings: bool = True,
                layers: list[int] | None = None, experts: bool | None = None) -> list[Writer]:
        """Residual writers. `mlp` selects dense MLPs and shared experts; `experts` (default: as `mlp`)
        selects routed experts."""
        experts = mlp if experts is None else experts
        if self.spec is None:
            return self._discovered_writers(attention, mlp, embeddings, layers, experts)
        out: list[Writer] = []
        if embeddings:
            names = [p.rsplit(".", 1)[-1] for p in self.spec.embeddings]
            out += [Writer(f"embed.{n}", m, "embed") for n, m in zip(names, self.embeddings)]
        for i in range(self.n_layers) if layers is None else layers:
            if attention:
                out.append(Writer(f"layers.{i}.attn_out", self.attn_out(i), "attn"))
            if i not in self.moe_layers:
                if mlp:
                    out.append(Writer(f"layers.{i}.mlp_out", self.mlp_out(i), "mlp"))
                continue
            if experts:
                out += self.expert_writers(i)
            shared = self.shared_expert_writer(i)
            if mlp and shared is not None:
                out.append(shared)
        return out

    def bias_writers(self, *, attention: bool = True, mlp: bool = True, embeddings: bool = True,
                     layers: list[int] | None = None) -> list[Writer]:
        """Bias-only writers (discovered models only; the table's families have none): vector parameters
        added to the residual stream outside any module's output, selected by kind as ``writers`` does.
        Not in ``writers()``: they have no matrix (no heads, neurons or LoRA), only the projection edits
        them (with ``biases``), and its hook form sets the edited vector for the duration of the hook.
        An embedding norm's shift (post-LN decoders) is kind "embed", selected with the embeddings."""
        wanted = {"attn": attention, "mlp": mlp, "embed": embeddings}
        return [w for w in getattr(self, "_bias_writers", ()) if wanted.get(w.kind, False)
                and (layers is None or (w.kind != "embed" and int(w.name.split(".")[1]) in layers))]

    def _discovered_writers(self, attention: bool, mlp: bool, embeddings: bool, layers: list[int] | None,
                            experts: bool) -> list[Writer]:
        """The discovered writers in the table's order (embeddings, then per layer: token mixers, dense
        MLP or routed experts, shared experts), filtered as ``writers`` says."""
        wanted = {"embed": embeddings, "attn": attention, None: mlp, "routed": experts, "shared": mlp}
        out = [w for w in self._found_writers if w.kind == "embed" and embeddings]
        for i in range(self.n_layers) if layers is None else layers:
            out += [w for w in self._found_writers if w.name.startswith(f"layers.{i}.")
                    and wanted["attn" if w.kind == "attn" else w.moe]]
        return out

    def hook_names(self) -> list[str]:
        names = ["embed"]
        for i in range(self.n_layers):
            names += [f"layers.{i}.{p}" for p in ("resid_pre", "resid_post")]
            if self.spec is not None or self._layer_found(i, "attn"):
                names.append(f"layers.{i}.attn_out")
            if self.spec is not None or i in self.moe_layers or self._layer_found(i, "mlp", None):
                names.append(f"layers.{i}.mlp_out")
            if i in self.moe_layers:
                routed = self.expert_writers(i)
                names += [f"layers.{i}.experts_out"] if routed and routed[0].fused else []
                names += [f"layers.{i}.shared_expert_out"] if self.shared_expert_writer(i) is not None else []
        return names + ["lm_head_in"]

    def module_for(self, name: str) -> tuple[nn.Module, Literal["output", "input"]]:
        """The module and the side (its input or output) that carries the activation `name`."""
        parts = name.split(".")
        if name == "embed":
            return self.layers[0], "input"
        if name == "lm_head_in":
            return self.lm_head, "input"
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < self.n_layers:
            i, point = int(parts[1]), parts[2]
            if point == "resid_pre":
                return self.layers[i], "input"
            if point == "resid_post":
                return self.layers[i], "output"
            if point in ("attn_out", "mlp_out") and name in self.hook_names():
                return (self.attn_out(i) if point == "attn_out" else self.mlp_out(i)), "output"
            if point in ("experts_out", "shared_expert_out") and name in self.hook_names():
                return (self.experts(i) if point == "experts_out" else self.shared_expert_writer(i).module), "output"
        valid = ", ".join(self.hook_names()[:6])
        raise KeyError(f"unknown hook name {name!r}; valid names: {valid}, ... layers.{self.n_layers - 1}.mlp_out, "
                       "lm_head_in (MoE layers also: layers.{i}.experts_out, layers.{i}.shared_expert_out)")


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")
