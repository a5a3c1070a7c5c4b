"""The full pipeline on every decoder of the installed transformers (issue 26): for each model type in
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, the tiny
random model of tests/support/decoder_types.py (``tiny``) goes through ``obliterate(loaded, "basic")`` on
8/2/2 prompts, generating 2 tokens (``RUN``: support/decoder_types.py's ``SMALL``, and 2 tokens to judge the
train prompts by), with the defaults otherwise: shared-prefix batching on, so
``shared_prefix.can_share_prefix`` answers for every type (no for Mamba / linear-attention caches and
3-D multimodal positions, from those properties) instead of failing. Then:

* VERIFY ran before and after the edit, and the edit record says whether the family has a
  post-writer norm as the adapter does;
* the exact property of the edit, as in test_coverage.py: the component of every decoder layer's
  output along the excised direction is <= 1e-4 of its norm (< 0.2 with a post-writer norm).

The types tests/support/decoder_types.py marks unsupported (its ``UNSUPPORTED``, through its ``_types``) are xfails
that do not run here (the per-type test holds them to their reason), what it skips is skipped, and so
are encoder-decoder and encoder-only types; the types whose tiny model cannot run the pipeline though
the per-type test passes are strict xfails with the reason (``PIPELINE_XFAIL``).
"""

from __future__ import annotations

import pytest

from conftest import merge, tiny_tokenizer
from obliteratus import obliterate
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.discover import along_ratio
from obliteratus.models.load import Loaded
from obliteratus.shared_prefix import sharing_obstacle
from support.decoder_types import EXACT, POST_NORM_BOUND, SMALL, _inputs, _layer_outputs, _types, tiny

# (mapping, model type) -> why the pipeline fails on the tiny model, where the per-type edit test passes
PIPELINE_XFAIL: dict[tuple[str, str], str] = {}
# SMALL, judging the train prompts' refusals (the basic preset's filtered contrast) from 2 generated tokens, not 24
RUN = merge(SMALL, {"directions": {"label_tokens": 2}})
# (mapping, model type) -> settings on top of RUN, each with why
SETTINGS: dict[tuple[str, str], dict] = {
    # the first of the tiny model's 2 layers is a short convolution (kernel 3): at the last position it sees
    # only the chat template's closing tokens, the same for every prompt, so the difference of means is zero
    # at both candidate layers (0 and 1) and the final residual (2) is never a candidate: fix the layer there
    ("causal-lm", "lfm2_moe"): {"layers": {"method": "fixed", "layer": 2}},
}


def _cases() -> list:
    """test_coverage.py's types with its marks: a skip stays a skip, an unsupported type (xfail there)
    is an xfail that does not run here; the other types run, PIPELINE_XFAIL's as strict xfails."""
    out = []
    for param in _types():
        mapping, model_type = param.values
        marks = []
        for mark in (getattr(m, "mark", m) for m in param.marks):
            if mark.name == "xfail":
                marks.append(pytest.mark.xfail(reason=f"unsupported (support/decoder_types.py): {mark.kwargs['reason']}",
                                               run=False))
            else:
                marks.append(getattr(pytest.mark, mark.name)(*mark.args, **mark.kwargs))
        why = PIPELINE_XFAIL.get((mapping, model_type))
        if why and not marks:
            marks.append(pytest.mark.xfail(reason=why, strict=True))
        out.append(pytest.param(mapping, model_type, marks=marks, id=param.id))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("mapping,model_type", _cases())
def test_the_pipeline_runs_on_every_decoder(mapping, model_type, tokenizer, tmp_path, record_property):
    model = tiny(mapping, model_type)
    adapter = ArchitectureAdapter(model)
    loaded = Loaded(model, tokenizer, adapter, f"tiny-{model_type}", str(tmp_path))
    run = obliterate(loaded, "basic", **merge(RUN, SETTINGS.get((mapping, model_type), {})))
    record_property("shared_prefix", sharing_obstacle(model) or "shared")
    assert run.loaded is loaded and set(run.metrics) == {"before", "after"}
    assert run.edit is not None and run.edit.post_writer_norm == adapter.post_writer_norm  # obliteratus.json's record
    (q,) = run.directions.basis  # basic: one direction, projected out of every writer and the embeddings
    root, inputs = _inputs(adapter)
    bound = max(along_ratio(h, q.to(h.dtype)) for h in _layer_outputs(adapter, root, inputs))
    record_property("bound", bound)
    assert bound < (POST_NORM_BOUND if adapter.post_writer_norm else EXACT)
