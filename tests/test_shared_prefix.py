"""Shared-prefix batches (shared_prefix.py): running the prompts' common template prefix once per
batch gives the same last-position logits and the same greedy continuations as the plain
left-padded batch, for every supported family, with and without an edit's hooks attached."""

from __future__ import annotations

import pytest
import torch

from conftest import family_params, tiny_model, tiny_tokenizer
from obliteratus.batching import Encoded, encode_prompts
from obliteratus.data.prompts import format_prompts
from obliteratus.evaluate import early
from obliteratus.shared_prefix import last_logits
from obliteratus.evaluate.judges import markers
from obliteratus.shared_prefix import generate_inputs
from obliteratus.excise.hook_form import ablated
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.optimize.options import StudyOptions
from obliteratus.optimize.trial import Scorer

PROMPTS = ["Hi", "How do I bake bread?", "Write a poem about the sea.", "What is 2 + 2?", "Tell me about dragons.",
           "Name a colour."]


def templated():
    tok = tiny_tokenizer()
    texts = format_prompts(tok, PROMPTS, True, system_prompt="You are a careful assistant.")
    return tok, encode_prompts(tok, texts, True)


def test_common_prefix_leaves_every_row_a_token():
    enc = Encoded([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]], [1, 0, 2], 0)
    assert enc.common_prefix() == [1, 2]  # [1, 2, 3] would leave the last row nothing
    assert Encoded([[1, 2], [3, 4]], [0, 1], 0).common_prefix() == []
    (batch,) = enc.batches(3, prefix=[1, 2])
    assert batch.input_ids.tolist() == [[3, 5, 6], [0, 3, 4], [0, 0, 3]]
    assert batch.full_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 0, 0, 1]]
    assert batch.position_ids[:, -1].tolist() == [4, 3, 2]  # positions continue after the prefix
    with pytest.raises(ValueError, match="not shared"):
        next(enc.batches(3, prefix=[1, 9]))


# Gemma 2 / Gemma 3 build a different mask when a cache is passed with padding after it (their
# logits differ): the optimizer's Scorer detects that and scores without sharing (test below).
UNSHARED = ("gemma2", "gemma3_text")


@pytest.mark.parametrize("family", family_params())
def test_shared_prefix_equals_plain_batches(family):
    tok, enc = templated()
    assert len(enc.common_prefix()) > 10  # the system turn
    model = tiny_model(family)
    scorer = Scorer.build(model, tok, enc, enc, StudyOptions(), 4)
    assert scorer.share_prefix == (family not in UNSHARED)
    if family in UNSHARED:
        return
    torch.testing.assert_close(last_logits(model, enc, 4, share_prefix=True), last_logits(model, enc, 4),
                               atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        for plain, shared in zip(enc.batches(4), enc.batches(4, prefix=enc.common_prefix())):
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
            a = model.generate(input_ids=plain.input_ids, attention_mask=plain.attention_mask, **kw)
            inputs = generate_inputs(model, shared)
            b = model.generate(**inputs, **kw)
            assert torch.equal(a[:, plain.input_ids.shape[1]:], b[:, inputs["input_ids"].shape[1]:])


def test_shared_prefix_under_an_edit_and_in_the_judge(monkeypatch):
    """The prefix runs under the hooks too (the embeddings edit changes it), and the early-stopping
    judge gives the same verdicts and token counts either way."""
    tok, enc = templated()
    model = tiny_model("llama")
    q = torch.nn.functional.normalize(torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(3)), dim=-1)
    with ablated(ArchitectureAdapter(model), q, 1.0, embeddings=True):
        edited_shared = last_logits(model, enc, 4, share_prefix=True)
        edited_plain = last_logits(model, enc, 4)
    torch.testing.assert_close(edited_shared, edited_plain, atol=1e-4, rtol=1e-4)
    assert (edited_plain - last_logits(model, enc, 4)).abs().max() > 1e-3  # the edit did change them
    full = [tok.decode(c, skip_special_tokens=True) for c in
            __import__("obliteratus.evaluate.generate", fromlist=["generate"]).generate(model, tok, enc, 5, 4)]
    norms = [markers.normalise(t) for t in full]
    pairs = {t[i:i + 2] for t in norms for i in range(len(t) - 1)}
    marker = min(p for p in pairs if 0 < sum(p in n for n in norms) < len(norms))
    monkeypatch.setattr(markers, "MARKERS", (marker,))
    plain = early.judge(model, tok, enc, 5, 4)
    shared = list(early.judge_batches(model, tok, enc, 5, 4, share_prefix=True))
    refused = [None] * len(PROMPTS)
    used = [None] * len(PROMPTS)
    for index, r, u in shared:
        for i, ri, ui in zip(index, r, u):
            refused[i], used[i] = ri, ui
    assert refused == plain.refused and used == plain.tokens and any(refused) and not all(refused)


