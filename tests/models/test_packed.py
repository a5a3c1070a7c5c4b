"""The CPU fast path (models/packed.py): Linear layers on oneDNN-packed weight copies compute what
F.linear computes, follow every write to their weights, leave the parameters untouched, and get
out of the way where they cannot help (gradients, long inputs, missing kernels, no memory)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import params_digest, random_unit, save_tiny, tiny_model
from obliteratus.models.options import ModelSettings
from obliteratus.settings import ExciseSettings
from obliteratus.excise.apply import excise
from obliteratus.excise.hook_form import ablated
from obliteratus.models import packed
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.models.load import summon


pytestmark = pytest.mark.skipif(not packed.available(), reason="no oneDNN packed linear in this torch build")


def ids(seed: int = 0, shape=(3, 9)) -> torch.Tensor:
    return torch.randint(0, 250, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=x).logits


def linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_model_computes_the_same_logits_and_tokens(family):
    model = tiny_model(family)
    digest, x = params_digest(model), ids()
    plain = logits(model, x)
    with torch.inference_mode():
        greedy = model.generate(input_ids=x, max_new_tokens=8, do_sample=False)
    assert packed.pack_linears(model) == len(linears(model)) > 0
    assert all(packed.is_packed(m) for m in linears(model))
    torch.testing.assert_close(logits(model, x), plain, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert torch.equal(model.generate(input_ids=x, max_new_tokens=8, do_sample=False), greedy)
    assert params_digest(model) == digest  # nothing written
    assert packed.pack_linears(model) == len(linears(model))  # packing twice is a no-op
    packed.unpack_linears(model)
    assert not any(packed.is_packed(m) for m in linears(model))
    assert "forward" not in linears(model)[0].__dict__
    torch.testing.assert_close(logits(model, x), plain, atol=0, rtol=0)


def test_a_write_to_the_weight_is_seen():
    """EXCISE writes in place (param.copy_), a user may assign a new Parameter: either way the
    next call runs the new weight, not the copy packed before."""
    model = tiny_model("llama")
    packed.pack_linears(model)
    x = ids()
    logits(model, x)  # packs every layer
    proj = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        proj.weight.copy_(proj.weight * 0.5)
    expected = copy.deepcopy(model)
    packed.unpack_linears(expected)
    torch.testing.assert_close(logits(model, x), logits(expected, x), atol=1e-5, rtol=1e-5)
    proj.weight = nn.Parameter(torch.zeros_like(proj.weight), requires_grad=False)
    expected.model.layers[0].mlp.down_proj.weight = nn.Parameter(torch.zeros_like(proj.weight), requires_grad=False)
    torch.testing.assert_close(logits(model, x), logits(expected, x), atol=1e-5, rtol=1e-5)


def test_a_deep_copy_runs_its_own_weights():
    model = tiny_model("llama")
    packed.pack_linears(model)
    x = ids()
    before = logits(model, x)
    twin = copy.deepcopy(model)
    assert packed.is_packed(twin.model.layers[0].self_attn.o_proj)
    with torch.inference_mode():
        for m in linears(twin):
            m.weight.mul_(0.5)
    assert (logits(twin, x) - before).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)


def test_weight_edit_equals_hooks_on_a_packed_model():
    """Hooks-based ablation (the optimizer's trials) and the baked weights agree with packing on,
    as they do without it (test_adapters.py)."""
    model = tiny_model("qwen2")
    packed.pack_linears(model)
    adapter, q, x = ArchitectureAdapter(model), random_unit(32, seed=2), ids(seed=3)
    with ablated(adapter, q, 1.0):
        hooked = logits(model, x)
    excise(adapter, q, ExciseSettings())
    torch.testing.assert_close(logits(model, x), hooked, atol=1e-4, rtol=1e-4)


def test_gradients_and_long_inputs_use_plain_gemm(monkeypatch):
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.up_proj
    reference = copy.deepcopy(layer)
    packed.pack_linears(model)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()  # the packed kernel has no backward: the call must fall back
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=0, rtol=0)
    monkeypatch.setattr(packed, "MAX_ROWS", 2)
    with torch.inference_mode():
        long = torch.randn(3, 32)
        assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.weight, layer.bias))


def test_nothing_is_packed_without_kernels_or_memory(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(packed, "free_memory", lambda: packed.linear_bytes(model))  # copies need > half
    assert packed.pack_linears(model) == 0
    assert packed.pack_linears(model, check_memory=False) > 0
    packed.unpack_linears(model)
    monkeypatch.setattr(packed, "available", lambda: False)
    with pytest.warns(UserWarning, match="packed linear"):
        assert packed.pack_linears(model, check_memory=False) == 0
    assert not any(packed.is_packed(m) for m in linears(model))


def test_summon_packs_on_the_cpu_unless_off(tmp_path):
    path = save_tiny(tmp_path, "llama")
    on = summon(str(path), ModelSettings(device="cpu"))
    assert all(packed.is_packed(m) for m in linears(on.model))
    off = summon(str(path), ModelSettings(device="cpu", cpu_pack="off"))
    assert not any(packed.is_packed(m) for m in linears(off.model))
    x = ids()
    torch.testing.assert_close(logits(on.model, x), logits(off.model, x), atol=1e-5, rtol=1e-5)
