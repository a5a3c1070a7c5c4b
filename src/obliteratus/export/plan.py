"""The edit as a small artifact: ``edit_plan.safetensors``, which replays a run's weight edit on
another copy of the same model, in memory (:func:`apply_plan`) or shard by shard on a safetensors
checkpoint (export/bake.py), with the same tensors as the run's own edit.

A plan is the run's :class:`~obliteratus.excise.apply.TensorOp` list in the order excise applied it
(every pass of a multi-pass run): for each op, the state-dict names of the edited tensor (a tied
embedding has two), its shape, the write and read bases, λ·s, the layout and norm preservation.
The bases are the file's tensors (shared bases stored once), the rest its ``obliteratus_plan``
metadata (JSON), together with the model's identity: its type and the shapes of the edited tensors,
checked before anything is written. Replaying op ``edit_tensor(W, U, R, λs, layout, norm_preserve)``
on the same stored weights gives the same bytes (excise/projection.py).

Only edits that are sequences of TensorOps have a plan: the projection family (``project``,
``leace``, with kernels, per-layer bases, oblique reads, several passes, the lm_head input side).
Variants that edit by their own rule (``heads``, ``householder``, neuron masking, the MoE options)
record why not (``EditReport.ops_missing``), and no plan is written for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import EditError, ObliteratusError
from ..excise.apply import TensorOp
from ..excise.projection import all_finite, edit_tensor
from ..models.quantized import float_weight, logical_shape, store_weight

PLAN_FILE = "edit_plan.safetensors"
FORMAT = "obliteratus-edit-plan/1"
_LAYOUTS = ("out_in", "in_out", "vector")


@dataclass(frozen=True)
class PlannedOp:
    """One tensor op of a plan: the op's bases are keys into :attr:`EditPlanFile.bases`."""

    names: tuple[str, ...]  # the tensor's names in the model's state dict
    shape: tuple[int, ...]
    write: str
    read: str | None
    lam: float
    layout: str
    norm_preserve: bool = False


@dataclass
class EditPlanFile:
    """A saved edit: its ops in order, their bases, and the model they were made on."""

    ops: list[PlannedOp]
    bases: dict[str, torch.Tensor] = field(repr=False)
    model: dict  # model_type, the source it was loaded from, edited tensor count

    def apply_op(self, op: PlannedOp, weight: torch.Tensor) -> torch.Tensor:
        read = None if op.read is None else self.bases[op.read]
        return edit_tensor(weight, self.bases[op.write], read, op.lam, op.layout, op.norm_preserve)

    @property
    def digests(self) -> dict[str, str]:
        """Tensor name -> sha256 of its stored bytes in the checkpoint the plan was made on (when that
        was a local safetensors checkpoint): the bake checks each edited tensor against it."""
        return dict(self.model.get("sha256") or {})

    def by_name(self) -> dict[str, list[PlannedOp]]:
        """Every name of an edited tensor -> its ops in order."""
        out: dict[str, list[PlannedOp]] = {}
        for op in self.ops:
            for name in op.names:
                out.setdefault(name, []).append(op)
        return out

    def metadata(self) -> dict:
        return {"format": FORMAT, "model": self.model, "ops": [asdict(op) for op in self.ops]}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.bases.items()}, str(path),
                  metadata={"obliteratus_plan": json.dumps(self.metadata())})
        return path


