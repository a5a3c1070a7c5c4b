"""A projection edit exported as a PEFT LoRA adapter (``adapter_model.safetensors`` +
``adapter_config.json``) that any PEFT user can load on top of the unedited base model.

The edit of one writer with write basis U and read basis R ``[k, d]`` (U = R = Q for the plain
projection; see ``excise/projection.py`` and ``excise/plan.py``) is, with W written as ``[d, in]``
(the residual stream on the output axis),

    ΔW = W' − W = −λ·Uᵀ(R W) = B A,    B = −λ·Uᵀ  [d, k],    A = R W  [k, in]

so it has rank ≤ k, and a LoRA of rank r = k with lora_alpha = r (scaling α/r = 1) carries it
exactly. PEFT's layers compute (peft 0.21, ``tuners/lora/layer.py`` ``get_delta_weight``):

* ``nn.Linear`` (stored ``[d, in]``):              ΔW = B A          → lora_A = R W, lora_B = −λUᵀ
* GPT-2 ``Conv1D`` (stored ``[in, d]``), ``fan_in_fan_out=True``: ΔW = (B A)ᵀ → lora_A = R Wᵀ
* ``nn.Embedding`` (stored ``[vocab, d]``):        ΔE = (B A)ᵀ with lora_embedding_A ``[k, vocab]``
  = R Eᵀ and lora_embedding_B ``[d, k]`` = −λUᵀ.
* an EditPlan's lm_head input-side edit (``nn.Linear`` W_U ``[vocab, d]``):
  ΔW_U = −λ·(W_U Uᵀ) R → lora_A = R ``[k, d]``, lora_B = −λ·W_U Uᵀ ``[vocab, k]``.

Biases: b' = b − λ·Uᵀ(R b) is a constant shift, which no LoRA product can express. PEFT's
``bias="lora_only"`` stores the bias of every LoRA-wrapped layer in the adapter file
(``<module>.base_layer.bias``) and loads it over the base bias, so the *edited* bias is saved
there. (Disabling the adapter at run time then keeps the edited bias; merging is exact.)

Not representable, and refused with an :class:`EditError`:

* the norm-preserving edit (every column is rescaled: full rank);
* a token embedding tied to the lm_head. The edit changes both ends (logits = h E'ᵀ), but a PEFT
  embedding LoRA only reaches the lm_head once merged, and peft 0.21's ``ensure_weight_tying``
  ties a second LoRA to the lm_head that makes the merge add ΔE twice. Export with
  ``embeddings=False`` (or per-writer entries without the token embedding), or untie the model.
* fused MoE expert tensors (one ``[E, ., .]`` parameter for every routed expert, as in gpt-oss and
  transformers 5's Mixtral/Qwen-MoE): PEFT has no LoRA module for them. Per-module experts (one
  ``nn.Linear`` each) export like any other writer.
* other excision variants (neuron masking, head surgery, MoE router refits) are not this map;
  Householder is (the plan with basis v and λ = 2) and is exported as that plan.

Key names and config fields follow ``peft.utils.get_peft_model_state_dict`` (the test suite
checks them against peft itself); peft is not needed to export.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import EditError
from ..excise.plan import EditPlan, lm_head_edit, resolve
from ..excise.projection import oblique_project_vector
from ..models.adapters import ArchitectureAdapter, Layout
from ..save import write_atomically

PREFIX = "base_model.model."


def lora_factors(weight: torch.Tensor, write: torch.Tensor, lam: float, layout: Layout,
                 read: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [d, k]) in float32 with B A = ΔW = −λ·Uᵀ(R W), W written as [d, in]."""
    w = weight.float()
    u = write.to(device=weight.device, dtype=torch.float32)
    r = u if read is None else read.to(device=weight.device, dtype=torch.float32)
    w_oi = w if layout == "out_in" else w.T  # [d, in]
    return r @ w_oi, -lam * u.T  # [k, in], [d, k]


def lora_factors_input_side(weight: torch.Tensor, write: torch.Tensor, lam: float,
                            read: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, d], B [out, k]) with B A = ΔW = −λ·(W Uᵀ) R for a Linear W [out, d] read from the stream."""
    w = weight.float()
    u = write.to(device=weight.device, dtype=torch.float32)
    r = u if read is None else read.to(device=weight.device, dtype=torch.float32)
    return r.clone(), -lam * (w @ u.T)  # [k, d], [out, k]


@dataclass
class LoraExport:
    path: Path
    target_modules: list[str]
    ranks: dict[str, int]  # module name -> r
    biases: list[str] = field(default_factory=list)  # module names whose edited bias is in the file

    def to_dict(self) -> dict:
        return {"path": str(self.path), "target_modules": self.target_modules, "ranks": self.ranks,
                "biases": self.biases}


@dataclass(frozen=True)
class _Item:
    """One module's edit: x ↦ x − lam·Uᵀ(R x) on its residual (output) side, or its input side."""

    module: nn.Module
    layout: Layout
    write: torch.Tensor  # U [k, d]
    read: torch.Tensor | None  # R [k, d]; None = U
    lam: float
    input_side: bool = False


def _basis(name: str, basis, d: int) -> torch.Tensor:
    basis = basis.detach().float()
    basis = basis[None] if basis.dim() == 1 else basis
    if basis.dim() != 2 or basis.shape[1] != d or basis.shape[0] == 0:
        raise EditError(f"basis for {name} has shape {tuple(basis.shape)}; expected [k, {d}] with k >= 1")
    if not torch.isfinite(basis).all():
        raise EditError(f"basis for {name} is not finite")
    return basis


def _exportable(writer) -> None:
    if writer.fused:
        raise EditError(
            f"{writer.name} holds every routed expert in one [E, ., .] parameter, which no PEFT LoRA module "
            "targets; export with mlp = False (attention and embeddings only) or save the full edited weights"
        )