@pytest.mark.parametrize("family", family_params())
def test_verify_and_kl_with_the_prefix_shared(family):
    """VERIFY's generation, the KL passes and the early judge give the same answers with the prefix
    shared as without (families whose logits would differ fall back to full prompts: same answers)."""
    from obliteratus.settings import EvalSettings
    from obliteratus.evaluate import evaluate_model
    from obliteratus.evaluate.generate import generate
    from obliteratus.evaluate.kl import kl_to_reference, reference
    from obliteratus.shared_prefix import can_share_prefix

    tok, enc = templated()
    model = tiny_model(family)
    assert can_share_prefix(model, enc) == (family not in UNSHARED)
    assert not can_share_prefix(model, Encoded([[1, 2], [3, 4]], [0, 1], 0))  # no common prefix
    plain = generate(model, tok, enc, 6, 4)
    if family not in UNSHARED:
        assert generate(model, tok, enc, 6, 4, share_prefix=True) == plain
        ref = reference(model, enc, [c or [5] for c in plain], 4, 4)
        q = torch.nn.functional.normalize(torch.randn(1, model.config.hidden_size), dim=-1)
        with ablated(ArchitectureAdapter(model), q, 1.0):
            a, b = kl_to_reference(model, ref, 4), kl_to_reference(model, ref, 4, share_prefix=True)
        assert a["kl_mean"] > 1e-6 and b["kl_mean"] == pytest.approx(a["kl_mean"], rel=1e-3, abs=1e-7)
    half = list(PROMPTS[:3])
    kw = dict(max_new_tokens=6, batch_size=4, perplexity=False)
    shared = evaluate_model(model, tok, (half, enc.subset([0, 1, 2])), (PROMPTS[3:], enc.subset([3, 4, 5])),
                            EvalSettings(**kw))
    full = evaluate_model(model, tok, (half, enc.subset([0, 1, 2])), (PROMPTS[3:], enc.subset([3, 4, 5])),
                          EvalSettings(**kw, share_prefix=False))
    assert (shared.harmful_responses, shared.harmless_responses) == (full.harmful_responses, full.harmless_responses)
    assert shared.harmful_responses + shared.harmless_responses == decode_all(tok, plain)


def decode_all(tok, conts):
    return tok.batch_decode(conts, skip_special_tokens=True)


