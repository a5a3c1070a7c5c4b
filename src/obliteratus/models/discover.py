"""Architectures found by role, not by a table: the decoder layers, embeddings, final norm, lm_head
and every residual writer of a decoder-only model, decided from one traced forward pass on a tiny
text input and a few perturbations of it (issue 26). ``ArchitectureAdapter`` (adapters.py) uses it
for every model type its table does not list.

The residual stream is what flows from one decoder layer to the next. Everything here is decided by
what a module *does* to it, never by a module's name or by the shape of a tensor:

* **decoder layers**: the ``nn.ModuleList`` whose children are called in order, each one's hidden
  output being exactly the next one's hidden input (the longest such chain).
* **token embeddings** and **lm_head**: ``get_input_embeddings()`` / ``get_output_embeddings()``
  (the transformers API says which modules play these roles; without the latter, the module whose
  output is the logits); tied when they share one weight.
  Other embeddings (learned positions): modules outside the layers, called before layer 0, whose
  output reaches layer 0's input as it is (the writer test below).
* **final norm**: the module outside the layers whose output is exactly the lm_head's input (None,
  with a note, when a functional norm does it).
* **residual writers**: module m of layer i is a *direct writer* when adding a random residual-space
  vector δ to its output moves layer i's output by exactly c_t·δ (a per-token scalar c_t: a routing
  weight, a sigmoid gate, a residual multiplier) while every other module of the layer is held at
  what it returned (so that the path through a later reader of the stream, such as the MLP reading
  what attention wrote, does not count): then removing a direction from m's output removes it from
  what m adds to the stream. Its edited parameter and which axis of it is the residual side
  are found the same way: the parameter P and axis a of P (of its last two axes) such that adding
  δ on axis a (and a random vector on the other axis, to every expert of a fused [E, ·, ·] tensor)
  moves m's output by c_t·δ. An ``nn.Linear`` gives (weight, axis −2: "out_in"), GPT-2's ``Conv1D``
  (weight, −1: "in_out"), an embedding (weight, −1), fused experts (down_proj, −2 or −1).
  A direct contributor that holds no such parameter (a norm, a dropout) is traced back to the
  module whose output is its input: a writer, or a block whose own writers are found the same way
  (a norm after a whole MoE block). Unless the contributor passes δ on as it is (a dropout, a
  scale), those are writers followed by a norm before the residual add (Gemma 2/3 and OLMo 2
  sandwich norms, ``post_norm``): projecting them removes the direction from the norm's *input*, and
  the norm's elementwise gain can bring a little back. An embedding module with a norm inside it
  is the same: its rows are found at the norm's input.
* **kind**: a writer is "attn" when it mixes token positions (with every other writer of the layer
  frozen, changing the layer's input at position 0 changes its output at later positions: attention,
  SSM and linear-attention mixers alike), "mlp" otherwise.
* **mixture of experts**: routed experts are the writers with a fused [E, ·, ·] parameter or inside
  an ``nn.ModuleList`` of experts; the MoE block is the outermost direct contributor around them;
  the router is the module in the block whose weight changes the routed experts' outputs, the
  shared-expert gate the one whose weight changes the block's output but no writer's.

Every layer is then checked for completeness: with the direction removed from the layer's input and
from every found writer's output (the norm's output for post-norm writers), the layer's output must
have no component along it. What cannot be found or does not add up is an
:class:`~obliteratus.errors.UnsupportedArchitectureError` that names it.

A wrapper whose forward needs more than text (BLIP-2, InstructBLIP) is searched through the
language model inside it (the outermost submodule with its own lm_head); paths stay relative to the
wrapper. Discovery runs the model's own forward, so on a real checkpoint in bfloat16 the tolerances
are looser; a tiny float32 copy built from the same config gives the same paths.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

# ---------------------------------------------------------------------------- the table's row form
# (here rather than in adapters.py, which imports this module: ArchSpec is what a table row of
# adapters.py holds and what Discovery.arch_spec() gives)

Layout = Literal["out_in", "in_out"]
MoERole = Literal["routed", "shared"]


@dataclass(frozen=True)
class MoESpec:
    """Where a sparse MoE layer keeps its parts, relative to one decoder layer. A layer is treated as
    MoE when ``experts`` exists in it (Qwen2/3-MoE can keep dense MLPs in ``mlp_only_layers``)."""

    block: str = "mlp"  # the sparse block; its output is the layer's mlp_out hook point
    experts: str = "mlp.experts"  # fused experts module, or an nn.ModuleList of expert modules
    router: str = "mlp.gate"  # reads the residual: logits [tokens, E] = W x (+ b)
    expert_down: str = "down_proj"  # fused [E, ..] parameter name, or each expert's down submodule
    expert_down_bias: str = "down_proj_bias"  # fused [E, d] bias parameter name (if any)
    shared_expert: str | None = None  # shared expert's down projection (a writer)
    shared_expert_gate: str | None = None  # sigmoid gate of the shared expert (a reader)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    body: str  # base model (decoder without lm_head), relative to the CausalLM
    layers: str  # ModuleList of decoder layers, relative to the CausalLM
    embeddings: tuple[str, ...]  # modules whose output starts the residual stream
    attn_out: str  # relative to one decoder layer
    mlp_out: str  # relative to one decoder layer
    final_norm: str
    lm_head: str
    # Gemma 2/3 normalise a writer's output (post_attention/post_feedforward RMSNorm) before the
    # residual add: projecting the writer removes the direction from its output, but the norm's
    # elementwise gain can bring a small component back. Reported, not hidden.
    post_writer_norm: bool = False
    moe: MoESpec | None = None  # sparse MoE layers (mlp_out above is then the dense-layer down projection)


Kind = Literal["attn", "mlp", "embed"]

# A direct writer's change must lie along δ to within this fraction of its norm (float32 runs give
# ~1e-7 for a linear path; a path through attention, a norm or an activation gives ~1e-1).
_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# A change below this fraction of the perturbation's size counts as no change at all.
_MOVED = 1e-6


# ---------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class FoundWriter:
    """One module (or one fused parameter of it) whose output is added to the residual stream.

    ``layout`` is which of the last two axes of ``param`` is the residual side ("out_in": −2,
    "in_out": −1), found by perturbation. ``post_norm`` is the path of the module (a norm) between
    the writer and the residual add, if any: projecting this writer is then not exact."""

    name: str  # hook-style name, as ArchitectureAdapter names it: "layers.3.attn_out", "embed.wte", ...
    path: str  # dotted path of the module from the model root
    module: nn.Module = field(compare=False, repr=False)
    kind: Kind = "mlp"
    layout: Layout = "out_in"
    param: str = "weight"
    bias_param: str | None = None
    fused: bool = False  # param is [E, ·, ·]: every routed expert of the layer
    moe: MoERole | None = None
    layer: int | None = None
    post_norm: str | None = None
    # a vector parameter added to the residual stream by code outside any module's output (``param`` is
    # that bias [d], ``layout`` "in_out"): no module output to hook, the parameter itself is edited
    bias_only: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, self.bias_param, None) if self.bias_param else None
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def residual_axis(self) -> int:
        return -2 if self.layout == "out_in" else -1


@dataclass(frozen=True)
class FoundMoE:
    """The parts of one sparse MoE layer, as paths from the model root."""

    block: str  # the sparse block: its output is the layer's mlp_out
    experts: str  # the fused experts module, or the nn.ModuleList of expert modules
    router: str | None
    shared_expert_gate: str | None = None


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found, as paths from the model root (``resolve`` turns one into a module)."""

    model_type: str
    body: str  # the decoder without the lm_head ("" = the model itself)
    layers: str
    embeddings: tuple[str, ...]  # the token embeddings first
    final_norm: str | None  # None: the last layer's output goes to the lm_head as it is
    lm_head: str
    tied_lm_head: bool
    writers: tuple[FoundWriter, ...]  # the embeddings' writers first, then layer by layer
    moe: tuple[FoundMoE | None, ...]  # per layer
    layer_kinds: tuple[str, ...]  # per layer: its writers' kinds, e.g. "attn+mlp", "attn+mlp+experts"
    notes: tuple[str, ...] = ()  # what was found but does not fit the table form (no final norm module)
    root: str = ""  # the module whose forward pass discovery ran (a wrapper that wants pixels: its language model)

    @property
    def n_layers(self) -> int:
        return len(self.moe)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.moe) if m is not None]

    @property
    def post_writer_norm(self) -> bool:
        return any(w.post_norm for w in self.writers)

    def layer_writers(self, i: int) -> list[FoundWriter]:
        return [w for w in self.writers if w.layer == i]

    def arch_spec(self, family: str | None = None) -> ArchSpec:
        """The same information as an :class:`ArchSpec`, where the table form can hold it: every layer
        has one attention writer at one relative path, and every dense (MoE) layer the same MLP writer
        (MoE parts). Hybrid and per-layer-different models cannot be a table row."""
        layers_prefix = self.layers + "."

        def rel(path: str, i: int) -> str:
            prefix = f"{layers_prefix}{i}."
            if not path.startswith(prefix):
                raise UnsupportedArchitectureError(f"{path} is not inside decoder layer {i}")
            return path[len(prefix):]

        attn, mlp, moe_parts = set(), set(), set()
        for i in range(self.n_layers):
            ws = self.layer_writers(i)
            if any(w.bias_only for w in ws):
                raise UnsupportedArchitectureError(
                    f"layer {i} adds a bias to the residual stream outside a module "
                    f"({', '.join(w.path + '.' + w.param for w in ws if w.bias_only)}): not one table row")
            a = [rel(w.path, i) for w in ws if w.kind == "attn"]
            if len(a) != 1:
                raise UnsupportedArchitectureError(
                    f"layer {i} has {len(a)} token-mixing writers ({', '.join(a) or 'none'}): not one table row")
            attn.add(a[0])
            moe = self.moe[i]
            if moe is None:
                m = [rel(w.path, i) for w in ws if w.kind == "mlp"]
                if len(m) != 1:
                    raise UnsupportedArchitectureError(
                        f"layer {i} has {len(m)} MLP writers ({', '.join(m) or 'none'}): not one table row")
                mlp.add(m[0])
                continue
            routed = [w for w in ws if w.moe == "routed"]
            shared = [rel(w.path, i) for w in ws if w.moe == "shared"]
            if len(shared) > 1:
                raise UnsupportedArchitectureError(f"layer {i} has {len(shared)} shared experts: not one table row")
            # fused: the parameter's name; per-module experts: the path inside one expert module
            down = routed[0].param if routed[0].fused else routed[0].path[len(moe.experts) + 1:].split(".", 1)[1]
            moe_parts.add((rel(moe.block, i), rel(moe.experts, i), rel(moe.router, i) if moe.router else "",
                           down, routed[0].bias_param or "down_proj_bias", shared[0] if shared else None,
                           rel(moe.shared_expert_gate, i) if moe.shared_expert_gate else None))
        if len(attn) > 1 or len(mlp) > 1 or len(moe_parts) > 1:
            raise UnsupportedArchitectureError(
                f"the layers differ (attention writers {sorted(attn)}, MLP writers {sorted(mlp)}, "
                f"{len(moe_parts)} MoE layouts): not one table row")
        if self.final_norm is None:
            raise UnsupportedArchitectureError("no final norm: not one table row")
        moe_spec = None
        if moe_parts:
            block, experts, router, down, down_bias, shared, gate = next(iter(moe_parts))
            moe_spec = MoESpec(block=block, experts=experts, router=router, expert_down=down,
                               expert_down_bias=down_bias, shared_expert=shared, shared_expert_gate=gate)
        return ArchSpec(
            family=family or f"{self.model_type} (discovered)", model_types=(self.model_type,), body=self.body,
            layers=self.layers, embeddings=self.embeddings, attn_out=next(iter(attn)),
            mlp_out=next(iter(mlp)) if mlp else "mlp.down_proj", final_norm=self.final_norm,
            lm_head=self.lm_head, post_writer_norm=self.post_writer_norm, moe=moe_spec)


