"""Architecture adapters, named hooks and the EXCISE weight edit on tiny models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import VOCAB, family_params, random_unit, save_tiny, tiny_model
from obliteratus.settings import ExciseSettings
from obliteratus.errors import EditError, UnsupportedArchitectureError
from obliteratus.excise import ablated, excise, residual_norms
from obliteratus.hook_points import hooked
from obliteratus.models import ArchitectureAdapter, supported_families
from obliteratus.models.load import summon

families = pytest.mark.parametrize("family", family_params())


def tokens(seed: int = 0, shape=(3, 9)) -> torch.Tensor:
    return torch.randint(0, 259, shape, generator=torch.Generator().manual_seed(seed))


def build(family: str):
    model = tiny_model(family)
    return model, ArchitectureAdapter(model)


def writer_outputs(adapter: ArchitectureAdapter, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every residual writer on one forward pass."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        w.module.register_forward_hook(lambda m, a, y, name=w.name: out.__setitem__(name, y.detach().clone()))
        for w in adapter.writers()
    ]
    try:
        with torch.no_grad():
            adapter.model(ids)
    finally:
        for h in handles:
            h.remove()
    return out


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@families
def test_adapter_structure(family):
    from transformers.pytorch_utils import Conv1D

    model, adapter = build(family)
    assert adapter.n_layers == 3
    assert adapter.d_model == 32
    writers = adapter.writers()
    assert len(writers) == 2 * 3 + len(adapter.embeddings)
    assert len({w.name for w in writers}) == len(writers)
    assert sum(w.kind == "embed" for w in writers) == len(adapter.embeddings) >= 1
    for w in writers:
        if isinstance(w.module, nn.Embedding):
            assert w.layout == "in_out"
            assert w.module.weight.shape[-1] == 32
        elif isinstance(w.module, Conv1D):
            assert w.layout == "in_out"
            assert w.module.weight.shape[1] == 32  # [in, d]
        else:
            assert isinstance(w.module, nn.Linear)
            assert w.layout == "out_in"
            assert w.module.weight.shape[0] == 32  # [d, in]
    assert adapter.tied_lm_head == (adapter.lm_head.weight is adapter.embeddings[0].weight)
    assert adapter.family in supported_families()
    # toggles and layer selection
    assert [w.kind for w in adapter.writers(attention=False, embeddings=False)] == ["mlp"] * 3
    assert [w.name for w in adapter.writers(mlp=False, embeddings=False, layers=[1])] == ["layers.1.attn_out"]


def test_gpt2_layouts_and_tied_head():
    model, adapter = build("gpt2")
    layouts = {w.name: w.layout for w in adapter.writers()}
    assert layouts["embed.wte"] == layouts["embed.wpe"] == "in_out"
    assert layouts["layers.0.attn_out"] == layouts["layers.2.mlp_out"] == "in_out"
    assert adapter.tied_lm_head
    assert not ArchitectureAdapter(tiny_model("llama")).tied_lm_head


@families
def test_excise_removes_direction_from_every_writer(family):
    model, adapter = build(family)
    q = random_unit(32, seed=1)
    ids = tokens()
    before = writer_outputs(adapter, ids)
    assert max(float((y @ q.T).abs().max()) for y in before.values()) > 0.05
    excise(adapter, q, ExciseSettings())
    after = writer_outputs(adapter, ids)
    assert set(after) == {w.name for w in adapter.writers()}
    for name, y in after.items():
        rel = float((y @ q.T).abs().max() / y.abs().max())
        assert rel < 1e-5, f"{family} {name}: q·output = {rel:.3g} of max |output|"


@families
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("lam", [1.0, 2.0])
@pytest.mark.parametrize("biases", [True, False])
def test_hook_edit_equals_weight_edit(family, k, lam, biases):
    model, adapter = build(family)
    q = random_unit(32, k=k, seed=2)
    ids = tokens(seed=3)
    original = logits(model, ids)
    with ablated(adapter, q, lam, biases=biases):
        hooked_logits = logits(model, ids)
    # the hooks are gone after the block
    torch.testing.assert_close(logits(model, ids), original, atol=0, rtol=0)

    edited = copy.deepcopy(model)
    excise(ArchitectureAdapter(edited), q, ExciseSettings(lam=lam, biases=biases))
    weight_logits = logits(edited, ids)
    assert (weight_logits - original).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(hooked_logits, weight_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("toggle", ["attention", "mlp", "embeddings"])
def test_hook_edit_equals_weight_edit_with_toggles(family, toggle):
    model, adapter = build(family)
    q = random_unit(32, seed=4)
    ids = tokens(seed=5)
    with ablated(adapter, q, 1.0, **{toggle: False}):
        hooked_logits = logits(model, ids)
    edited = copy.deepcopy(model)
    excise(ArchitectureAdapter(edited), q, ExciseSettings(**{toggle: False}))
    torch.testing.assert_close(hooked_logits, logits(edited, ids), atol=1e-4, rtol=1e-4)


@families
def test_norm_preserving_excise_keeps_norms(family):
    model, adapter = build(family)
    before = {w.name: residual_norms(w.module.weight, w.layout).clone() for w in adapter.writers()}
    q = random_unit(32, k=2, seed=6)
    report = excise(adapter, q, ExciseSettings(norm_preserve=True))
    assert report.norm_preserve and report.k == 2
    for w in adapter.writers():
        torch.testing.assert_close(residual_norms(w.module.weight, w.layout), before[w.name], atol=1e-5, rtol=1e-5)
    assert report.max_residual < 1e-5


@families
def test_excise_touches_only_writers(family):
    model, adapter = build(family)
    writer_params = {id(w.module.weight) for w in adapter.writers()} | {
        id(w.bias) for w in adapter.writers() if w.bias is not None
    }
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = excise(adapter, random_unit(32, seed=7), ExciseSettings())
    changed = set()
    for name, p in model.named_parameters():
        if id(p) in writer_params:
            if not torch.equal(p, before[name]):
                changed.add(id(p))
        else:
            torch.testing.assert_close(p, before[name], atol=0, rtol=0, msg=f"{family}: {name} changed")
    assert changed == writer_params  # every writer weight (and bias) was edited
    assert len(report.edited) == len(writer_params)
    assert report.max_residual < 1e-5
    assert report.lam == 1.0 and report.k == 1
    assert report.tied_lm_head_edited == adapter.tied_lm_head
    assert report.post_writer_norm == (family in ("gemma2", "gemma3_text"))


@pytest.mark.parametrize("family", family_params("gpt2", "gpt_neox", "llama"))
def test_excise_bias_toggle(family):
    model, adapter = build(family)
    biased = [w for w in adapter.writers() if w.bias is not None]
    assert bool(biased) == (family != "llama")
    before = [w.bias.detach().clone() for w in biased]
    q = random_unit(32, seed=8)
    excise(adapter, q, ExciseSettings(biases=False))
    for w, b in zip(biased, before):
        torch.testing.assert_close(w.bias, b, atol=0, rtol=0)
    excise(adapter, q, ExciseSettings(biases=True))
    for w, b in zip(biased, before):
        assert float((w.bias @ q.T).abs().max()) < 1e-6
        assert float((b @ q.T).abs().max()) > 1e-3


@pytest.mark.parametrize("toggle", ["attention", "mlp", "embeddings"])
def test_excise_toggles_leave_writers_alone(toggle):
    model, adapter = build("gpt2")
    kind = {"attention": "attn", "mlp": "mlp", "embeddings": "embed"}[toggle]
    skipped = [w for w in adapter.writers() if w.kind == kind]
    before = [w.module.weight.detach().clone() for w in skipped]
    report = excise(adapter, random_unit(32, seed=9), ExciseSettings(**{toggle: False}))
    for w, b in zip(skipped, before):
        torch.testing.assert_close(w.module.weight, b, atol=0, rtol=0)
        assert not any(e.startswith(w.name + ".") for e in report.edited)
    if toggle == "embeddings":
        assert not report.tied_lm_head_edited


def test_excise_twice_is_idempotent():
    model, adapter = build("gpt2")
    q = random_unit(32, k=2, seed=10)
    excise(adapter, q, ExciseSettings())
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    excise(adapter, q, ExciseSettings())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, once[n], atol=1e-6, rtol=0)


def test_excise_non_finite_changes_nothing():
    model, adapter = build("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = random_unit(32)
    q[0, 3] = float("nan")
    with pytest.raises(EditError):
        excise(adapter, q, ExciseSettings())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["xlnet", "ctrl"])
def test_unsupported_architecture(name):
    """Neither the table nor discovery can edit these: XLNet's attention writes through a bare 3-D
    parameter before a post-LN norm, CTRL adds a sinusoidal position buffer that no module outputs."""
    import transformers as tf

    if name == "xlnet":
        config = tf.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
    else:
        config = tf.CTRLConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, dff=64, n_positions=64)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchitectureAdapter(model)
    message = str(err.value)
    assert repr(name) in message
    for family in ("Llama", "Qwen2", "Gemma2", "GPT-2", "GPT-NeoX"):
        assert family in message


def test_module_for_and_unknown_hook_name():
    model, adapter = build("llama")
    assert adapter.module_for("embed") == (adapter.layers[0], "input")
    assert adapter.module_for("layers.1.resid_pre") == (adapter.layers[1], "input")
    assert adapter.module_for("layers.2.resid_post") == (adapter.layers[2], "output")
    assert adapter.module_for("layers.0.attn_out") == (model.model.layers[0].self_attn.o_proj, "output")
    assert adapter.module_for("layers.0.mlp_out") == (model.model.layers[0].mlp.down_proj, "output")
    for bad in ("layers.3.resid_pre", "layers.x.attn_out", "blocks.0.resid_post", "layers.0.mlp"):
        with pytest.raises(KeyError) as err:
            adapter.module_for(bad)
        message = str(err.value)
        assert repr(bad) in message and "layers.0.resid_pre" in message and "layers.2.mlp_out" in message
    with pytest.raises(KeyError):
        with hooked(adapter, {"nope": lambda h: h}):
            pass


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_named_hooks_read_and_write_the_residual_stream(family):
    model, adapter = build(family)
    ids = tokens(seed=11)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(h):
            seen[name] = h.detach().clone()
        return fn

    names = ["embed"] + [f"layers.{i}.{p}" for i in range(3) for p in ("resid_pre", "resid_post")]
    with hooked(adapter, [(n, keep(n)) for n in names]):
        out = model(ids, output_hidden_states=True)
    assert all(seen[n].shape == (3, 9, 32) for n in names)
    torch.testing.assert_close(seen["embed"], seen["layers.0.resid_pre"])
    for i in range(2):
        torch.testing.assert_close(seen[f"layers.{i}.resid_post"], seen[f"layers.{i + 1}.resid_pre"])
    for j in range(3):
        torch.testing.assert_close(seen[f"layers.{j}.resid_pre"], out.hidden_states[j])

    # a hook that returns a tensor replaces the activation: zeroing resid_pre of layer 0 changes logits
    base = logits(model, ids)
    with hooked(adapter, {"layers.1.resid_pre": lambda h: h * 0}):
        zeroed = logits(model, ids)
    assert (zeroed - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)  # removed afterwards


def test_hooks_are_removed_on_error():
    model, adapter = build("llama")
    with pytest.raises(RuntimeError):
        with hooked(adapter, {"layers.0.resid_post": lambda h: h + 1}):
            raise RuntimeError("boom")
    for layer in adapter.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_summon_tiny_checkpoint(tmp_path, family):
    path = save_tiny(tmp_path, family)
    loaded = summon(str(path))
    assert loaded.adapter.family == ArchitectureAdapter(tiny_model(family)).family
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id is not None
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    ids = tokens(seed=12)
    torch.testing.assert_close(logits(loaded.model, ids), logits(tiny_model(family), ids), atol=1e-5, rtol=1e-5)
