"""Source window: edit only the residual writers up to and including the source layer.

The refusal direction r is measured in the residual stream at the input of layer ℓ (``resid_pre``
index ℓ; 0 = the embedding output). Writers of layers 0 … ℓ − 1 and the embeddings are what put r
there; layer ℓ reads it first. Writers after ℓ write downstream features whose overlap with r is
incidental, and projecting r out of them changes harmless outputs without being needed to remove the
refusal (on the demo model: 0 of 32 validation refusals either way, KL over 16 tokens 0.054 instead
of 0.082; leaving layer ℓ itself out as well left 1 of 32; docs/journal).

    w_i = 1 for i ≤ ℓ,   w_i = 0 for i > ℓ        (i = 0 … L − 1 the layers; the embeddings keep 1)

Pure math: torch only.
"""

from __future__ import annotations

import torch


def window_weights(n_layers: int, source: int) -> torch.Tensor:
    """w [n_layers] float32: 1 for layers 0 … `source` (the resid_pre index of the direction), else 0."""
    if not 0 <= source <= n_layers:
        raise ValueError(f"source layer {source} is outside 0..{n_layers}")
    return (torch.arange(n_layers) <= source).float()