def resolve(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path from `root` ("" is `root` itself)."""
    return root.get_submodule(path) if path else root


# ---------------------------------------------------------------------------- pure helpers


def off_direction(change: torch.Tensor, direction: torch.Tensor) -> tuple[float, float]:
    """(‖Δ − (Δ·u)uᵀ‖ / ‖Δ‖, ‖Δ‖) for a change Δ [..., d] and u = direction/‖direction‖ [d]: how
    far the change is from a per-token multiple of the direction (0 = exactly along it), and its size."""
    delta = change.detach().double().reshape(-1, change.shape[-1])
    u = direction.detach().double().reshape(-1)
    u = u / u.norm()
    size = float(delta.norm())
    if size == 0.0:
        return 0.0, 0.0
    rest = delta - (delta @ u)[:, None] * u[None, :]
    return float(rest.norm()) / size, size


def along_ratio(hidden: torch.Tensor, direction: torch.Tensor) -> float:
    """max over tokens of |h·u| / ‖h‖ for hidden [..., d] and u = direction/‖direction‖."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    u = direction.detach().double().reshape(-1)
    u = u / u.norm()
    norms = h.norm(dim=-1).clamp_min(1e-30)
    return float(((h @ u).abs() / norms).max())


def remove_along(t: torch.Tensor, direction: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """t with its component along u = direction/‖direction‖ removed on `axis` (other axes broadcast)."""
    u = direction.to(device=t.device, dtype=torch.float64).reshape(-1)
    u = u / u.norm()
    x = t.double().movedim(axis, -1)
    x = x - (x @ u)[..., None] * u
    return x.movedim(-1, axis).to(t.dtype)


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a module's output: the tensor, or the first element of a tuple,
    list or ModelOutput, when it is a floating tensor."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, dict):
        value = next(iter(value.values()), None)
        return _first_tensor(value) if isinstance(value, torch.Tensor) else None
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0]) if isinstance(value[0], torch.Tensor) else None
    return None


