"""The source window (excise/window.py): which layers' writers are edited."""

from __future__ import annotations

import pytest
import torch

from obliteratus.excise.plan import layer_strength
from obliteratus.excise.window import window_weights


def test_window_covers_the_layers_up_to_and_including_the_source():
    assert window_weights(4, 0).tolist() == [1.0, 0.0, 0.0, 0.0]  # embeddings' direction: layer 0 only
    assert window_weights(4, 2).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert window_weights(4, 4).tolist() == [1.0] * 4  # the final residual: every layer
    with pytest.raises(ValueError, match="outside"):
        window_weights(4, 5)
    with pytest.raises(ValueError, match="outside"):
        window_weights(4, -1)


def test_layer_strength_table_from_weights():
    table = layer_strength(torch.tensor([1.0, 0.5, 0.0]), 3, attention=True, mlp=False, embeddings=True)
    assert table == {("attn", 0): 1.0, ("attn", 1): 0.5, ("embed", None): 1.0}
    assert layer_strength({0: 0.25, 2: 1.0}, 3, attention=True, mlp=True, embeddings=False) == {
        ("attn", 0): 0.25, ("attn", 2): 1.0, ("mlp", 0): 0.25, ("mlp", 2): 1.0}
