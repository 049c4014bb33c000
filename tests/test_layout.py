"""Layout v2's limits, checked on the source: small modules, and no import cycle in the core."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "src" / "cascade_bus"
MAX_LINES = 450


def sources() -> list[Path]:
    roots = [ROOT / "src", *sorted((ROOT / "adapters").glob("*/src"))]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def test_no_module_is_over_the_limit() -> None:
    files = sources()
    assert len(files) > 50  # the walk found the tree
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The core modules ``path`` imports when it is imported (module level, not TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target in modules:
                    found.add(target)
                for alias in node.names:  # `from . import _stub` imports a module
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    # Every module imports its packages first; those edges are not cycles of the layout.
    parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return found - parents - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_the_core_has_no_import_cycle() -> None:
    paths = sorted(CORE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): runtime_imports(p, modules) for p in paths}
    assert graph["cascade_bus._bus_publish"] >= {"cascade_bus._envelope", "cascade_bus._stub"}
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