def _replace_first(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with its hidden-state tensor (see :func:`_first_tensor`) replaced by fn(tensor)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        key = next(iter(value))
        out = value.__class__(value) if not hasattr(value, "to_tuple") else value.__class__(**value)
        out[key] = fn(value[key])
        return out
    if isinstance(value, tuple):
        return type(value)((fn(value[0]), *value[1:])) if type(value) is tuple else (fn(value[0]), *value[1:])
    if isinstance(value, list):
        return [fn(value[0]), *value[1:]]
    raise TypeError(type(value).__name__)


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module call's hidden-state input: the first floating tensor argument, else ``hidden_states``."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor) and h.is_floating_point():
        return h
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def _replace_hidden_input(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    for j, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return (*args[:j], fn(a), *args[j + 1:]), kwargs
    for k, v in kwargs.items():
        if k == "hidden_states" or (isinstance(v, torch.Tensor) and v.is_floating_point()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return args, {**kwargs, k: fn(v)}
    return args, kwargs


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: _clone(v) for k, v in value.items()}
    return value


def _leaf_norm(m: nn.Module) -> bool:
    """A module without children whose parameters are vectors (a norm's gain and shift)."""
    return next(m.children(), None) is None and all(p.ndim <= 1 for p in m.parameters(recurse=False))


def _is_within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _common_prefix(paths: list[str]) -> str:
    split = [p.split(".") for p in paths]
    out: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


# ---------------------------------------------------------------------------- tracing


@dataclass
class _Call:
    path: str
    module: nn.Module
    order: int  # order of the first call
    args: tuple
    kwargs: dict
    hidden_in: torch.Tensor | None
    out: torch.Tensor | None  # the hidden-state output (a clone)
    out_key: tuple | None  # identity of the output tensor before cloning: (data_ptr, shape, stride)
    full_out: Any = None  # the whole output (tensors cloned), to freeze the module at what it returned
    n_calls: int = 1
    # a scope measured at `module`'s input rather than its output (writers found at a norm's input,
    # where code outside modules sums them): `path` is then the block they lie in, `until` the order
    # before which they return
    side: Literal["input", "output"] = "output"
    until: int | None = None


class _TextForwardFailed(UnsupportedArchitectureError):
    """The model's own forward pass failed on a text-only input (it wants pixels too)."""


class _Stop(BaseException):
    """Ends a forward pass once the measured activation is in (a BaseException, so that no model's
    ``except Exception`` swallows it)."""


class _Runner:
    """Runs the model's forward on one fixed tiny input, with hooks."""

    def __init__(self, model: nn.Module, inputs: dict):
        self.model, self.inputs = model, inputs

    def forward(self) -> Any:
        with torch.no_grad():
            return self.model(**self.inputs)

    def run(self, stop: nn.Module, side: Literal["input", "output"],
            hooks: list[tuple[nn.Module, Callable]] = (), pre_hooks: list[tuple[nn.Module, Callable]] = (),
            capture: list[nn.Module] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The hidden tensor at `stop`'s input or output (first call), with forward `hooks` (m, a, kw, out)
        and `pre_hooks` (m, a, kw) installed, and the first hidden output of each module in `capture`."""
        got: dict[str, torch.Tensor] = {}
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def on_stop_out(m, a, kw, out):
            got["x"] = _first_tensor(out).detach().clone()
            raise _Stop

        def on_stop_in(m, a, kw):
            got["x"] = _hidden_input(a, kw).detach().clone()
            raise _Stop

        def on_capture(m, a, kw, out):
            if id(m) not in captured:
                t = _first_tensor(out)
                captured[id(m)] = None if t is None else t.detach().clone()

        try:
            for m, fn in pre_hooks:
                handles.append(m.register_forward_pre_hook(fn, with_kwargs=True))
            for m, fn in hooks:
                handles.append(m.register_forward_hook(fn, with_kwargs=True))
            for m in capture:
                handles.append(m.register_forward_hook(on_capture, with_kwargs=True))
            if side == "input":
                handles.append(stop.register_forward_pre_hook(on_stop_in, with_kwargs=True))
            else:
                handles.append(stop.register_forward_hook(on_stop_out, with_kwargs=True))
            try:
                self.forward()
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        if "x" not in got:
            raise UnsupportedArchitectureError(f"{type(stop).__name__} was not reached by the forward pass")
        return got["x"], captured


def _trace(model: nn.Module, runner: _Runner) -> tuple[dict[str, _Call], list[_Call], torch.Tensor | None]:
    """Every module's first call (inputs and hidden output, cloned) in one forward pass; every later
    call of a module called more than once (a norm used before and after the layers), without its
    inputs; and the logits. ``order`` counts calls in the order they return."""
    calls: dict[str, _Call] = {}
    later: list[_Call] = []
    handles = []
    alive: list[torch.Tensor] = []  # every traced output stays allocated, so no two share a data_ptr

    def hook(path):
        def on_call(m, args, kwargs, out):
            t = _first_tensor(out)
            if t is not None:
                alive.append(t)
            key = (t.data_ptr(), tuple(t.shape), t.stride()) if t is not None else None
            hidden_in = _hidden_input(args, kwargs)
            hidden_in = None if hidden_in is None else hidden_in.detach().clone()
            order = len(calls) + len(later)
            if path in calls:
                calls[path].n_calls += 1
                later.append(_Call(path, m, order, (), {}, hidden_in, None if t is None else t.detach().clone(), key))
                return
            calls[path] = _Call(path, m, order, _clone(args), _clone(kwargs), hidden_in,
                                None if t is None else t.detach().clone(), key, _clone(out))
        return on_call

    try:
        for path, m in model.named_modules():
            handles.append(m.register_forward_hook(hook(path), with_kwargs=True))
        output = runner.forward()
    except UnsupportedArchitectureError:
        raise
    except Exception as err:  # the model's own forward failed on a text-only input: say so, keep the cause
        raise _TextForwardFailed(
            f"the forward pass on a tiny text-only input failed: {type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:200]}"
        ) from err
    finally:
        for h in handles:
            h.remove()
    logits = getattr(output, "logits", None)
    return calls, later, _first_tensor(logits if logits is not None else output)


# ---------------------------------------------------------------------------- the tiny input


def _special_ids(config: Any) -> set[int]:
    out: set[int] = set()

    def walk(d: dict):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif ("token_id" in str(k) or "token_index" in str(k)) and isinstance(v, int):
                out.add(v)
            elif ("token_id" in str(k) or "token_index" in str(k)) and isinstance(v, (list, tuple)):
                out.update(x for x in v if isinstance(x, int))

    walk(config.to_dict() if hasattr(config, "to_dict") else {})
    return out


def tiny_inputs(model: nn.Module, vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """Random token ids (no special token: an image token would ask for pixels) and the flags that
    make a forward pass stateless (no KV cache, so that a module can be re-run)."""
    gen = torch.Generator().manual_seed(seed)
    banned = _special_ids(getattr(model, "config", None))
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in banned])
    ids = allowed[torch.randint(0, len(allowed), (batch, seq), generator=gen)]
    params = inspect.signature(model.forward).parameters
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs: dict[str, Any] = {"input_ids": ids.to(device)}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


# ---------------------------------------------------------------------------- discovery


class _Discoverer:
    """One discovery: the traced pass of `model` on the tiny input, and the perturbation tests."""

    def __init__(self, model: nn.Module, seed: int):
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        self.paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Module):
            raise UnsupportedArchitectureError("no token embeddings: get_input_embeddings() returned nothing")
        self.token_embedding = emb
        weight = getattr(emb, "weight", None)
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else getattr(model.config, "vocab_size", 256)
        self.runner = _Runner(model, tiny_inputs(model, vocab, seed=seed))
        self.calls, self.later, self.logits = _trace(model, self.runner)
        self.notes: list[str] = []
        self.entry_norms: dict[str, str] = {}  # scope path -> a norm of the stream as it enters the scope
        self.order = sorted(self.calls.values(), key=lambda c: c.order)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.tol = _TOL.get(dtype, 1e-3)

    # -- small tools -----------------------------------------------------------------------------

    def path(self, m: nn.Module) -> str:
        return self.paths[id(m)]

    def call(self, m: nn.Module) -> _Call | None:
        return self.calls.get(self.path(m))

    def randn(self, n: int, like: torch.Tensor) -> torch.Tensor:
        v = torch.randn(n, generator=self.gen, dtype=torch.float64)
        return (v / v.norm()).to(device=like.device, dtype=like.dtype)

    def along(self, change: torch.Tensor, delta: torch.Tensor, scale: float) -> bool:
        """The change is a nonzero per-token multiple of delta."""
        off, size = off_direction(change, delta)
        return size > _MOVED * scale and off <= self.tol

    def perturbation(self, out: torch.Tensor) -> torch.Tensor:
        """A random vector over out's last axis, as large as out's typical row (1 when out is zero)."""
        scale = float(out.detach().double().reshape(-1, out.shape[-1]).norm(dim=-1).mean()) or 1.0
        return self.randn(out.shape[-1], out) * scale

    # -- layers, embeddings, final norm, lm_head -------------------------------------------------

    def find_layers(self) -> tuple[str, nn.ModuleList]:
        best, broken = None, None
        for path, m in self.model.named_modules():
            if not isinstance(m, nn.ModuleList) or len(m) == 0:
                continue
            calls = [self.calls.get(f"{path}.{j}" if path else str(j)) for j in range(len(m))]
            if any(c is None or c.out is None or c.hidden_in is None for c in calls):
                continue
            if any(a.order >= b.order for a, b in zip(calls, calls[1:])):
                continue
            gaps = [j for j, (a, b) in enumerate(zip(calls, calls[1:])) if not _same(a.out, b.hidden_in)]
            if gaps:
                if broken is None or len(m) > len(broken[1]):
                    broken = (path, m, gaps[0])
                continue
            if best is None or len(m) > len(best[1]) or (len(m) == len(best[1]) and calls[-1].order > best[2]):
                best = (path, m, calls[-1].order)
        if best is None:
            if broken is not None:
                path, m, j = broken
                raise UnsupportedArchitectureError(
                    f"decoder layers: {path} ({type(m[0]).__name__}) are called in order, but the hidden state "
                    f"is changed between layers {j} and {j + 1} by code outside them")
            raise UnsupportedArchitectureError(
                "decoder layers: no nn.ModuleList whose children pass the hidden state from one to the next")
        return best[0], best[1]  # (a one-layer list passes: there is no chain to check)

    def outside(self, path: str) -> bool:
        return not _is_within(path, self.layers_path)

    def find_embeddings(self, layer0: _Call) -> list[FoundWriter]:
        token = self.call(self.token_embedding)
        if token is None:
            raise UnsupportedArchitectureError(
                f"token embeddings {self.path(self.token_embedding)} are not called on a text-only input")
        candidates = [c for c in self.order if c.order < layer0.order and self.outside(c.path)
                      and not _is_within(self.layers_path, c.path) and c.out is not None
                      and c.module is not self.token_embedding
                      and any(p.ndim >= 2 for p in c.module.parameters(recurse=False))]
        out = []
        # where the embeddings are summed: layer 0's input, or the input of a norm whose output it is (an
        # embedding LayerNorm before post-LN layers: BERT-style decoders, TrOCR)
        target, entry = layer0, None
        for c in [token, *candidates]:
            if c.out.shape[-1] != layer0.hidden_in.shape[-1]:
                continue
            delta = self.perturbation(c.out)
            moved, _ = self.runner.run(target.module, "input", hooks=[(c.module, _add_hook(delta))])
            direct = self.along(moved - target.hidden_in, delta, float(delta.norm()))
            if not direct and c is not token:
                continue
            post = None if entry is None else entry.path
            if not direct and c is token:
                entry = self.entry_norm(c, layer0)
                if entry is not None:
                    target, post, direct = entry, entry.path, True
            if not direct and c is token:
                post = self.post_norm_of(c, layer0)
                if post is None:
                    last = max((o for o in [*self.order, *self.later] if o.order < layer0.order and self.outside(o.path)
                                and not _is_within(self.layers_path, o.path) and _same(o.out, layer0.hidden_in)),
                               key=lambda o: o.order, default=None)
                    through = f" (layer 0's input is the output of {last.path}, {type(last.module).__name__})" \
                        if last is not None else ""
                    raise UnsupportedArchitectureError(
                        f"token embeddings {c.path}: their output does not reach layer 0's input linearly{through}")
            if not direct and post is None:
                continue
            own = self.writer_param(c)
            if own is None and c is token:  # a normed embedding: its rows go through a norm inside it
                inside = [o for o in self.order if o.path.startswith(c.path + ".") and o.hidden_in is not None]
                own, at = next(((o, i) for i in inside if (o := self.writer_param(c, at=i)) is not None),
                               (None, None))
                post = at.path if at is not None and not self.transparent(at) else post
            if own is None:
                if c is token:
                    raise UnsupportedArchitectureError(
                        f"token embeddings {c.path} ({type(c.module).__name__}): no parameter of its own moves its "
                        "output along a residual vector (the module transforms its rows: a norm inside?)")
                continue
            param, layout, bias, fused = own
            out.append(FoundWriter(f"embed.{c.path.rsplit('.', 1)[-1]}", c.path, c.module, "embed", layout, param,
                                   bias, fused, None, None, post))
        if entry is not None and isinstance(getattr(entry.module, "bias", None), torch.Tensor):
            # the embedding norm's shift is added to the stream: projected like a bias-only writer
            out.append(FoundWriter(f"embed.{entry.path.rsplit('.', 1)[-1]}_bias", entry.path, entry.module, "embed",
                                   "in_out", "bias", None, False, None, None, entry.path, bias_only=True))
            self.notes.append(f"the embeddings are normalised ({entry.path}) before post-LN layers: the edit is not "
                              "exact")
        if not out:  # (an embedding narrower than the stream with a projection after it is found above)
            raise UnsupportedArchitectureError(
                f"embeddings: nothing before layer 0 writes its {layer0.hidden_in.shape[-1]}-wide hidden state "
                f"(the token embeddings {token.path} give {token.out.shape[-1]}-wide rows: several residual streams "
                "side by side?)")
        self.check_embeddings(out, layer0)
        return out

    def entry_norm(self, token: _Call, layer0: _Call) -> _Call | None:
        """The norm outside the layers whose output is layer 0's input (the innermost such module) when
        the token embeddings' output reaches its input as it is, else None."""
        norm = next((c for c in self.order if c.order < layer0.order and self.outside(c.path)
                     and _same(c.out, layer0.hidden_in)), None)
        if norm is None or norm is token or not self.is_norm(norm):
            return None
        delta = self.perturbation(token.out)
        moved, _ = self.runner.run(norm.module, "input", hooks=[(token.module, _add_hook(delta))])
        return norm if self.along(moved - norm.hidden_in, delta, float(delta.norm())) else None

    def post_norm_of(self, source: _Call, until: _Call) -> str | None:
        """A direct contributor to `until`'s input (outside the layers) whose input is `source`'s output."""
        for c in self.order:
            if c.order <= source.order or c.order >= until.order or not self.outside(c.path) or c.out is None \
                    or c.out.shape[-1] != until.hidden_in.shape[-1]:
                continue
            if not _same(c.hidden_in, source.out):
                continue
            delta = self.perturbation(c.out)
            moved, _ = self.runner.run(self.layers[0], "input", hooks=[(c.module, _add_hook(delta))])
            if self.along(moved - until.hidden_in, delta, float(delta.norm())):
                return c.path
        return None

    def find_head(self, last: _Call) -> tuple[str | None, str]:
        """(final norm, lm_head) paths. The lm_head is ``get_output_embeddings()``, or else the module
        whose output is the logits; the final norm is the module between the last layer and the lm_head
        whose output is the lm_head's input (None when there is none)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            head = next((c.module for c in self.order if self.outside(c.path) and _same(c.out, self.logits)
                         and any(p.ndim == 2 for p in c.module.parameters(recurse=False))), None)
        if not isinstance(head, nn.Module):
            raise UnsupportedArchitectureError(
                "no lm_head: get_output_embeddings() returned nothing and no module's output is the logits")
        hc = self.call(head)
        if hc is None or hc.hidden_in is None:
            raise UnsupportedArchitectureError(f"lm_head {self.path(head)} is not called on a text-only input")
        head_path = self.path(head)

        def between(c: _Call) -> bool:
            return last.order < c.order < hc.order and self.outside(c.path) and \
                not _is_within(self.layers_path, c.path) and not _is_within(c.path, head_path)

        found = [c for c in [*self.order, *self.later] if between(c) and _same(c.out, hc.hidden_in)]
        if found:  # the innermost (a norm wrapping nothing else returns first)
            return min(found, key=lambda c: c.order).path, head_path
        if _same(last.out, hc.hidden_in):
            return None, head_path
        found = [c for c in [*self.order, *self.later] if between(c) and _same(c.hidden_in, last.out)
                 and any(True for _ in c.module.parameters())]
        if found:
            self.notes.append(f"the lm_head's input is {found[0].path}'s output changed by code outside modules")
            return found[0].path, head_path
        self.notes.append("the last layer's output reaches the lm_head through code outside modules "
                          "(a functional norm or scale): no final norm module")
        return None, head_path

    # -- writers ---------------------------------------------------------------------------------

    def direct(self, c: _Call, scope: _Call) -> bool:
        """Is `c` a direct contributor to the output of `scope` (a decoder layer, or a block inside
        one): with every other module inside `scope` held at what it returned (so that no path through
        a later reader of the stream counts), does adding δ to c's output move scope's output by a
        per-token multiple of δ?"""
        keep = {o.path for o in self.order if o.out_key is not None and o.out_key == c.out_key}
        freeze = self.frozen(scope, c.path, keep)
        delta = self.perturbation(c.out)
        base, _ = self.runner.run(scope.module, scope.side, hooks=freeze)
        moved, _ = self.runner.run(scope.module, scope.side, hooks=[*freeze, (c.module, _add_hook(delta))])
        return moved.shape == base.shape and self.along(moved - base, delta, float(delta.norm()))

    def frozen(self, scope: _Call, path: str, keep: set[str] = frozenset()) -> list:
        """Hooks holding every module inside `scope` at what it returned, except the module at `path`,
        its ancestors and descendants, and those in `keep`. (A module called more than once, such as a
        q/k norm, cannot be held at one output.)"""
        return [(o.module, _freeze_hook(o.full_out)) for o in self.order
                if o.path.startswith(scope.path + ".") and o.path not in keep and not _is_within(path, o.path)
                and not _is_within(o.path, path) and not _same(o.out, scope.out) and o.n_calls == 1]

    def entry_norms_in(self, path: str) -> list[str]:
        """The norms found normalising the stream as it enters a scope within `path` (writers_in)."""
        return [norm for scope, norm in self.entry_norms.items() if _is_within(scope, path)]

    def is_norm(self, c: _Call) -> bool:
        """A leaf module of vector parameters only (a gain, a shift) that maps the hidden state to one of
        the same shape and does not pass a change of it on as it is: a LayerNorm / RMSNorm."""
        return c.hidden_in is not None and c.out is not None and c.hidden_in.shape == c.out.shape and \
            _leaf_norm(c.module) and not self.transparent(c)

    def transparent(self, c: _Call) -> bool:
        """Does adding δ to the module's hidden input move its output by a per-token multiple of δ
        (an identity, a dropout, a scale), as opposed to a norm with an elementwise gain?"""
        delta = self.perturbation(c.hidden_in)
        with torch.no_grad():
            base = _first_tensor(c.module(*c.args, **c.kwargs))
            args, kwargs = _replace_hidden_input(c.args, c.kwargs, lambda h: h + delta)
            moved = _first_tensor(c.module(*args, **kwargs))
        return base is not None and moved is not None and base.shape == moved.shape and \
            self.along(moved - base, delta, float(delta.norm()))

    def writer_param(self, c: _Call, at: _Call | None = None) -> tuple[str, Layout, str | None, bool] | None:
        """(param, layout, bias param, fused) of a module's own parameter whose residual side is its
        output's last axis: adding δ on that axis (a random vector on the other) moves the module's
        output along δ. None when no own parameter does. With `at` (a module inside it, such as the
        norm of a normed embedding) the input of `at` is measured instead of the output."""
        m, out = c.module, (c.out if at is None else at.hidden_in)
        d = out.shape[-1]
        own = dict(m.named_parameters(recurse=False))
        if not any(2 <= p.ndim <= 3 for p in own.values()):
            return None  # (and a wrapper such as an attention block, which may keep a cache, is not re-run)
        found = self._writer_param(c, at, own, d, traced=False)
        if found is None and at is None and self._moved is False:
            # no own parameter changed the module's output when it was re-run on its recorded arguments:
            # the forward passes them in as arguments (DBRX hands each expert a slice of its parameters).
            # Measure the module's first output in the model's own forward pass instead.
            found = self._writer_param(c, at, own, d, traced=True)
        return found

    def _writer_param(self, c: _Call, at: _Call | None, own: dict, d: int, traced: bool):
        m = c.module
        found = None
        self._moved = False  # did any perturbation change the output at all

        def measure(m, args, kwargs):
            if traced:
                return self.runner.run(m, "output")[0]
            if at is None:
                return _first_tensor(m(*args, **kwargs))
            got: list[torch.Tensor] = []
            handle = at.module.register_forward_pre_hook(
                lambda mod, a, kw: got.append(_hidden_input(a, kw).clone()) if not got else None, with_kwargs=True)
            try:
                m(*args, **kwargs)
            finally:
                handle.remove()
            return got[0] if got else None

        with torch.no_grad():
            base = measure(m, c.args, c.kwargs)
            # a fused [E, ·, ·] weight before a 2-D one: a fused bias [E, d] also moves the output along δ
            for name, p in sorted(own.items(), key=lambda kv: -kv[1].ndim):
                if p.ndim < 2 or p.ndim > 3 or not p.is_floating_point():
                    continue
                if found is not None and p.ndim < own[found[0]].ndim:
                    break
                for axis in (-2, -1):
                    if p.shape[axis] != d:
                        continue
                    delta = self.randn(d, p)
                    other = self.randn(p.shape[-1 if axis == -2 else -2], p)
                    outer = delta[:, None] * other[None, :] if axis == -2 else other[:, None] * delta[None, :]
                    n_matrices = p.numel() // (p.shape[-1] * p.shape[-2])
                    outer = outer * (float(p.detach().double().norm()) / n_matrices ** 0.5 or 1.0)
                    saved = p.detach().clone()
                    try:
                        p.add_(outer.expand_as(p))
                        moved = measure(m, c.args, c.kwargs)
                    finally:
                        p.copy_(saved)
                    if moved is not None and base is not None and (moved.shape != base.shape or
                                                                    not torch.equal(moved, base)):
                        self._moved = True
                    if moved is not None and base is not None and moved.shape == base.shape and \
                            self.along(moved - base, delta, float(base.double().norm()) or 1.0):
                        if found is not None:
                            raise UnsupportedArchitectureError(
                                f"{c.path}: both {found[0]} and {name} move its output along a residual vector; "
                                "cannot tell which one is the writer's weight")
                        found = (name, "out_in" if axis == -2 else "in_out", None, p.ndim == 3)
            if found is None:
                return None
            for name, p in own.items():
                if name == found[0] or not p.is_floating_point() or p.ndim not in (1, 2) or p.shape[-1] != d:
                    continue
                if (p.ndim == 2) != found[3]:
                    continue
                delta = self.randn(d, p) * (float(p.detach().double().norm()) or 1.0)
                saved = p.detach().clone()
                try:
                    p.add_(delta.expand_as(p))
                    moved = measure(m, c.args, c.kwargs)
                finally:
                    p.copy_(saved)
                if moved is not None and moved.shape == base.shape and \
                        self.along(moved - base, delta, float(delta.norm())):
                    found = (found[0], found[1], name, found[3])
                    break
        return found

    def writers_in(self, scope: _Call, where: str) -> list[tuple[_Call, tuple, str | None]]:
        """(call, (param, layout, bias, fused), post-norm path) of every writer whose output reaches
        `scope`'s output directly. A direct contributor without a projectable parameter of its own (a
        norm, a dropout) is traced back to the module feeding it: a writer, or a block whose own
        writers are then found the same way (a norm after a whole MoE block)."""
        d = scope.out.shape[-1]
        inner = [c for c in self.order if c.path.startswith(scope.path + ".") and c.out is not None
                 and c.out.shape[-1] == d and (scope.until is None or c.order < scope.until)
                 and c.module is not scope.module]
        # one perturbation per distinct output tensor (a wrapper returning its child's output is the same)
        groups: dict[Any, list[_Call]] = {}
        for c in inner:
            groups.setdefault(c.out_key if c.out_key is not None else c.path, []).append(c)
        direct: list[_Call] = []
        for group in groups.values():
            c = group[0]
            if _same(c.out, scope.out) or _same(c.out, scope.hidden_in):
                continue  # the stream itself (a sub-block that does its own residual add)
            if self.direct(c, scope):
                direct += group
        writers: list[tuple[_Call, tuple, str | None]] = []
        for c in sorted(direct, key=lambda c: c.order):
            own = self.writer_param(c)
            if own is not None:
                writers.append((c, own, None))
        for c in sorted(direct, key=lambda c: c.order):
            paths = [w[0].path for w in writers]
            if c.path in paths or any(_is_within(p, c.path) for p in paths):
                continue  # a writer, or a wrapper around writers
            sources = [s for s in inner if s.order < c.order and _same(s.out, c.hidden_in)]
            if any(s.path in paths for s in sources):
                continue  # an identity after a writer (dropout)
            # a norm between the writer(s) and the residual add; an identity or a scale is not one
            post = None if self.transparent(c) else c.path
            own = next(((s, o) for s in sources if (o := self.writer_param(s)) is not None), None)
            if own is not None:
                writers.append((own[0], own[1], post))
                continue
            block = next((s for s in sorted(sources, key=lambda s: s.path.count(".")) if s.hidden_in is not None), None)
            found = self.writers_in(block, where) if block is not None else []
            if not found and not sources and c.hidden_in is not None and _same(c.hidden_in, scope.hidden_in) \
                    and post is not None and self.is_norm(c):
                # a norm of the stream itself as it enters (RWKV's first block normalises the embeddings):
                # no writer, but the stream from here on is its output
                self.entry_norms[scope.path] = c.path
                continue
            if not found and not sources and c.hidden_in is not None:
                # no module's output is its input: code outside modules computed it (A.X K1 sums its routed
                # and shared experts before a norm). Find the writers at its input instead.
                found = self.writers_at_input(c, where)
            if not found and not sources and post is not None and self.is_norm(c):
                # a norm whose input is a sum computed by its parent from the parent's own parameter (XLNet's
                # attention projects with a bare parameter, then normalises output + stream): the parent
                # is the writer, measured at the norm's input
                parent = self.calls.get(c.path.rsplit(".", 1)[0]) if "." in c.path else None
                own = self.writer_param(parent, at=c) if parent is not None else None
                if own is not None:
                    found = [(parent, own, None)]
            if not found and post is not None:
                found = self.gated_writers(c)
            if not found:
                raise UnsupportedArchitectureError(
                    f"{where}: {c.path} ({type(c.module).__name__}) adds to the residual stream, but neither it "
                    "nor the module feeding it has a parameter whose residual side could be projected")
            writers += [(w, own, p or post) for w, own, p in found]
        writers.sort(key=lambda w: w[0].order)
        return writers

    def gated_writers(self, c: _Call) -> list[tuple[_Call, tuple, str | None]]:
        """Writers inside `c` whose output reaches c's output through a per-channel gain (RWKV's channel
        mix multiplies its value projection by a sigmoid gate computed from another path): adding δ to
        the writer's output moves c's output by g⊙δ, the same g for two random δ. `c` is then their
        post-writer "norm": projecting them is not exact, and the measured bound says how far."""
        d = c.out.shape[-1]
        found = []
        for o in self.order:
            if not o.path.startswith(c.path + ".") or o.out is None or o.out.shape[-1] != d or o.n_calls != 1:
                continue
            own = self.writer_param(o)
            if own is None:
                continue
            freeze = self.frozen(c, o.path)
            base, _ = self.runner.run(c.module, "output", hooks=freeze)
            changes = []
            deltas = [self.perturbation(o.out) for _ in range(2)]
            for delta in deltas:
                moved, _ = self.runner.run(c.module, "output", hooks=[*freeze, (o.module, _add_hook(delta))])
                changes.append((moved - base).double() if moved.shape == base.shape else None)
            if any(ch is None for ch in changes):
                continue
            a, b = changes[0] * deltas[1].double(), changes[1] * deltas[0].double()
            size = float(changes[0].norm())
            if size > _MOVED * float(deltas[0].norm()) and float((a - b).norm()) <= self.tol * float(a.norm()):
                found.append((o, own, c.path))
        if found:
            self.notes.append(f"{', '.join(o.path for o, _, _ in found)}: gated per channel by {c.path} before the "
                              "residual add: the edit is not exact")
        return found

    def writers_at_input(self, c: _Call, where: str) -> list[tuple[_Call, tuple, str | None]]:
        """The writers whose outputs reach `c`'s input directly: the modules of c's parent block that
        return before c is called, measured at c's input."""
        parent = c.path.rsplit(".", 1)[0] if "." in c.path else ""
        pc = self.calls.get(parent)
        scope = _Call(parent, c.module, c.order, c.args, c.kwargs, None if pc is None else pc.hidden_in,
                      c.hidden_in, None, side="input", until=c.order)
        return self.writers_in(scope, where)

    def bias_writers(self, i: int, writers) -> list[tuple[str, nn.Module, str]]:
        """(owner path, owner module, parameter name) of every vector parameter of layer i that is added
        to the residual stream on its own, outside any module's output (JetMoE adds a bias after its
        attention and MoE experts, GPT-NeoX-Japanese its attention's ``dense_bias`` in the layer):
        with every other module of the layer held at what it returned, adding δ to the parameter moves
        the layer's output by a per-token multiple of δ. Parameters of the found writers are skipped."""
        layer = self.layers[i]
        lc = self.calls[f"{self.layers_path}.{i}"]
        d = lc.out.shape[-1]
        known = {id(p) for c, own, _ in writers for name in (own[0], own[2]) if name
                 for p in [getattr(c.module, name, None)] if isinstance(p, torch.Tensor)}
        found = []
        for rel, m in layer.named_modules():
            path = f"{lc.path}.{rel}" if rel else lc.path
            for name, p in m.named_parameters(recurse=False):
                if p.ndim != 1 or p.shape[0] != d or not p.is_floating_point() or id(p) in known:
                    continue
                freeze = self.frozen(lc, path)
                base, _ = self.runner.run(layer, "output", hooks=freeze)
                delta = self.randn(d, p) * (float(p.detach().double().norm()) or 1.0)
                saved = p.detach().clone()
                try:
                    with torch.no_grad():
                        p.add_(delta)
                    moved, _ = self.runner.run(layer, "output", hooks=freeze)
                finally:
                    with torch.no_grad():
                        p.copy_(saved)
                if moved.shape == base.shape and self.along(moved - base, delta, float(delta.norm())):
                    found.append((path, m, name))
        return found

    def check_one_stream(self, i: int) -> None:
        lc = self.calls[f"{self.layers_path}.{i}"]
        if lc.hidden_in.ndim != 3 or lc.out.shape != lc.hidden_in.shape:
            raise UnsupportedArchitectureError(
                f"layer {i} ({type(self.layers[i]).__name__}): its hidden state is {tuple(lc.hidden_in.shape)} -> "
                f"{tuple(lc.out.shape)}, not one residual vector per token (several residual streams?)")

    def layer_writers(self, i: int) -> tuple[list[FoundWriter], FoundMoE | None]:
        layer = self.layers[i]
        lc = self.calls[f"{self.layers_path}.{i}"]
        self.check_one_stream(i)
        writers = self.writers_in(lc, f"layer {i}")
        stream_norm = None
        if not writers:
            # the innermost module whose output is the layer's (modules are ordered by when they return)
            inner = next((c for c in self.order if c.path.startswith(lc.path + ".") and _same(c.out, lc.out)), None)
            if inner is not None and self.is_norm(inner):
                # post-LN (GPT-1, BERT-style decoders): the layer's output is a norm of the stream plus
                # its writers. Those are found at the norm's input, and every earlier norm of the stream
                # inside the layer the same way (writers_in traces back through it)
                stream_norm = inner.path
                scope = _Call(lc.path, inner.module, inner.order, inner.args, inner.kwargs, lc.hidden_in,
                              inner.hidden_in, None, side="input", until=inner.order)
                writers = [(w, own, p or inner.path) for w, own, p in self.writers_in(scope, f"layer {i}")]
            if inner is not None and not writers:
                raise UnsupportedArchitectureError(
                    f"layer {i} ({type(layer).__name__}): its output is the output of {inner.path} "
                    f"({type(inner.module).__name__}): the residual stream itself goes through a module (a "
                    "post-LN norm or a per-channel residual gate), not a plain sum of writers")
            if not writers:
                raise UnsupportedArchitectureError(f"layer {i} ({type(layer).__name__}): no residual writer found")
        # the stream is normalised as it enters the layer (RWKV's first block, MiniMax's layers)
        entry = self.entry_norms_in(lc.path)
        biases = []
        if stream_norm is not None or entry:
            # the stream norms' shifts are added to the stream: projected like a bias-only writer (their
            # gains are what makes the edit inexact: the measured bound, as with sandwich norms)
            norms = sorted({p for _, _, p in writers if p and _leaf_norm(resolve(self.model, p))} | {stream_norm}
                           - {None} | set(entry))
            for path in norms:
                m = resolve(self.model, path)
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    biases.append((path, m, "bias"))
            self.notes.append(f"layer {i}: the stream goes through {', '.join(norms)}: the edit is not exact")
            self.check_complete_layer(i, writers, biases, also=entry)
        else:
            try:
                self.check_complete_layer(i, writers)
            except UnsupportedArchitectureError:
                biases = self.bias_writers(i, writers)
                if not biases:
                    raise
                self.check_complete_layer(i, writers, biases)
        kinds = self.kinds(i, writers)
        found, moe = self.name_writers(i, writers, kinds)
        return found + self.name_biases(i, biases, found), moe

    def name_biases(self, i: int, biases, found: list[FoundWriter]) -> list[FoundWriter]:
        """Bias-only writers as FoundWriters: kind "attn" when the module holding the bias holds a
        token-mixing writer (the attention's bias), else "mlp"."""
        out, used = [], {}
        kinds = [("attn" if "attn" in [w.kind for w in found if _is_within(w.path, path)] else "mlp")
                 for path, _, _ in biases]
        for kind, (path, m, name) in sorted(zip(kinds, biases), key=lambda kb: kb[0] != "attn"):
            # a norm's shift (post-LN, an entry norm) is named for what it is
            base = f"layers.{i}.{'norm' if _leaf_norm(m) else kind}_bias"
            n = used.get(base, 0)
            used[base] = n + 1
            out.append(FoundWriter(base if n == 0 else f"{base}.{n}", path, m, kind, "in_out", name, None, False,
                                   None, i, None, bias_only=True))
        return out

    def kinds(self, i: int, writers: list[tuple[_Call, tuple, str | None]]) -> list[Kind]:
        """Per writer: "attn" when it mixes token positions (with every other writer of the layer
        frozen, a change of the layer's input at position 0 changes its output at later positions)."""
        layer = self.layers[i]
        lc = self.calls[f"{self.layers_path}.{i}"]
        x = lc.hidden_in
        out: list[Kind] = []
        def routed(o, own) -> bool:  # its rows are the tokens routed to it, not one row per token
            return bool(own[3]) or self.routed_list(o.path, i) is not None or \
                o.out.numel() != x.shape[0] * x.shape[1] * o.out.shape[-1]

        def holder(o, own) -> _Call:  # what to hold fixed for writer o: a routed writer's whole block
            return (self.enclosing_block(o, lc) or o) if routed(o, own) else o

        for c, own, _ in writers:
            probe = c
            if routed(c, own):
                # routed experts see the tokens routed to them: judge the block around them (MoE experts
                # see one token at a time; JetMoE's attention experts do not)
                probe = self.enclosing_block(c, lc)
                if probe is None:
                    out.append("mlp")
                    continue
            bump = torch.zeros_like(x)
            bump[:, 0] = self.perturbation(x[:, 0])

            def pre(m, a, kw, bump=bump):
                return _replace_hidden_input(a, kw, lambda h: h + bump)

            held = {h.path: h for o, o_own, _ in writers if o is not c for h in [holder(o, o_own)]
                    if not _is_within(probe.path, h.path) and not _is_within(c.path, h.path)}
            freeze = [(h.module, _set_hook(h.out)) for h in held.values()]
            _, got = self.runner.run(layer, "output", hooks=freeze, pre_hooks=[(layer, pre)],
                                     capture=[probe.module])
            new = got.get(id(probe.module))
            if (new is None or new.shape != probe.out.shape) and probe is c:
                # its rows change with the input (a subset of tokens, as routed experts get): judge the block
                probe = self.enclosing_block(c, lc)
                if probe is None:
                    raise UnsupportedArchitectureError(f"layer {i}: {c.path} changes shape when the input changes")
                _, got = self.runner.run(layer, "output", hooks=freeze, pre_hooks=[(layer, pre)],
                                         capture=[probe.module])
                new = got.get(id(probe.module))
            if new is None or new.shape != probe.out.shape:
                raise UnsupportedArchitectureError(f"layer {i}: {probe.path} changes shape when the input changes")
            change = (new - probe.out).double()
            if change.numel() == x.shape[0] * x.shape[1] * change.shape[-1]:
                change = change.reshape(x.shape[0], x.shape[1], -1)
            else:
                raise UnsupportedArchitectureError(f"layer {i}: {c.path}'s output is not one row per token")
            first = float(change[:, 0].norm())
            later = float(change[:, 1:].norm())
            out.append("attn" if later > max(first, float(x.double().norm())) * 1e-6 else "mlp")
        return out

    def enclosing_block(self, c: _Call, lc: _Call) -> _Call | None:
        """The innermost module around `c` inside the layer whose output has one row per token."""
        parts = c.path[len(lc.path) + 1:].split(".")
        for j in range(len(parts) - 1, 0, -1):
            o = self.calls.get(".".join([lc.path, *parts[:j]]))
            if o is not None and o.out is not None and o.out.shape == lc.out.shape:
                return o
        return None

    def routed_list(self, path: str, i: int) -> tuple[str, int] | None:
        """(experts ModuleList path, expert index) when `path` lies inside an nn.ModuleList of layer i."""
        lpath = f"{self.layers_path}.{i}"
        parts = path[len(lpath) + 1:].split(".")
        for j in range(len(parts) - 1, 0, -1):
            prefix = ".".join([lpath, *parts[:j]])
            if isinstance(resolve(self.model, prefix), nn.ModuleList) and parts[j].isdigit():
                return prefix, int(parts[j])
        return None

    def name_writers(self, i: int, writers, kinds) -> tuple[list[FoundWriter], FoundMoE | None]:
        # (JetMoE's attention experts are fused too, but mix positions: they are its attention writer)
        routed = [(c, own, post) for (c, own, post), kind in zip(writers, kinds)
                  if (own[3] or self.routed_list(c.path, i)) and kind == "mlp"]
        out: list[FoundWriter] = []
        used: dict[str, int] = {}

        def unique(name: str) -> str:
            n = used.get(name, 0)
            used[name] = n + 1
            return name if n == 0 else f"{name}.{n}"

        moe = None
        if routed:
            moe = self.moe_parts(i, writers, routed)
            routed += self.unrouted_experts(i, routed)
        routed_paths = {c.path for c, _, _ in routed}
        for (c, own, post), kind in zip(writers, kinds):
            if c.path in routed_paths:
                continue
            param, layout, bias, fused = own
            if kind == "mlp" and c.out.numel() != c.out.shape[-1] * self.calls[f"{self.layers_path}.{i}"].out[
                    ..., 0].numel():
                self.notes.append(
                    f"layer {i}: {c.path} is run on groups of tokens (experts sharing the parameter {param}, "
                    "each given its slice): edited as one MLP writer, the layer is not treated as mixture-of-experts")
            if kind == "attn":
                name, role = unique(f"layers.{i}.attn_out"), None
            elif moe is not None:
                name, role = unique(f"layers.{i}.shared_expert"), "shared"
            else:
                name, role = unique(f"layers.{i}.mlp_out"), None
            out.append(FoundWriter(name, c.path, c.module, kind, layout, param, bias, fused, role, i, post))
        for c, own, post in sorted(routed, key=lambda r: self._expert_index(r[0].path, i)):
            param, layout, bias, fused = own
            where = self.routed_list(c.path, i)
            name = unique(f"layers.{i}.experts") if where is None else f"layers.{i}.experts.{where[1]}"
            out.append(FoundWriter(name, c.path, c.module, "mlp", layout, param, bias, fused, "routed", i, post))
        rank = {None: 1, "routed": 2, "shared": 3}  # as ArchitectureAdapter.writers lists them
        out.sort(key=lambda w: (0 if w.kind == "attn" else rank[w.moe], self._expert_index(w.path, i)))
        return out, moe

    def _expert_index(self, path: str, i: int) -> int:
        where = self.routed_list(path, i)
        return -1 if where is None else where[1]

    def unrouted_experts(self, i: int, routed) -> list:
        """Experts of an nn.ModuleList that no token reached: the same relative path in the siblings
        of the experts that were found (same class), with the same parameter and layout."""
        extra = []
        for c, own, post in routed:
            where = self.routed_list(c.path, i)
            if where is None:
                continue
            lst, e = where
            rel = c.path[len(f"{lst}.{e}"):]
            for j in range(len(resolve(self.model, lst))):
                path = f"{lst}.{j}{rel}"
                if j == e or path in self.calls or any(r[0].path == path for r in routed + extra):
                    continue
                m = resolve(self.model, path)
                if type(m) is not type(c.module):
                    raise UnsupportedArchitectureError(f"layer {i}: expert {path} differs from expert {c.path}")
                extra.append((_Call(path, m, c.order, (), {}, None, None, None), own, post))
        return extra

    def moe_parts(self, i: int, writers, routed) -> FoundMoE:
        lpath = f"{self.layers_path}.{i}"
        layer = self.layers[i]
        lc = self.calls[lpath]
        first = routed[0][0]
        where = self.routed_list(first.path, i)
        experts = first.path if where is None else where[0]
        # the block: the outermost module around the experts whose output is added to the stream as it is
        block = experts
        parts = experts[len(lpath) + 1:].split(".")
        for j in range(1, len(parts)):
            p = ".".join([lpath, *parts[:j]])
            c = self.calls.get(p)
            if c is None or c.out is None or c.out.shape[-1] != lc.out.shape[-1]:
                continue
            if self.direct(c, lc):
                block = p
                break
        writer_paths = [w[0].path for w in writers]
        routed_modules = [r[0].module for r in routed]
        candidates = [c for c in self.order if c.path.startswith(block + ".") and not _is_within(c.path, experts)
                      and not any(_is_within(c.path, p) for p in writer_paths)
                      and any(p.ndim >= 2 for p in c.module.parameters(recurse=False))]
        all_writer_modules = [w[0].module for w in writers]
        _, base = self.runner.run(layer, "output", capture=[resolve(self.model, block), *all_writer_modules])
        router, gate = None, None
        for c in candidates:
            p = next(p for p in c.module.parameters(recurse=False) if p.ndim >= 2)
            saved = p.detach().clone()
            try:
                with torch.no_grad():
                    p.add_(torch.randn(p.shape, generator=self.gen, dtype=torch.float64).to(p) *
                           (float(p.detach().double().norm()) / p.numel() ** 0.5 or 1.0) * 4)
                _, got = self.runner.run(layer, "output", capture=[resolve(self.model, block), *all_writer_modules])
            finally:
                with torch.no_grad():
                    p.copy_(saved)

            def changed(m):
                a, b = base.get(id(m)), got.get(id(m))
                return (a is None) != (b is None) or (a is not None and (a.shape != b.shape or not torch.equal(a, b)))

            if router is None and any(changed(m) for m in routed_modules):
                router = c.path
            elif gate is None and changed(resolve(self.model, block)) and \
                    not any(changed(m) for m in all_writer_modules):
                gate = c.path
        return FoundMoE(block, experts, router, gate)

    # -- completeness ----------------------------------------------------------------------------

    def check_complete_layer(self, i: int, writers, biases=(), also=()) -> None:
        layer = self.layers[i]
        lc = self.calls[f"{self.layers_path}.{i}"]
        u = self.randn(lc.out.shape[-1], lc.out)
        removed = {w[2] or w[0].path for w in writers} | set(also)
        hooks = [(resolve(self.model, p), _remove_hook(u)) for p in sorted(removed)]

        def pre(m, a, kw):
            return _replace_hidden_input(a, kw, lambda h: remove_along(h, u))

        saved = [(p, p.detach().clone()) for _, m, name in biases for p in [getattr(m, name)]]
        try:
            with torch.no_grad():
                for p, old in saved:  # a bias-only writer: the direction removed from the parameter itself
                    p.copy_(remove_along(old, u))
            out, _ = self.runner.run(layer, "output", hooks=hooks, pre_hooks=[(layer, pre)])
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)
        left = along_ratio(out, u)
        if left > self.tol * 10:
            named = sorted(removed) + [f"{path}.{name}" for path, _, name in biases]
            raise UnsupportedArchitectureError(
                f"layer {i} ({type(layer).__name__}): with a direction removed from its input and from every found "
                f"writer ({', '.join(named)}), {left:.1e} of its output still lies along it: "
                "something else writes to the residual stream")

    def check_embeddings(self, embeddings: list[FoundWriter], layer0: _Call) -> None:
        u = self.randn(layer0.hidden_in.shape[-1], layer0.hidden_in)
        hooks = [(resolve(self.model, w.post_norm or w.path), _remove_hook(u)) for w in embeddings]
        x, _ = self.runner.run(self.layers[0], "input", hooks=hooks)
        left = along_ratio(x, u)
        if left > self.tol * 10:
            table = self.table_buffer(layer0)
            raise UnsupportedArchitectureError(
                f"embeddings: with a direction removed from {', '.join(w.path for w in embeddings)}, {left:.1e} of "
                "layer 0's input still lies along it: " + (table or "something else (a fixed position table?) "
                                                                   "writes to it"))

    def table_buffer(self, layer0: _Call) -> str | None:
        """What writes to layer 0's input from a buffer (a fixed position table), said in words: a
        buffer outside the layers such that adding δ to each of its rows moves layer 0's input along δ."""
        d = layer0.hidden_in.shape[-1]
        for path, m in self.model.named_modules():
            if not self.outside(path):
                continue
            for name, b in m.named_buffers(recurse=False):
                if b is None or not b.is_floating_point() or b.ndim < 2 or b.shape[-1] != d:
                    continue
                delta = self.randn(d, b) * (float(b.detach().double().norm(dim=-1).mean()) or 1.0)
                saved = b.detach().clone()
                try:
                    with torch.no_grad():
                        b.add_(delta)
                    moved, _ = self.runner.run(self.layers[0], "input")
                finally:
                    with torch.no_grad():
                        b.copy_(saved)
                if self.along(moved - layer0.hidden_in, delta, float(delta.norm())):
                    saved_with_model = name not in getattr(m, "_non_persistent_buffers_set", set())
                    return (f"the buffer {path}.{name} (a fixed position table) adds to it, and a buffer is no "
                            "parameter: " + ("editing it would have to be saved with the model" if saved_with_model
                                             else "it is not saved with the model (a non-persistent buffer, "
                                                  "recomputed on load), so no saved edit can remove the direction"))
        return None

    # -- all of it -------------------------------------------------------------------------------

    def discover(self) -> Discovery:
        self.layers_path, self.layers = self.find_layers()
        layer0 = self.calls[f"{self.layers_path}.0"]
        last = self.calls[f"{self.layers_path}.{len(self.layers) - 1}"]
        self.check_one_stream(0)
        embeddings = self.find_embeddings(layer0)
        final_norm, head = self.find_head(last)
        writers: list[FoundWriter] = list(embeddings)
        moe: list[FoundMoE | None] = []
        kinds = []
        for i in range(len(self.layers)):
            ws, m = self.layer_writers(i)
            entry = next(iter(self.entry_norms_in(f"{self.layers_path}.0")), None) if i == 0 else None
            if entry is not None:  # the embeddings reach the stream through layer 0's first norm (RWKV)
                writers = [replace(w, post_norm=w.post_norm or entry) for w in writers]
            writers += ws
            moe.append(m)
            kinds.append("+".join(sorted(w.kind for w in ws if w.moe != "routed" and not w.bias_only) +
                                  (["experts"] if m else []) + (["bias"] if any(w.bias_only for w in ws) else [])))
        head_module = resolve(self.model, head)
        tied = getattr(head_module, "weight", None) is not None and \
            head_module.weight is getattr(self.token_embedding, "weight", object())
        body = _common_prefix([self.layers_path, *(w.path for w in embeddings),
                               *([final_norm] if final_norm else [])])
        return Discovery(model_type=getattr(self.model.config, "model_type", type(self.model).__name__),
                         body=body, layers=self.layers_path, embeddings=tuple(w.path for w in embeddings),
                         final_norm=final_norm, lm_head=head, tied_lm_head=tied, writers=tuple(writers),
                         moe=tuple(moe), layer_kinds=tuple(kinds), notes=tuple(self.notes))