def plan_of(model: nn.Module, ops: list[TensorOp], model_type: str, source: str | None) -> EditPlanFile:
    """The plan of `ops` (``EditReport.ops``) applied to `model`: each op's tensor named by every
    state-dict name it has in `model` (found by identity, so a tied weight gets both names)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    bases: dict[str, torch.Tensor] = {}
    keys: dict[tuple, str] = {}

    def key(t: torch.Tensor) -> str:  # equal bases (every writer's copy of q) are stored once
        t = t.detach().float().cpu().contiguous()
        content = (tuple(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest())
        if content not in keys:
            keys[content] = f"basis.{len(keys)}"
            bases[keys[content]] = t.clone()
        return keys[content]

    planned = []
    for op in ops:
        found = op.names or names.get(id(op.param))
        if not found:
            raise EditError(f"an edited tensor of shape {tuple(op.param.shape)} is not a parameter of the model")
        planned.append(PlannedOp(tuple(found), op.shape or logical_shape(op.param), key(op.write),
                                 None if op.read is None else key(op.read), float(op.lam), op.layout,
                                 bool(op.norm_preserve)))
    return EditPlanFile(planned, bases, {"model_type": model_type, "source": source,
                                         "edited_tensors": len({op.names for op in planned})})


def load_plan(path: str | os.PathLike) -> EditPlanFile:
    """Read an ``edit_plan.safetensors`` (a run directory is taken to mean the plan inside it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ObliteratusError(f"no edit plan at {path}: a run writes {PLAN_FILE} beside the model when its edit is "
                               "a projection (obliteratus.json's edit.ops_missing says why when it is not)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("obliteratus_plan")
            bases = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise ObliteratusError(f"{path} is not a readable safetensors file: {err}") from err
    if meta is None:
        raise ObliteratusError(f"{path} is a safetensors file but not an obliteratus edit plan (no obliteratus_plan "
                               "metadata)")
    data = json.loads(meta)
    if data.get("format") != FORMAT:
        raise ObliteratusError(f"{path}: plan format {data.get('format')!r}; this version reads {FORMAT!r}")
    ops = []
    for raw in data["ops"]:
        op = PlannedOp(tuple(raw["names"]), tuple(raw["shape"]), raw["write"], raw["read"], float(raw["lam"]),
                       raw["layout"], bool(raw["norm_preserve"]))
        if op.layout not in _LAYOUTS or op.write not in bases or (op.read is not None and op.read not in bases) \
                or not math.isfinite(op.lam) or not op.names:
            raise ObliteratusError(f"{path}: a malformed op for {', '.join(op.names) or '(no name)'}")
        ops.append(op)
    return EditPlanFile(ops, bases, data.get("model", {}))


@torch.no_grad()
def apply_plan(model: nn.Module, plan: EditPlanFile, strength: float = 1.0,
               source: nn.Module | None = None) -> list[str]:
    """Replay `plan` on `model` in place (another copy of the model it was made on); returns the
    edited parameter names. Every name and shape is checked first: on a mismatch nothing changes.
    With `strength`, every op's λ·s is scaled by it (0: the tensors as they were; the edit "at
    strength λ" a user can try before saving). With `source` (an unedited copy of the same model),
    each edited tensor is computed from source's and written into `model`, so the same copy can be
    edited again at another strength."""
    params = dict(model.named_parameters(remove_duplicate=False))
    origin = params if source is None else dict(source.named_parameters(remove_duplicate=False))
    if not math.isfinite(strength):
        raise EditError(f"strength {strength} is not a finite number")
    todo = []
    for op in plan.ops:
        name = next((n for n in op.names if n in params), None)
        if name is None:
            raise EditError(f"the model has no parameter {' / '.join(op.names)}: the plan was made on another "
                            "architecture")
        for which, table in (("model", params), ("source", origin)):
            if name not in table or logical_shape(table[name]) != op.shape:
                raise EditError(f"{name}: the plan edits a {list(op.shape)} tensor, the {which}'s is "
                                f"{list(logical_shape(table[name])) if name in table else 'missing'}: another "
                                "model size")
        todo.append((name, op if strength == 1.0 else replace(op, lam=op.lam * strength)))
    chains: dict[str, list[PlannedOp]] = {}  # a tensor's ops only read that tensor: replay them per tensor
    for name, op in todo:
        chains.setdefault(name, []).append(op)

    def edited(name: str) -> torch.Tensor:
        w = float_weight(origin[name])
        for op in chains[name]:
            w = plan.apply_op(op, w)
        return w

    for name in chains:  # pass 1 checks, without keeping the result (memory stays at one tensor)
        if not all_finite(edited(name)):
            raise EditError(f"the plan's edit of {name} is not finite; nothing was changed")
    for name in chains:
        store_weight(params[name], edited(name))
    return sorted(chains)
