"""Steering vectors: the hook math, the file format, and summon() attaching saved steering."""

from __future__ import annotations

import json

import pytest
import torch

from obliteratus.errors import ObliteratusError
from obliteratus.excise.hook_form import ablated
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.load import summon
from obliteratus.steering import (SteeringEntry, SteeringSpec, apply_steering, attach_steering, load_steering,
                                  save_steering)

from conftest import random_unit, save_tiny, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7], [1, 2, 3, 4, 5, 6, 8]])


def spec_for_test(d: int = 32) -> SteeringSpec:
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    return SteeringSpec((
        SteeringEntry("layers.1.resid_pre", "add", v, alpha=4.0),
        SteeringEntry("layers.2.mlp_out", "ablate", random_unit(d, k=2, seed=4), alpha=1.0, positions="last"),
    ))


def test_add_at_embed_equals_shifting_every_embedding_row():
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama")
    with apply_steering(ArchitectureAdapter(model), SteeringSpec((SteeringEntry("embed", "add", v, alpha=2.5),))):
        steered = model(IDS).logits
    shifted = tiny_model("llama")
    with torch.no_grad():
        shifted.model.embed_tokens.weight += 2.5 * v  # every token's h0 gets + α·v
    torch.testing.assert_close(steered, shifted(IDS).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(IDS).logits, tiny_model("llama")(IDS).logits)  # hooks gone


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ablate_everywhere_equals_excise_hooks_ablated(family):
    q = random_unit(32, k=2, seed=5)
    model = tiny_model(family)
    adapter = ArchitectureAdapter(model)
    assert not adapter.tied_lm_head
    hooks = ["embed"] + [f"layers.{i}.{p}" for i in range(adapter.n_layers) for p in ("attn_out", "mlp_out")]
    spec = SteeringSpec(tuple(SteeringEntry(h, "ablate", q, alpha=1.0) for h in hooks))
    with apply_steering(adapter, spec):
        steered = model(IDS).logits
    with ablated(adapter, q, 1.0):
        reference = model(IDS).logits
    torch.testing.assert_close(steered, reference, atol=1e-5, rtol=1e-5)
    assert (steered - model(IDS).logits).abs().max() > 1e-2


def test_last_position_only_changes_the_last_token():
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    bare = model(IDS).logits
    with apply_steering(adapter, SteeringSpec((SteeringEntry("layers.0.resid_post", "add", v, 3.0, "last"),))):
        steered = model(IDS).logits
    torch.testing.assert_close(steered[:, :-1], bare[:, :-1])
    assert (steered[:, -1] - bare[:, -1]).abs().max() > 1e-2


def test_attach_is_persistent_until_removed_and_checks_the_model():
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    bare = model(IDS).logits
    with apply_steering(adapter, spec_for_test()):
        want = model(IDS).logits
    handle = attach_steering(adapter, spec_for_test())
    torch.testing.assert_close(model(IDS).logits, want)
    torch.testing.assert_close(model(IDS).logits, want)  # still there on a second call
    handle.remove()
    handle.remove()  # idempotent
    torch.testing.assert_close(model(IDS).logits, bare)
    with pytest.raises(ObliteratusError, match="layers.7.resid_pre"):
        attach_steering(adapter, SteeringSpec((SteeringEntry("layers.7.resid_pre", "add", torch.ones(32)),)))
    with pytest.raises(ObliteratusError, match="d_model = 32"):
        attach_steering(adapter, SteeringSpec((SteeringEntry("embed", "add", torch.ones(31)),)))
    with pytest.raises(ObliteratusError, match="orthonormal"):
        SteeringSpec((SteeringEntry("embed", "ablate", torch.ones(2, 32)),))
    torch.testing.assert_close(model(IDS).logits, bare)  # failed attach left nothing behind


def test_summon_attaches_saved_steering(tmp_path):
    path = save_tiny(tmp_path, "llama")
    spec = spec_for_test()
    save_steering(spec, path)
    model = tiny_model("llama")
    bare = model(IDS).logits
    with apply_steering(ArchitectureAdapter(model), spec):
        want = model(IDS).logits
    loaded = summon(str(path))
    assert loaded.steering is not None and loaded.steering.attached and len(loaded.steering.spec.entries) == 2
    got = loaded.model(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - bare).abs().max() > 1e-2
    plain = summon(str(path), steering=False)
    assert plain.steering is None
    torch.testing.assert_close(plain.model(IDS).logits, bare)
    again = load_steering(path)
    for a, b in zip(again.entries, spec.entries):
        assert (a.hook, a.mode, a.alpha, a.positions) == (b.hook, b.mode, b.alpha, b.positions)
        torch.testing.assert_close(a.vector, b.vector)
    with pytest.raises(ObliteratusError, match="overwrite"):
        save_steering(spec, path)


@pytest.mark.parametrize("edit, needle", [
    (lambda doc: "{not json", "not valid JSON"),
    (lambda doc: {**doc, "version": 2}, "version"),
    (lambda doc: {**doc, "entries": [{**doc["entries"][0], "mode": "multiply"}]}, "entries.0.mode"),
    (lambda doc: {**doc, "entries": [{**doc["entries"][0], "colour": 1}]}, "colour"),
    (lambda doc: {**doc, "entries": [{**doc["entries"][0], "tensor": "entry.9"}]}, "entry.9"),
    (lambda doc: {**doc, "entries": [{**doc["entries"][1], "tensor": "entry.0"}]}, "orthonormal"),
])
def test_malformed_steering_json_is_one_clear_error(tmp_path, edit, needle):
    path = tmp_path / "m"
    save_steering(spec_for_test(), path)
    doc = json.loads((path / "steering.json").read_text())
    new = edit(doc)
    (path / "steering.json").write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ObliteratusError, match=needle) as caught:
        load_steering(path)
    assert "steering.json" in str(caught.value)


def test_summon_refuses_malformed_or_half_written_steering(tmp_path):
    path = save_tiny(tmp_path, "llama")
    (path / "steering.json").write_text("{}")
    with pytest.raises(ObliteratusError, match="both steering.json and steering.safetensors"):
        summon(str(path))
    assert summon(str(path), steering=False).steering is None
