"""The packages' imports flow one way: no cycle between modules, neutral packages stay neutral, and
serving's micro-batcher does not pull in the LLM engine.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: deferring an import
hides a cycle from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
    "packages"]
NEUTRAL = ("batching", "hashing")  # imported by several packages; import none of ours


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (generated stubs left out)."""
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    mods = project_modules()

    def resolve(name: str) -> str | None:  # a module, else its nearest enclosing package
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: list[str | None] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets += [resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                            for a in node.names]
        graph[mod] = {t for t in targets if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component larger than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules, recursion is fine
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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for comp in components:  # shortest way from the first module back to itself, inside the component
        start = min(comp)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                path = [start]
                while v != start:
                    path.insert(1, v)
                    v = came_from[v]
                found.append(path + [start])
                break
            for w in sorted(graph[v] & comp):
                if w not in came_from and w != start:
                    came_from[w] = v
                    queue.append(w)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert len(graph) > 100
    assert "embedding_store.table" in graph["embedding_store"]  # the package imports its parts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_neutral_packages_import_none_of_the_project():
    graph = import_graph()
    outside = {mod: sorted(t for t in deps if t.split(".")[0] != mod.split(".")[0])
               for mod, deps in graph.items() if mod.split(".")[0] in NEUTRAL}
    assert {m: d for m, d in outside.items() if d} == {}


def test_importing_the_micro_batcher_loads_no_llm_engine_module():
    code = ("import sys, serving.microbatch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llm_engine'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