def _plan(adapter: ArchitectureAdapter, q, lam, plan: EditPlan, attention, mlp, embeddings,
          per_layer) -> list[_Item]:
    """Every module to export, in the adapter's order (the lm_head last)."""
    every = {w.name: w for w in adapter.writers()}
    d = adapter.d_model
    chosen: dict[str, _Item] = {}
    if q is not None or plan.layer_bases:
        edits, _ = resolve(adapter, None if q is None else q.detach().float(), lam, plan,
                           attention=attention, mlp=mlp, embeddings=embeddings)
        for e in edits:
            _exportable(e.writer)
            chosen[e.writer.name] = _Item(e.writer.module, e.writer.layout, e.write, e.read, e.lam)
    for name, entry in (per_layer or {}).items():
        if name not in every:
            raise EditError(f"per_layer names unknown writer {name!r}; writers: {', '.join(every)}")
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise EditError(f"per_layer[{name!r}] must be (basis [k, d], weight), got {type(entry).__name__}")
        _exportable(every[name])
        basis, weight = entry
        if not torch.isfinite(torch.tensor(float(weight))):
            raise EditError(f"weight for {name} is not finite")
        chosen[name] = _Item(every[name].module, every[name].layout, _basis(name, basis, d), None, float(weight))
    out = []
    for name in every:
        item = chosen.get(name)
        if item is None or item.lam == 0.0:
            continue
        if item.write.shape[-1] != d:
            raise EditError(f"basis for {name} has width {item.write.shape[-1]}, the model has d = {d}")
        if item.module is adapter.embeddings[0] and adapter.tied_lm_head:
            raise EditError(
                f"{name} is tied to the lm_head: a PEFT LoRA cannot reproduce an edit of a tied embedding (it "
                "reaches the lm_head only after merging, and peft's ensure_weight_tying merges it twice). "
                "Export with embeddings=False, or untie the embeddings first"
            )
        out.append(item)
    head = lm_head_edit(adapter, None if q is None else q.detach().float(), lam, plan)
    if head is not None:
        write, read, head_lam = head
        out.append(_Item(adapter.lm_head, "out_in", write, read, head_lam, input_side=True))
    if not out:
        raise EditError("nothing to export: give q (with attention/mlp/embeddings), an EditPlan or per_layer entries")
    return out


@torch.no_grad()
def export_lora(model: nn.Module, adapter: ArchitectureAdapter, q: torch.Tensor | None, lam: float = 1.0,
                output_dir: str | os.PathLike = "lora", *, attention: bool = True, mlp: bool = True,
                embeddings: bool = True, biases: bool = True,
                per_layer: dict[str, tuple[torch.Tensor, float]] | None = None, plan: EditPlan | None = None,
                norm_preserve: bool = False, overwrite: bool = False) -> LoraExport:
    """Write the edit of ``excise(adapter, q, settings, plan)`` (W' = W − λ·s·Uᵀ(R W) on the selected
    writers) as a PEFT LoRA adapter. `per_layer` maps writer names (``adapter.writers()``) to their
    own (basis [k, d], λ), overriding q / the plan for those writers.

    `model` must hold the *unedited* weights (A = R W is taken from them); it is not changed."""
    plan = plan or EditPlan()
    if norm_preserve or plan.norm_preserve:
        raise EditError("the norm-preserving edit rescales every column (full rank) and has no LoRA form; "
                        "export a plain projection (norm_preserve=False) or save the full weights")
    if adapter.model is not model:
        raise EditError("adapter does not wrap the given model")
    loose = [w.name for w in adapter.bias_writers(attention=attention, mlp=mlp, embeddings=embeddings)] if biases else []
    if loose:
        raise EditError(f"a LoRA adapter cannot carry the edit of bias-only writers ({', '.join(loose)}: vectors the "
                        "model adds to the residual stream outside any module); save the full weights, or export "
                        "with biases=False")
    items = _plan(adapter, q, lam, plan, attention, mlp, embeddings, per_layer)
    names = {id(m): n for n, m in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    report = LoraExport(Path(output_dir), [], {})
    conv1d = False
    for item in items:
        name = names[id(item.module)]
        weight = item.module.weight.detach()
        if item.input_side:
            a, b = lora_factors_input_side(weight, item.write, item.lam, item.read)
        else:
            a, b = lora_factors(weight, item.write, item.lam, item.layout, item.read)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise EditError(f"LoRA factors of {name} are not finite; nothing was written")
        if isinstance(item.module, nn.Embedding):
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = a.contiguous().cpu()  # [k, vocab]
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = b.contiguous().cpu()  # [d, k]
        else:
            conv1d |= item.layout == "in_out"
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()  # [k, in]
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()  # [out, k]
        bias = getattr(item.module, "bias", None)
        if biases and bias is not None and not item.input_side:
            new = oblique_project_vector(bias.detach(), item.write, item.read, item.lam)  # b − λ·Uᵀ(R b)  [d]
            tensors[f"{PREFIX}{name}.base_layer.bias"] = new.to(bias.dtype).contiguous().cpu()
            report.biases.append(name)
        report.target_modules.append(name)
        report.ranks[name] = item.write.shape[0]
    # r is the most common rank; other ranks go in rank_pattern (exact names, regex-escaped) with
    # alpha = r everywhere, so the scaling alpha / r is 1 for every module.
    ranks = list(report.ranks.values())
    r = max(set(ranks), key=ranks.count)
    pattern = {re.escape(n): k for n, k in report.ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": report.target_modules,
        "fan_in_fan_out": conv1d,
        "bias": "lora_only" if report.biases else "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")

    report.path = write_atomically(Path(output_dir), overwrite, fill)
    return report