def _add_hook(delta: torch.Tensor):
    def hook(m, a, kw, out):
        return _replace_first(out, lambda t: t + delta.to(t.dtype))
    return hook


def _freeze_hook(value: Any):
    def hook(m, a, kw, out):
        return _clone(value)
    return hook


def _set_hook(value: torch.Tensor):
    def hook(m, a, kw, out):
        # a clone: the model may add to it in place
        return _replace_first(out, lambda t: value.clone() if t.shape == value.shape else t)
    return hook


def _remove_hook(u: torch.Tensor):
    def hook(m, a, kw, out):
        return _replace_first(out, lambda t: remove_along(t, u))
    return hook


def discover(model: nn.Module, seed: int = 0) -> Discovery:
    """Find the decoder layers, embeddings, final norm, lm_head and residual writers of `model` (a
    causal LM, or an image-text-to-text wrapper around one) by what its modules do on a tiny text
    input. The model is left as it was (eval mode is set for the pass and restored). Raises
    :class:`UnsupportedArchitectureError` naming what could not be found."""
    was_training = model.training
    model.eval()
    try:
        try:
            return _Discoverer(model, seed).discover()
        except _TextForwardFailed as err:
            inner = _inner_language_model(model)
            if inner is None:
                raise UnsupportedArchitectureError(str(err)) from err.__cause__
            try:
                found = _Discoverer(resolve(model, inner), seed).discover()
            except UnsupportedArchitectureError as inner_err:
                raise UnsupportedArchitectureError(f"{err}; its language model {inner}: {inner_err}") from None
            return _prefixed(found, inner, f"the wrapper's forward needs more than text ({err}); found in its "
                                           f"language model {inner}")
    finally:
        model.train(was_training)


