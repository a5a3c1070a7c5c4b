"""Activation patching of the residual stream (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT"; Heimersheim & Nanda 2024, "How to use and interpret activation patching").

Pair target prompt i with source prompt i. Run the target with its residual at (layer j, position p)
replaced by the source's residual at the same (j, p), and read the refusal log-odds at the last
position (select/layers.py: log p(R) − log(1 − p(R)), R = refusal-start tokens):

    effect[i, j, p] = logodds(target_i | h_{j,p} ← source_i's h_{j,p}) − logodds(target_i)

Layer index j follows PROBE's resid_pre axis: j < L patches the input of decoder layer j (j = 0: the
embedding output), j = L the final residual (output of the last layer, before the final norm).
Positions are aligned from the end: p = −1 is each prompt's last token, −2 the one before, ... —
prompts differ in length and batches are left-padded, so "the last k positions" are the same
template tokens (e.g. the assistant header) in both prompts. Patching harmful ← harmless shows where
the information that triggers refusal lives (the log-odds fall); harmless ← harmful where it is
enough to cause refusal (they rise). ``recovered`` = mean effect / mean(logodds(source) − logodds(target)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import Encoded
from ..select.layers import refusal_log_odds
from ..hook_points import hooked
from ..models.adapters import ArchitectureAdapter
from ..probe import collect
from ..models.placement import input_device


def hook_name(j: int, n_layers: int) -> str:
    """Hook point of resid_pre-axis index j (0..L)."""
    if not 0 <= j <= n_layers:
        raise ValueError(f"patching layer {j} is outside 0..{n_layers}")
    return f"layers.{j}.resid_pre" if j < n_layers else f"layers.{n_layers - 1}.resid_post"


def patch_position(h: torch.Tensor, value: torch.Tensor, offset: int) -> torch.Tensor:
    """h [b, t, d] with h[:, offset] replaced by value [b, d] (a copy; offset < 0 counts from the end)."""
    out = h.clone()
    out[:, offset] = value.to(h.device, h.dtype)
    return out


def first(encoded: Encoded, n: int) -> Encoded:
    """The first n prompts of `encoded` (input order), re-sorted longest first."""
    return encoded.subset(list(range(min(n, len(encoded.ids)))))


@dataclass(frozen=True)
class PatchResult:
    layers: list[int]  # resid_pre-axis indices patched
    positions: list[int]  # negative offsets from the end
    clean: torch.Tensor  # [n] target log-odds, unpatched
    source: torch.Tensor  # [n] source log-odds, unpatched
    patched: torch.Tensor  # [n, len(layers), len(positions)] target log-odds, patched

    @property
    def effect(self) -> torch.Tensor:
        """[n, layers, positions]: patched − clean."""
        return self.patched - self.clean[:, None, None]

    def to_dict(self) -> dict:
        gap = float((self.source - self.clean).mean())
        mean = self.effect.mean(0)  # [layers, positions]
        return {"layers": self.layers, "positions": self.positions, "n_prompts": int(self.clean.numel()),
                "clean_log_odds": float(self.clean.mean()), "source_log_odds": float(self.source.mean()),
                "effect_mean": mean.tolist(), "effect_sd": self.effect.std(0, unbiased=False).tolist(),
                "recovered": (mean / gap).tolist() if abs(gap) > 1e-9 else None}


@torch.inference_mode()
def patch(adapter: ArchitectureAdapter, target: Encoded, source_acts: torch.Tensor, layers: list[int],
          token_ids: list[int], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Refusal log-odds of every target prompt: clean [n] and patched [n, len(layers), k], where
    `source_acts` [n, k, L+1, d] (PROBE's layout, row i paired with target prompt i) supplies the
    residual written at each (layer, position). One forward pass per (layer, position) per batch."""
    n, k = len(target.ids), source_acts.shape[1]
    if source_acts.shape[0] != n:
        raise ValueError(f"{n} target prompts but {source_acts.shape[0]} source activations")
    model, L = adapter.model, adapter.n_layers
    device = input_device(model)
    clean = torch.empty(n, dtype=torch.float64)
    patched = torch.empty((n, len(layers), k), dtype=torch.float64)

    def log_odds(batch) -> torch.Tensor:  # [b]
        logits = model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
        return refusal_log_odds(logits, token_ids)

    for batch in target.batches(batch_size, device):
        if min(len(target.ids[i]) for i in batch.index) < k:
            raise ValueError(f"patching {k} positions needs prompts of at least {k} tokens")
        clean[batch.index] = log_odds(batch)
        for a, j in enumerate(layers):
            for p in range(k):
                value = source_acts[batch.index, p, j]  # [b, d]
                fn = lambda h, v=value, off=p - k: patch_position(h, v, off)  # noqa: E731
                with hooked(adapter, {hook_name(j, L): fn}):
                    patched[batch.index, a, p] = log_odds(batch)
    return clean, patched


def patching(adapter: ArchitectureAdapter, harmful: Encoded, harmless: Encoded, layers: list[int],
             token_ids: list[int], positions: int = 1, n_prompts: int | None = None,
             batch_size: int = 8) -> dict[str, PatchResult]:
    """Both directions on the first `n_prompts` pairs: "harmful<-harmless" (harmless residuals written
    into harmful runs) and "harmless<-harmful"."""
    n = min(len(harmful.ids), len(harmless.ids), n_prompts or len(harmful.ids))
    harmful, harmless = first(harmful, n), first(harmless, n)
    acts = {name: collect(adapter, enc, positions, batch_size) for name, enc in
            (("harmful", harmful), ("harmless", harmless))}  # [n, k, L+1, d] each
    enc = {"harmful": harmful, "harmless": harmless}
    other = {"harmful": "harmless", "harmless": "harmful"}
    runs = {t: patch(adapter, enc[t], acts[other[t]], layers, token_ids, batch_size) for t in enc}  # (clean, patched)
    return {f"{t}<-{other[t]}": PatchResult(list(layers), list(range(-positions, 0)), runs[t][0], runs[other[t]][0],
                                            runs[t][1]) for t in enc}
