"""Layers import only downward: the import graph of src/codistill, read from the source with ast
(every import, late ones inside functions too), has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "codistill"

# Loops owned by work in progress elsewhere, each named edge by edge; remove when it is broken.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this package it imports}. `from pkg import name` counts as importing the
    submodule pkg.name when there is one; a module's own parent packages are not counted (Python
    imports them before any submodule, whoever imports it)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                found = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            targets |= {t for t in found if t in modules and t != name and not name.startswith(t + ".")}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_finds_a_loop():
    graph = import_graph()
    assert "codistill.config" in graph["codistill.tasks"] and "codistill.lm" in graph["codistill.tasks"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_imports_only_downward():
    graph = {m: {t for t in targets if (m, t) not in ALLOWED} for m, targets in import_graph().items()}
    loops = cycles(graph)
    assert not loops, "import loops: " + "; ".join(
        " <-> ".join(loop) + " (" + ", ".join(f"{a} -> {b}" for a in loop for b in sorted(graph[a]) if b in loop) + ")"
        for loop in loops)
