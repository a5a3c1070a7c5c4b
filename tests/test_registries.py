"""The registries are the test matrices: every registered direction method, excise variant and layer
selector is tested here by being registered, and a technique registered in a test runs through the
pipeline settings like a built-in one."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from transformers import AutoModelForCausalLM

from obliteratus.pipeline import obliterate
from obliteratus.settings import resolve_settings
from obliteratus.directions import Directions, direction_methods
from obliteratus.directions.base import DIRECTION_METHODS, FitContext, register_direction_method
from obliteratus.errors import ConfigError
from obliteratus.excise.apply import excise
from obliteratus.excise.base import EXCISE_VARIANTS, register_excise_variant
from obliteratus.excise.dispatch import apply_edit
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.registry import Registry, import_technique_modules
from obliteratus.select.base import LAYER_SELECTORS, register_layer_selector
from obliteratus.select.layers import LayerSelection

from conftest import REPO, merge, random_unit, save_tiny, tiny_model

D = 32
# Options a method needs to run fast on the planted data below (its defaults are for real models).
FAST_OPTIONS = {"sae": {"expansion": 2, "batch_size": 64, "lr": 1e-2, "l1_coeff": 1.0, "max_epochs": 60}}
CLOSED_FORM = [name for name, m in direction_methods().items() if not m.needs_model]


def test_registry_names_the_valid_entries_and_refuses_bad_ones():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    assert reg.names() == ["a"] and reg.items() == [("a", 1)] and "a" in reg and len(reg) == 1
    with pytest.raises(ConfigError, match="unknown widget 'b'; valid: a"):
        reg.get("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="identifier"):
        reg.register("not a name", 3)

    class Loose(BaseModel):
        x: int = 0

    with pytest.raises(ValueError, match="extra='forbid'"):
        reg.register("c", 4, Loose)
    assert reg.unregister("a") == 1 and reg.names() == []


def planted(seed: int = 0, n: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """harmless ~ N(0, diag(1, 4, 1, …)), harmful = the same + 5·e0: the answer is e0, and the
    largest harmless variance (e1) is orthogonal to it."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(D)
    scale[1] = 2.0
    u = torch.zeros(D)
    u[0] = 1.0
    harmless = torch.randn(n, D, generator=g) * scale
    harmful = torch.randn(n, D, generator=g) * scale + 5.0 * u
    return harmful, harmless, u


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_every_closed_form_method_recovers_a_planted_shift(name):
    """Through the same FitContext the driver builds: orthonormal float32 rows on the CPU, the first
    along the planted shift and signed toward harmful."""
    method = direction_methods()[name]
    harmful, harmless, u = planted()
    k = 1 if method.max_directions is None else min(1, method.max_directions)
    ctx = FitContext(harmful, harmless, k, method.parse_options(FAST_OPTIONS.get(name)), layer=0, position=-1,
                     mean_diff=harmful.double().mean(0).float() - harmless.double().mean(0).float())
    fitted = method.fit_context(ctx)
    rows = fitted.rows
    assert rows.dtype == torch.float32 and rows.device.type == "cpu" and rows.shape == (k, D)
    torch.testing.assert_close(rows.double() @ rows.double().T, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(rows[0] @ u) > 0.5, float(rows[0] @ u)  # a random unit vector: |cos| ≈ 1/sqrt(32) ≈ 0.18
    assert isinstance(fitted.fit, dict) and (not method.reports_fit or name in fitted.fit)


@pytest.mark.parametrize("name", list(direction_methods()))
def test_every_direction_method_declares_a_strict_options_model_and_a_fit(name):
    method = direction_methods()[name]
    assert method.options.model_config.get("extra") == "forbid" and method.description
    assert method.pipeline_fit is not None or not method.needs_model
    with pytest.raises(ConfigError, match=name):
        method.parse_options({"no_such_option": 1})


def test_a_method_that_needs_the_model_must_say_how_it_is_fitted():
    with pytest.raises(ValueError, match="pipeline_fit"):
        register_direction_method("toy_needs_model", "x", lambda h, n, k, o: h[:1], needs_model=True)
    assert "toy_needs_model" not in direction_methods()


def _accepts(excise: dict, directions: dict | None = None) -> bool:
    try:
        resolve_settings(None, {"excise": excise, "directions": directions or {}})
    except ConfigError:
        return False
    return True


KERNEL = {"max_weight": 0.8, "max_weight_position": 1.0, "min_weight": 0.4, "min_weight_distance": 1.5}


@pytest.mark.parametrize("name", list(EXCISE_VARIANTS))
def test_declared_capabilities_decide_which_options_combine(name):
    """Each capability a variant declares is exactly what validation lets through with it."""
    v = EXCISE_VARIANTS.get(name)
    m = {"method": name}
    assert _accepts(m)
    assert _accepts({**m, "mode": "hooks"}) == v.hook_form
    assert _accepts({**m, "neurons": {"count": 2}}) == v.neurons
    assert _accepts({**m, "lm_head": True}) == v.lm_head
    assert _accepts({**m, "lam": 2.0}) == v.lam
    assert _accepts({**m, "attention": False}) == (not v.attention_only)
    assert _accepts({**m, "kernel_attn": KERNEL}) == (v.strengths == "any")
    assert _accepts({**m, "layer_weights": "spectral"}) == (v.strengths == "any")
    assert _accepts({**m, "layer_weights": "through_source"}) == (v.strengths != "none")
    assert _accepts(m, {"scope": "per_layer"}) == (v.layer_bases and v.refit is None)
    assert _accepts({**m, "moe": {"transplant": True}}) == v.moe
    if v.refit is not None:  # it replaces the basis: only a difference-of-means method may feed it
        for method, dm in direction_methods().items():
            assert _accepts(m, {"method": method}) == dm.mean_difference, method


@pytest.mark.parametrize("name", list(EXCISE_VARIANTS))
def test_every_excise_variant_edits_only_the_writers_finitely(name):
    model = tiny_model("llama")
    ex = resolve_settings(None, {"excise": {"method": name}}).excise
    q = random_unit(D, seed=3)
    v = EXCISE_VARIANTS.get(name)
    read = None
    if v.refit is not None:  # an oblique read side with read·qᵀ = 1
        w = random_unit(D, seed=7)
        read = q + 0.5 * (w - (w @ q.T) * q)
    d = Directions(q, "diff_means", 1, -1, q[0], read=read)
    adapter = ArchitectureAdapter(model)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    writers = {id(t) for w in adapter.writers(attention=ex.attention, mlp=ex.mlp, embeddings=ex.embeddings)
               for t in (w.weight, w.bias) if t is not None}
    report = apply_edit(adapter, d, ex)
    changed = {id(p) for p in model.parameters() if not torch.equal(p.detach(), before[id(p)])}
    assert changed and changed <= writers and report.edited
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", list(LAYER_SELECTORS))
def test_every_layer_selector_is_a_valid_layers_method(name):
    assert resolve_settings(None, {"layers": {"method": name}}).layers.method == name
    assert LAYER_SELECTORS.get(name).description


def test_a_technique_registered_in_a_test_runs_through_the_pipeline(tmp_path):
    """A toy direction method, layer selector and excise variant, each registered with one call, are
    chosen by name in the settings and used by the pipeline; unregistered afterwards."""

    seen = {}

    def toy_fit(harmful, harmless, k, options):
        r = harmful.double().mean(0) - harmless.double().mean(0)  # [d]
        return (r / r.norm()).float()[None]

    def toy_select(ctx):
        seen["selector"] = ctx.adapter.n_layers
        return LayerSelection(1, -1, "toy_second")

    def toy_apply(adapter, q, settings, plan):
        seen["variant"] = q.shape
        return excise(adapter, q, settings, plan)

    register_direction_method("toy_mean", "difference of means, as a test registers it", toy_fit, max_directions=1)
    register_layer_selector("toy_second", "always layer 1", toy_select)
    register_excise_variant("toy_project", "the plain projection under another name", toy_apply)
    try:
        src = save_tiny(tmp_path, "llama")
        small = {"data": {"n_train": 12, "n_val": 4, "n_test": 4},
                 "evaluate": {"max_new_tokens": 4, "kl_tokens": 2, "ppl_window": 32, "perplexity": False}}
        r = obliterate(str(src), "basic", overrides=merge(small, {
            "directions": {"method": "toy_mean"}, "layers": {"method": "toy_second"},
            "excise": {"method": "toy_project"}}))
        assert r.directions.method == "toy_mean" and r.directions.layer == 1 and r.selection.method == "toy_second"
        assert seen == {"selector": r.loaded.adapter.n_layers, "variant": (1, D)}
        q = r.directions.basis
        for layer in r.loaded.model.model.layers:
            assert float((q @ layer.self_attn.o_proj.weight).abs().max()) < 1e-4
            assert float((q @ layer.mlp.down_proj.weight).abs().max()) < 1e-4
    finally:
        DIRECTION_METHODS.unregister("toy_mean")
        LAYER_SELECTORS.unregister("toy_second")
        EXCISE_VARIANTS.unregister("toy_project")
    with pytest.raises(ConfigError, match="toy_mean"):
        resolve_settings(None, {"directions": {"method": "toy_mean"}})


def test_a_technique_module_registers_by_being_there(tmp_path, monkeypatch):
    """A new technique is one new file: its package imports every module in it (but the skipped ones),
    so the module's registration call runs without any list naming it."""
    package = tmp_path / "techniques"
    package.mkdir()
    (package / "__init__.py").write_text("", "utf-8")
    for name in ("alpha", "beta", "skipped"):
        (package / f"{name}.py").write_text(f"import sys\nsys.modules['registry_probe'].append({name!r})\n", "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "registry_probe", [])
    import_technique_modules("techniques", [str(package)], skip=("skipped",))
    assert sys.modules["registry_probe"] == ["alpha", "beta"]


@pytest.mark.parametrize("package, skip", [("obliteratus.directions", {"driver"}), ("obliteratus.excise", set()),
                                           ("obliteratus.select", set()), ("obliteratus.evaluate.judges", set())])
def test_every_module_of_a_technique_package_is_imported_with_it(package, skip):
    module = importlib.import_module(package)
    names = {info.name for info in pkgutil.iter_modules(module.__path__)} - skip
    assert all(f"{package}.{name}" in sys.modules for name in names)


def contributing_example(path: str) -> str:
    """The code block CONTRIBUTING.md gives as the worked example for the file `path`."""
    text = (REPO / "CONTRIBUTING.md").read_text("utf-8")
    after = text.split(f"A worked example, `{path}`", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("path, name, overrides", [
    ("src/obliteratus/directions/median_diff.py", "median_diff", {"directions": {"method": "median_diff"}}),
    ("src/obliteratus/excise/half.py", "half", {"excise": {"method": "half"}}),
])
def test_contributings_worked_examples_run_as_one_file(tmp_path, monkeypatch, path, name, overrides):
    """The worked examples in CONTRIBUTING.md, as written there, saved as the one new file they name
    (here in a temporary folder, loaded under their package's name), are picked up by name and run
    through obliterate(); nothing else is edited."""
    file = tmp_path / Path(path).name
    file.write_text(contributing_example(path), "utf-8")
    module_name = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    registry = DIRECTION_METHODS if "directions" in module_name else EXCISE_VARIANTS
    try:
        spec.loader.exec_module(module)
        src = save_tiny(tmp_path, "llama")
        small = {"data": {"n_train": 12, "n_val": 4, "n_test": 4},
                 "evaluate": {"max_new_tokens": 4, "kl_tokens": 2, "ppl_window": 32, "perplexity": False}}
        before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(src).state_dict().items()}
        r = obliterate(str(src), "basic", overrides=merge(small, {"layers": {"method": "fixed", "layer": 1}}, overrides))
        q = r.directions.basis.double()  # [1, d]
        o_proj = r.loaded.model.model.layers[0].self_attn.o_proj.weight.detach().double()
        original = before["model.layers.0.self_attn.o_proj.weight"].double()
        if name == "half":  # W' = W − ½·QQᵀW: half of the component is left
            assert torch.allclose(q @ o_proj, 0.5 * (q @ original), atol=1e-5)
        else:
            assert r.directions.method == "median_diff" and float((q @ o_proj).abs().max()) < 1e-4
    finally:
        registry.unregister(name)
