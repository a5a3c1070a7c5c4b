"""The package's import structure (issue 25): no import cycle among module-level imports, and every
module imports on its own in a fresh interpreter (no module works only because another one was
imported first)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "obliteratus"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def module_level_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports when it is imported: its top-level import statements
    (not those inside functions or ``if TYPE_CHECKING:``), plus the parent packages Python
    imports first."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.parse(path.read_text("utf-8")).body:
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


def test_every_module_imports_alone_in_a_fresh_interpreter():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SRC)}

    def load(name: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env,
                              timeout=300)
        return name, done.returncode, done.stderr[-2000:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(n, err) for n, code, err in pool.map(load, sorted(modules())) if code != 0]
    assert not failed, failed