def _inner_language_model(model: nn.Module) -> str | None:
    """The path of the outermost causal LM inside a wrapper (a submodule with its own lm_head)."""
    for path, m in model.named_modules():
        if path and hasattr(m, "get_output_embeddings") and hasattr(m, "config") and \
                isinstance(m.get_output_embeddings(), nn.Module):
            return path
    return None


def _prefixed(found: Discovery, prefix: str, note: str) -> Discovery:
    """`found` (discovered on the submodule at `prefix`) with its paths made relative to the wrapper."""
    def p(path: str | None) -> str | None:
        return path if path is None else (f"{prefix}.{path}" if path else prefix)

    return replace(
        found, body=p(found.body), layers=p(found.layers), embeddings=tuple(p(e) for e in found.embeddings),
        final_norm=p(found.final_norm), lm_head=p(found.lm_head),
        writers=tuple(replace(w, path=p(w.path), post_norm=p(w.post_norm)) for w in found.writers),
        moe=tuple(m if m is None else replace(m, block=p(m.block), experts=p(m.experts), router=p(m.router),
                                              shared_expert_gate=p(m.shared_expert_gate)) for m in found.moe),
        root=p(found.root), notes=(*found.notes, note))


# ---------------------------------------------------------------------------- the exactness check


def projection_bound(model: nn.Module, found: Discovery, seed: int = 1) -> float:
    """Project a random unit direction u out of the residual side of every found writer (weights and
    biases) and of the embeddings, run the tiny input, and return max over layers and tokens of
    |h·u| / ‖h‖ for every decoder layer's output h. The model's parameters are put back afterwards.
    0 up to rounding when the writers are complete and none is followed by a norm."""
    emb = resolve(model, found.embeddings[0])
    vocab = emb.weight.shape[0] if isinstance(getattr(emb, "weight", None), torch.Tensor) else 256
    root = resolve(model, found.root)
    runner = _Runner(root, tiny_inputs(root, vocab, seed=seed))
    layers = resolve(model, found.layers)
    d = found.writers[0].weight.shape[found.writers[0].residual_axis]
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    ratios: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for w in found.writers:
                for p, axis in ((w.weight, w.residual_axis), (w.bias, -1)):
                    if p is None or id(p) in seen:
                        continue
                    seen.add(id(p))
                    saved.append((p, p.detach().clone()))
                    p.copy_(remove_along(p, u.to(p.device), axis))
        outs: dict[int, torch.Tensor] = {}

        def grab(i):
            def hook(m, a, kw, out):
                if i not in outs:
                    outs[i] = _first_tensor(out).detach().clone()
            return hook

        handles = [layer.register_forward_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            runner.forward()
        finally:
            for h in handles:
                h.remove()
        ratios = [along_ratio(outs[i], u) for i in sorted(outs)]
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)
        model.train(was_training)
    return max(ratios)