def test_layer_selection_with_the_prefix_shared():
    from obliteratus.settings import ExciseSettings, LayerSettings
    from obliteratus.select.layers import select_arditi

    tok, enc = templated()
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    means = torch.randn(1, adapter.n_layers + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ls = LayerSettings(kl_threshold=None, induce_threshold=None)
    a = select_arditi(model, adapter, means, enc, enc, tok, ls, ExciseSettings(), 4)
    b = select_arditi(model, adapter, means, enc, enc, tok, ls, ExciseSettings(), 4, share_prefix=True)
    assert (a.layer, a.position) == (b.layer, b.position)
    scored = [(x.bypass, y.bypass, x.kl, y.kl) for x, y in zip(a.candidates, b.candidates) if x.status != "pruned"]
    assert len(scored) > 1 and all(ya == pytest.approx(xa, abs=1e-4) and yk == pytest.approx(xk, abs=1e-5)
                          for xa, ya, xk, yk in scored)


def test_rdo_targets_with_the_prefix_shared(monkeypatch):
    """The paper's three target sets (under ablation hooks, addition hooks and none) are the same with
    the template prefix shared, and the prefix does run on its own."""
    from obliteratus.directions.rdo import rdo_targets
    from obliteratus import shared_prefix as prefix_module

    tok, enc = templated()
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    md = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = rdo_targets(model, adapter, tok, enc, enc, 1, md, 5, 4)
    shared = []
    real = prefix_module.prefix_cache
    monkeypatch.setattr(prefix_module, "prefix_cache", lambda *args: shared.append(1) or real(*args))
    assert rdo_targets(model, adapter, tok, enc, enc, 1, md, 5, 4, share_prefix=True) == plain
    assert shared


def test_cosmic_selection_with_the_prefix_shared(monkeypatch):
    from obliteratus.settings import ExciseSettings, LayerSettings
    from obliteratus.select.cosmic import select_cosmic
    from obliteratus import shared_prefix as prefix_module

    tok, enc = templated()
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    means = torch.randn(1, adapter.n_layers + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ls = LayerSettings(method="cosmic", kl_threshold=10.0)
    a = select_cosmic(model, adapter, means, enc, enc, ls, ExciseSettings(), batch_size=4)
    shared = []
    real = prefix_module.prefix_cache
    monkeypatch.setattr(prefix_module, "prefix_cache", lambda *args: shared.append(1) or real(*args))
    b = select_cosmic(model, adapter, means, enc, enc, ls, ExciseSettings(), batch_size=4, share_prefix=True)
    assert shared  # the prefix did run on its own
    assert (a.layer, a.position, a.eval_layers) == (b.layer, b.position, b.eval_layers)
    scored = [(x, y) for x, y in zip(a.candidates, b.candidates) if x.status == "scored" or x.status == "chosen"]
    assert len(scored) > 1
    for x, y in scored:
        assert (y.score, y.kl) == (pytest.approx(x.score, abs=1e-4), pytest.approx(x.kl, abs=1e-5))


@pytest.mark.parametrize("family", family_params())
@pytest.mark.parametrize("positions", [1, 3])
def test_probe_with_the_prefix_shared(family, positions):
    """PROBE keeps the same activations (embedding output and every layer, the last k positions)
    with the prefix run once per batch; Gemma 2/3 fall back to full batches."""
    from obliteratus.probe import collect, shared_prefix

    tok, enc = templated()
    model = tiny_model(family)
    adapter = ArchitectureAdapter(model)
    prefix = shared_prefix(adapter, enc, positions)
    assert (prefix is None) == (family in UNSHARED)
    if prefix is not None:
        assert len(prefix) > 10 and min(len(r) for r in enc.ids) - len(prefix) >= positions
    plain = collect(adapter, enc, positions, 4)
    torch.testing.assert_close(collect(adapter, enc, positions, 4, share_prefix=True), plain, atol=1e-4, rtol=1e-4)
    longest = max(len(r) for r in enc.ids)
    assert shared_prefix(adapter, enc, longest) is None  # no row keeps that many tokens outside a prefix


def test_prefix_cache_reads_the_current_cache_name_first():
    """transformers >= 5 names the output's KV cache `cache` and only warns (deprecation) when
    `past_key_values` is read; older versions have only `past_key_values`. Both are found, and the
    deprecated name is not touched when the current one is there."""
    from obliteratus.batching import Batch
    from obliteratus.shared_prefix import prefix_cache

    class Cache:
        def batch_repeat_interleave(self, n):
            self.rows = n

    class Current:
        cache = Cache()

        @property
        def past_key_values(self):
            raise AssertionError("the deprecated name was read")

    class Old:
        past_key_values = Cache()

    batch = Batch([0, 1], torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), prefix=[5, 6])
    for out in (Current(), Old()):
        got = prefix_cache(lambda **kw: out, batch)
        assert isinstance(got, Cache) and got.rows == 2


@pytest.mark.parametrize("case,why,forwards", [
    ("causal-lm/granitemoehybrid", "recurrent state", 1),  # its cache after the prefix pass tells
    ("image-text-to-text/qwen2_vl", "3-D multimodal RoPE", 0),  # the model tells (get_rope_index): no pass
])
def test_models_that_cannot_share_a_prefix_say_no_once(case, why, forwards, caplog):
    """A Mamba hybrid (its cache holds a recurrent state, and transformers cannot repeat it) and a
    model with 3-D multimodal positions (generation reads back the offsets of the model's previous
    call) get False, not an exception; the answer and its reason are kept per model, and logged once."""
    from obliteratus.shared_prefix import can_share_prefix, sharing_obstacle
    from support.decoder_types import tiny

    tok, enc = templated()
    model = tiny(*case.split("/"))
    passes = []
    model.register_forward_pre_hook(lambda m, a: passes.append(1))
    with caplog.at_level("INFO", logger="obliteratus.shared_prefix"):
        assert not can_share_prefix(model, enc, new_tokens=0)
        assert len(passes) == forwards and why in sharing_obstacle(model)
        assert not can_share_prefix(model, enc.subset([0, 1, 2]), new_tokens=0)  # cached: no pass, no new line
    assert len(passes) == forwards
    assert [why in r.getMessage() for r in caplog.records if r.name == "obliteratus.shared_prefix"] == [True]


def test_prefix_cache_refuses_a_recurrent_state():
    """prefix_cache is only for caches every row can share: a layer with a recurrent state (Mamba's
    conv / SSM states) or a cache without batch_repeat_interleave is a TypeError that says why."""
    from obliteratus.batching import Batch
    from obliteratus.shared_prefix import prefix_cache

    class Layer:
        conv_states = {0: None}

    class Recurrent:
        layers = [Layer()]

        def batch_repeat_interleave(self, n):
            raise AssertionError("repeated")

    class Out:
        def __init__(self, cache):
            self.cache = cache

    batch = Batch([0, 1], torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), prefix=[5, 6])
    with pytest.raises(TypeError, match="recurrent state"):
        prefix_cache(lambda **kw: Out(Recurrent()), batch)
    with pytest.raises(TypeError, match="batch_repeat_interleave"):
        prefix_cache(lambda **kw: Out(object()), batch)


def test_a_wrapper_that_wants_pixels_runs_text_through_its_language_model():
    """BLIP-2's forward and generate want pixel_values: logits, generation and the shared prefix go
    through the causal LM inside it (shared_prefix.text_model), and give what that LM gives."""
    from obliteratus.evaluate.generate import generate
    from obliteratus.shared_prefix import can_share_prefix, text_model
    from support.decoder_types import tiny

    tok, enc = templated()
    model = tiny("image-text-to-text", "blip-2")
    lm = text_model(model)
    assert lm is model.language_model and text_model(lm) is lm
    plain = tiny_model("llama")
    assert text_model(plain) is plain  # a causal LM runs itself
    torch.testing.assert_close(last_logits(model, enc, 4), last_logits(lm, enc, 4))
    assert can_share_prefix(model, enc, new_tokens=6)
    torch.testing.assert_close(last_logits(model, enc, 4, share_prefix=True), last_logits(lm, enc, 4), atol=1e-4,
                               rtol=1e-4)
    assert generate(model, tok, enc, 3, 4) == generate(lm, tok, enc, 3, 4, share_prefix=True)
