"""Steering vectors: inference-time edits of the residual stream, saved next to a model
(``steering.json`` + ``steering.safetensors``) and attached again by ``summon()``.

Each entry acts on one named activation h ``[batch, seq, d]`` (``models/adapters.py`` hook names):

* ``add``:    h ← h + α·v                       (activation addition, Turner et al. 2023,
  "Steering Language Models With Activation Engineering"; v is ``[d]``)
* ``ablate``: h ← h − α·(h Qᵀ) Q                (directional ablation, Arditi et al. 2024, as in
  FailSpy's abliterator / Sumandora's ``remove-refusals-with-transformers`` hooks; Q ``[k, d]``
  has orthonormal rows, α = 1 removes the span, α = 2 reflects it)

``positions`` is ``all`` (every position of every forward call) or ``last`` (the last position
of each call: with a KV cache, the last prompt token and then each generated token).
Ablating at ``embed`` and every ``attn_out`` / ``mlp_out`` is the hook form of the projection
weight edit with biases (``excise/hook_form.py`` ``ablated``); with a tied lm_head the edited embedding
is also the unembedding, logits = x (E − λ·E QᵀQ)ᵀ = (x − λ·(x Qᵀ) Q) Eᵀ, so the hook form adds the
same ablation at ``lm_head_in`` (the lm_head option of an untied head is that entry alone). On MoE
layers whose routed and shared experts are not all edited, the entries sit at ``experts_out`` /
``shared_expert_out`` instead of the whole block's ``mlp_out`` (``pipeline.steering_spec``).

File format (version 1)::

    steering.json          {"format": "obliteratus.steering", "version": 1,
                            "entries": [{"hook": "layers.3.resid_pre", "mode": "add",
                                         "alpha": 4.0, "positions": "all", "tensor": "entry.0"}]}
    steering.safetensors   {"entry.0": float32 [d] (add) or [k, d] (ablate)}
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, ObliteratusError, OutputExistsError
from .hook_points import hooked
from .models.adapters import ArchitectureAdapter

FORMAT, VERSION = "obliteratus.steering", 1
JSON_NAME, TENSORS_NAME = "steering.json", "steering.safetensors"


@dataclass(frozen=True)
class SteeringEntry:
    hook: str  # e.g. "layers.12.resid_pre"
    mode: Literal["add", "ablate"]
    vector: torch.Tensor  # add: [d]; ablate: [k, d] orthonormal rows (a [d] vector is one row)
    alpha: float = 1.0
    positions: Literal["all", "last"] = "all"


@dataclass(frozen=True)
class SteeringSpec:
    entries: tuple[SteeringEntry, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        for i, e in enumerate(self.entries):
            _check_entry(e, f"entry {i}")


def _check_entry(e: SteeringEntry, where: str) -> None:
    if e.mode not in ("add", "ablate"):
        raise ObliteratusError(f"steering {where}: mode must be 'add' or 'ablate', got {e.mode!r}")
    if e.positions not in ("all", "last"):
        raise ObliteratusError(f"steering {where}: positions must be 'all' or 'last', got {e.positions!r}")
    v = e.vector
    if not isinstance(v, torch.Tensor) or not torch.isfinite(v).all() or not torch.isfinite(torch.tensor(e.alpha)):
        raise ObliteratusError(f"steering {where}: vector and alpha must be finite tensors/numbers")
    if e.mode == "add" and v.dim() != 1:
        raise ObliteratusError(f"steering {where}: an 'add' vector is [d], got shape {tuple(v.shape)}")
    if e.mode == "ablate":
        q = (v[None] if v.dim() == 1 else v).double()
        if q.dim() != 2 or not torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype, device=q.device), atol=1e-4):
            raise ObliteratusError(f"steering {where}: an 'ablate' basis must be [k, d] with orthonormal rows")


# --- hooks -------------------------------------------------------------------------------------


def _hook_fn(entry: SteeringEntry):
    cache: dict = {}
    v = entry.vector.detach().float()

    def fn(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = v.to(device=h.device, dtype=h.dtype)
        u = cache[key]
        part = h if entry.positions == "all" else h[..., -1:, :]  # [b, s, d] or [b, 1, d]
        if entry.mode == "add":
            new = part + entry.alpha * u  # h + α·v
        else:
            q = u[None] if u.dim() == 1 else u  # [k, d]
            new = part - entry.alpha * (part @ q.T) @ q  # h − α·(h Qᵀ) Q
        return new if entry.positions == "all" else torch.cat([h[..., :-1, :], new], dim=-2)

    return fn


def _hooks(adapter: ArchitectureAdapter, spec: SteeringSpec) -> list:
    valid = set(adapter.hook_names())
    for e in spec.entries:
        if e.hook not in valid:
            raise ObliteratusError(f"steering hook {e.hook!r} is not a hook of this {adapter.family} model; valid: "
                                   f"embed, layers.0..{adapter.n_layers - 1}.resid_pre|resid_post|attn_out|mlp_out, "
                                   "lm_head_in (MoE layers also: experts_out, shared_expert_out)")
        if e.vector.shape[-1] != adapter.d_model:
            raise ObliteratusError(f"steering vector at {e.hook} has d = {e.vector.shape[-1]}; the model has "
                                   f"d_model = {adapter.d_model}")
    return [(e.hook, _hook_fn(e)) for e in spec.entries]


@contextmanager
def apply_steering(adapter: ArchitectureAdapter, spec: SteeringSpec) -> Iterator[None]:
    """The steering hooks, for the duration of the block."""
    with hooked(adapter, _hooks(adapter, spec)):
        yield


class SteeringHandle:
    """Steering that stays attached until ``remove()`` (which is idempotent) or until the handle is
    garbage-collected: keep a reference for as long as the hooks should stay."""

    def __init__(self, adapter: ArchitectureAdapter, spec: SteeringSpec, source: str | None = None):
        self.spec, self.source = spec, source
        self._stack = ExitStack()
        self._stack.enter_context(apply_steering(adapter, spec))

    @property
    def attached(self) -> bool:
        return self._stack is not None

    def remove(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def describe(self) -> dict:
        return {"source": self.source, "attached": self.attached,
                "entries": [{"hook": e.hook, "mode": e.mode, "alpha": e.alpha, "positions": e.positions,
                             "shape": list(e.vector.shape)} for e in self.spec.entries]}


def attach_steering(adapter: ArchitectureAdapter, spec: SteeringSpec, source: str | None = None) -> SteeringHandle:
    """Attach the steering hooks persistently; ``handle.remove()`` takes them off."""
    return SteeringHandle(adapter, spec, source)


def ablation_points(adapter: ArchitectureAdapter, *, attention: bool, mlp: bool, experts: bool, embeddings: bool,
                    lm_head: bool, biases: bool) -> list[str]:
    """Hook names at which ``ablate`` entries equal the projection weight edit of the same writers
    (``excise.apply.excise`` with these settings): each writer's output, the whole MoE block
    (``mlp_out``) when all its experts are edited, else ``experts_out`` / ``shared_expert_out``;
    ``lm_head_in`` when the lm_head's input side is edited (a tied head with the embeddings, or the
    lm_head option of an untied one). Raises ConfigError where no such hook exists."""
    names: list[str] = []
    loose = [w.name for w in adapter.bias_writers(attention=attention, mlp=mlp, embeddings=embeddings)] if biases else []
    if loose:  # no module output carries them: no hook can ablate them
        raise ConfigError(f"mode = 'hooks' cannot ablate bias-only writers ({', '.join(loose)}: vectors the model adds "
                          "to the residual stream outside any module's output); use mode = 'weights', or biases = false")
    for w in adapter.writers(attention=attention, mlp=mlp, embeddings=False, experts=experts):
        if not biases and w.bias is not None:
            raise ConfigError("mode = 'hooks' ablates the whole writer output, bias included; biases = false (keep "
                              "the biases' component) needs mode = 'weights'")
        i = int(w.name.split(".")[1])
        if w.kind == "attn":
            name = f"layers.{i}.attn_out"
        elif w.moe is None or mlp and experts:  # dense MLP, or every MLP-side writer of the MoE block
            name = f"layers.{i}.mlp_out"
        elif w.moe == "shared":
            name = f"layers.{i}.shared_expert_out"
        elif w.fused:
            name = f"layers.{i}.experts_out"
        else:
            raise ConfigError(f"mode = 'hooks' with excise.experts != excise.mlp needs fused experts; {w.name} is one "
                              "expert module of a list: use mode = 'weights'")
        if name not in names:
            names.append(name)
    if embeddings:
        names.insert(0, "embed")
    if (embeddings and adapter.tied_lm_head) or (lm_head and not adapter.tied_lm_head):
        names.append("lm_head_in")
    return names


# --- files -------------------------------------------------------------------------------------


class _EntryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hook: str
    mode: Literal["add", "ablate"]
    alpha: float = Field(allow_inf_nan=False)
    positions: Literal["all", "last"] = "all"
    tensor: str


class _SpecFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["obliteratus.steering"]
    version: Literal[1]
    entries: list[_EntryFile] = Field(min_length=1)


def has_steering(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / JSON_NAME).is_file() or (d / TENSORS_NAME).is_file()


def write_steering_files(spec: SteeringSpec, directory: Path) -> None:
    """Write both files into `directory` (which the caller makes atomic, e.g. ``save.save_run``)."""
    tensors = {f"entry.{i}": e.vector.detach().float().cpu().clone() for i, e in enumerate(spec.entries)}
    doc = {"format": FORMAT, "version": VERSION, "entries": [
        {"hook": e.hook, "mode": e.mode, "alpha": float(e.alpha), "positions": e.positions, "tensor": f"entry.{i}"}
        for i, e in enumerate(spec.entries)]}
    save_file(tensors, str(directory / TENSORS_NAME), metadata={"format": FORMAT})
    (directory / JSON_NAME).write_text(json.dumps(doc, indent=2), "utf-8")


def save_steering(spec: SteeringSpec, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Add ``steering.json`` + ``steering.safetensors`` to `directory` (e.g. a saved model). Both are
    written to a temporary folder first and moved in tensors first, so ``steering.json`` (which
    ``summon`` looks for) never points at missing tensors."""
    out = Path(directory).expanduser().resolve()
    if has_steering(out) and not overwrite:
        raise OutputExistsError(f"{out} already has steering files; pass overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".steering-", dir=out) as tmp:
        write_steering_files(spec, Path(tmp))
        os.replace(Path(tmp) / TENSORS_NAME, out / TENSORS_NAME)
        os.replace(Path(tmp) / JSON_NAME, out / JSON_NAME)
    return out


def load_steering(directory: str | os.PathLike) -> SteeringSpec:
    """Read and validate the steering files in `directory`; every problem is one ObliteratusError."""
    d = Path(directory)
    where = d / JSON_NAME
    if not where.is_file() or not (d / TENSORS_NAME).is_file():
        raise ObliteratusError(f"{d} must hold both {JSON_NAME} and {TENSORS_NAME} (found only one)")
    try:
        doc = _SpecFile.model_validate(json.loads(where.read_text("utf-8")))
    except json.JSONDecodeError as err:
        raise ObliteratusError(f"{where} is not valid JSON: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in err.errors())
        raise ObliteratusError(f"{where} is malformed: {problems}") from None
    try:
        tensors = load_file(str(d / TENSORS_NAME))
    except (SafetensorError, OSError) as err:
        raise ObliteratusError(f"cannot read {d / TENSORS_NAME}: {err}") from None
    entries = []
    for i, e in enumerate(doc.entries):
        if e.tensor not in tensors:
            raise ObliteratusError(f"{where}: entry {i} names tensor {e.tensor!r}, which is not in {TENSORS_NAME} "
                                   f"(it holds: {', '.join(sorted(tensors))})")
        entries.append(SteeringEntry(e.hook, e.mode, tensors[e.tensor].float(), e.alpha, e.positions))
    try:
        return SteeringSpec(tuple(entries))
    except ObliteratusError as err:
        raise ObliteratusError(f"{where}: {err}") from None
