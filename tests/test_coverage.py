"""Every decoder of the installed transformers through the adapter (issue 26): for each model type
in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, a tiny
random model (``benchmarks/coverage.py``'s ``tiny_config`` and ``reinit``: hidden size 64, 2–4
layers, 4 experts) goes through ``ArchitectureAdapter`` (the table for its 14 families, architecture
discovery for the rest), then:

* the exact property of the edit: a random unit d is projected out of every residual writer and the
  embeddings (``excise`` with the plain projection), and the component of every decoder layer's
  output along d is <= 1e-4 of its norm. Families with a post-writer norm (post-LN, Gemma 2/3/4, OLMo 2/3,
  GLM-4, EXAONE 4, ...: the norm's gain brings some of d back) are held to the bound that
  ``benchmarks/coverage.py`` measured (at most 8.7e-2, ``docs/journal/2026-12-06-coverage.md``)
  with margin: < 0.2;
* the hook form equals the weight edit: the logits with ``excise.hook_form.ablated`` on the model
  (before the edit) equal the logits after the weight edit, on the same input (relative gap < 1e-4).

Encoder-decoder and encoder-only types are skipped with the reason; the types that
``benchmarks/coverage.py`` found unsupported are strict xfails with the reason (``UNSUPPORTED``).

The type table (``UNSUPPORTED`` with each reason), ``tiny`` and the helpers are in
tests/support/decoder_types.py, shared with tests/test_coverage_pipeline.py (the full pipeline on
every type). Measured on the 2-core CPU box (transformers 5.25.0): this file takes
2 min 10 s.
"""

from __future__ import annotations

import pytest
import torch

from obliteratus.excise.apply import excise
from obliteratus.excise.hook_form import ablated
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.discover import along_ratio
from obliteratus.settings import ExciseSettings
from support.decoder_types import EXACT, HOOK_GAP, POST_NORM_BOUND, _inputs, _layer_outputs, _logits, _types, tiny


@pytest.mark.parametrize("mapping,model_type", _types())
def test_every_decoder_is_edited_exactly(mapping, model_type, record_property):
    model = tiny(mapping, model_type)
    adapter = ArchitectureAdapter(model)
    writers = adapter.writers()
    assert writers and all(w.weight.shape[-2 if w.layout == "out_in" else -1] == adapter.d_model for w in writers)
    assert not any("vision" in n for w in writers for n, m in model.named_modules() if m is w.module)
    root, inputs = _inputs(adapter)
    q = torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(2))
    q = q / q.norm()
    with ablated(adapter, q):
        hooked = _logits(root, inputs)
    report = excise(adapter, q, ExciseSettings())
    assert report.post_writer_norm == adapter.post_writer_norm
    bound = max(along_ratio(h, q[0]) for h in _layer_outputs(adapter, root, inputs))
    record_property("bound", bound)
    assert bound < (POST_NORM_BOUND if adapter.post_writer_norm else EXACT)
    weights = _logits(root, inputs)
    assert float((weights - hooked).abs().max() / weights.abs().max()) < HOOK_GAP
