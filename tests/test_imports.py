"""The package's import structure (issue 25): no import cycle among module-level imports, every
module imports on its own in a fresh interpreter (no module works only because another one was
imported first), no import inside a function except of an optional extra, and module-level imports
go one way, down the layers of :data:`LAYERS`."""

from __future__ import annotations

import ast
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

from conftest import REPO
from support.zygote import Zygote

SRC = REPO / "src"
PACKAGE = SRC / "obliteratus"

# The optional extras (pyproject.toml's optional-dependencies and what they bring): a function may import
# one of them, so that the package works without it. Every other import is at module level.
OPTIONAL = frozenset({"optuna", "sqlalchemy", "matplotlib", "peft", "lm_eval", "sentence_transformers", "gguf",
                      "datasets", "yaml", "jinja2", "huggingface_hub", "psycopg", "gradio",
                      "PIL"})  # Pillow: the web app's (Gradio's) and matplotlib's

# The package's layers, lowest first. A module imports at module level only from its own layer or a
# lower one (``if TYPE_CHECKING:`` imports, for annotations only, may point anywhere). A module's layer
# is that of the longest entry naming it or a package above it ("__init__": the package's own
# __init__.py); a package whose __init__.py imports nothing may be imported from below its layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # what everything stands on; steering because summon attaches saved steering; analysis's pure-torch
    # math (cones, cross-layer cosines, AUROC, PCA) because DISTILL, the judges and the report reuse it;
    # the option models that import only pydantic
    ("foundation", ("errors", "registry", "batching", "hook_points", "shared_prefix", "data", "models",
                    "steering", "analysis.cones", "analysis.cross_layer", "analysis.linear_probes", "analysis.pca",
                    "analysis.options", "optimize.options")),
    # REBIRTH's files: the record, the checked atomic writes, the report (nothing above SUMMON)
    ("files", ("record", "save", "report")),
    # activations, and VERIFY's measurements (generation, judges, KL), which DISTILL also uses
    ("probe and measurements", ("probe", "evaluate")),
    ("direction methods", ("directions",)),
    # EXCISE checks its options against the direction methods' registry
    ("excise", ("excise",)),
    # a layer selector scores each candidate by ablating it (excise/hook_form.py) and measuring KL
    ("layer selection", ("select",)),
    # DISTILL's driver: contrast, layer selection, fit, an excise variant's refit
    ("distill driver", ("directions.driver",)),
    # the settings validate against every registry above
    ("settings", ("settings", "presets", "settings_file")),
    ("run", ("run", "export")),
    ("optimize", ("optimize",)),
    ("pipeline", ("pipeline",)),
    ("on the pipeline", ("analysis", "studies", "chat")),
    # the web app: the public API behind a page
    ("ui", ("ui",)),
    ("commands", ("commands", "cli", "__init__")),
)


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_nodes(tree: ast.Module):
    """The nodes Python runs when it imports the module: not those inside functions, nor under
    ``if TYPE_CHECKING:`` (its ``else`` runs)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def module_level_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports when it is imported: its import statements outside
    functions and ``if TYPE_CHECKING:``, plus the parent packages Python imports first."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in import_time_nodes(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                targets.add(full if full in known else origin)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    targets = {t for t in targets if t in known}
    for target in list(targets):
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in known and not name.startswith(parent + ".") and parent != name:
                targets.add(parent)
    targets.discard(name)
    return targets


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement inside a function of `path` (a relative
    import keeps its dots)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    found.update((sub.lineno, alias.name) for alias in sub.names)
                elif isinstance(sub, ast.ImportFrom):
                    found.add((sub.lineno, "." * sub.level + (sub.module or "")))
    return sorted(found)


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the dotted module `name` (longest entry wins), None when no entry names it."""
    rel = name.removeprefix("obliteratus.") if name != "obliteratus" else "__init__"
    best = None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (rel == entry or rel.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return None if best is None else best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_module_level_imports_have_no_cycle():
    known = modules()
    graph = {name: module_level_imports(name, path, known) for name, path in known.items()}
    assert "obliteratus.errors" in graph["obliteratus.save"], "the graph reader misses a top-level import"
    assert {"obliteratus.select", "obliteratus.select.knee"} <= graph["obliteratus.directions.driver"]
    assert cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The package's __init__.py imports the pipeline, and with it nearly every module: a submodule is imported
# under an empty stand-in for the package, so that it gets only what it imports itself.
# what the zygote imports before forking: the heavy third-party libraries, none of the package
THIRD_PARTY = ("torch", "numpy", "transformers", "safetensors", "accelerate", "pydantic", "typer", "rich")
BARE_PACKAGE = ("import sys, types; package = types.ModuleType('obliteratus'); package.__path__ = [{path!r}]; "
                "sys.modules['obliteratus'] = package; import {name}")


def test_every_module_imports_alone_in_a_fresh_interpreter(tmp_path):
    """Each module in a process of its own that has imported no module of the package: forked from a
    zygote that imported only the third-party libraries (tests/support/zygote.py), which is a fresh
    interpreter as far as the package's own imports go, without paying torch's import each time."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SRC)}
    zygotes: Queue = Queue()
    for _ in range(2):
        zygotes.put(Zygote(env, THIRD_PARTY))

    def load(name: str) -> tuple[str, int, str]:
        code = f"import {name}" if name == "obliteratus" else BARE_PACKAGE.format(path=str(PACKAGE), name=name)
        zygote = zygotes.get()
        try:
            done, _, err = zygote.exec(code, tmp_path, env, 300)
        finally:
            zygotes.put(zygote)
        return name, done, err[-2000:]

    try:
        planted = load("obliteratus.no_such_module")  # a failing import is seen as one
        assert planted[1] != 0 and "No module named" in planted[2], planted
        with ThreadPoolExecutor(max_workers=2) as pool:
            failed = [(n, err) for n, code, err in pool.map(load, sorted(modules())) if code != 0]
    finally:
        while not zygotes.empty():
            zygotes.get().close()
    assert not failed, failed


def test_no_import_inside_a_function_but_of_an_optional_extra():
    """Imports are at module level (where a cycle or an upward import shows), except those of the
    optional extras, which a function imports when it needs one."""
    inside = [f"{path.relative_to(SRC.parent)}:{line} imports {module} inside a function"
              for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "__init__.py"
              for line, module in function_level_imports(path)
              if module.startswith(".") or module.split(".")[0] not in OPTIONAL]
    assert not inside, "\n".join(inside)
    # The one exception: the package's PEP 562 __getattr__ loads the top-level API (obliterate, Run,
    # RunRecord) on first use, so that importing one stage does not load the whole pipeline.
    tree = ast.parse((PACKAGE / "__init__.py").read_text("utf-8"))
    functions = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert functions == ["__getattr__"], functions


def test_function_level_import_finder_sees_nested_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    import optuna\n\n    def g():\n        from ..pipeline import x\n"
                    "    return g\n\nclass C:\n    def h(self):\n        from torch import nn\n", "utf-8")
    assert function_level_imports(path) == [(4, "optuna"), (7, "..pipeline"), (12, "torch")]


def test_every_module_has_a_layer_and_the_lookup_takes_the_longest_entry():
    unplaced = [name for name in modules() if layer_of(name) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    assert layer_of("obliteratus.directions.svd") < layer_of("obliteratus.select.layers") < layer_of(
        "obliteratus.directions.driver")
    assert layer_of("obliteratus.analysis.pca") < layer_of("obliteratus.analysis") == layer_of("obliteratus.studies")
    assert layer_of("obliteratus") == len(LAYERS) - 1 and layer_of("obliteratusx") is None


def test_module_level_imports_go_down_the_layers():
    known = modules()
    empty = {name for name, path in known.items()  # a package that imports nothing: importing it runs nothing
             if path.name == "__init__.py" and not module_level_imports(name, path, known)}
    upward = []
    for name, path in known.items():
        here = layer_of(name)
        for target in sorted(module_level_imports(name, path, known) - empty):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)
