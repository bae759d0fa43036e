"""Imports between packages point one way: no circle among the rooms of ``gateway`` or the repository's packages, and
the worker package never reaches ``gateway`` (it is shipped to nodes that do not have the server installed).

The imports are read from the source with ``ast``, every one of them: at the top of a module, inside functions
(a deferred import is still an arrow) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = "gateway"
WORKER = "compute_functions"

# (importing unit, imported unit) -> where: "path:line" of one import that makes the arrow.
Arrows = dict[tuple[str, str], str]


def _top_level_packages() -> list[str]:
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))


def _unit(module: str) -> str:
    """The room a module lives in: a package or module right under ``gateway``, else its top-level package."""
    parts = module.split(".")
    if parts[0] == SERVER and len(parts) > 1:
        return f"{SERVER}.{parts[1]}"
    return parts[0]


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every module ``module``'s source imports, with the line: ``from a import b`` counts as ``a.b`` when ``b`` is a
    module of its own."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:
                if _is_module(f"{base}.{alias.name}"):
                    yield f"{base}.{alias.name}", node.lineno


def arrows() -> Arrows:
    """The arrows between rooms, as the repository's packages import each other."""
    packages = set(_top_level_packages())
    found: Arrows = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            is_package = path.name == "__init__.py"
            module = ".".join(relative.parent.parts if is_package else relative.with_suffix("").parts)
            source = _unit(module)
            for imported, line in _imported(ast.parse(path.read_text(), str(path)), module, is_package):
                if imported.split(".")[0] not in packages:
                    continue
                target = _unit(imported)
                if target != source:
                    found.setdefault((source, target), f"{relative}:{line}")
    return found


def circles(edges: Arrows) -> list[list[str]]:
    """The strongly connected groups of more than one room (Tarjan's algorithm), each sorted."""
    graph: dict[str, list[str]] = {}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _explain(group: list[str], edges: Arrows) -> str:
    inside = [f"  {s} -> {t} ({where})" for (s, t), where in sorted(edges.items()) if s in group and t in group]
    return " <-> ".join(group) + ":\n" + "\n".join(inside)


def test_no_circle_between_rooms() -> None:
    edges = arrows()
    found = circles(edges)
    assert not found, "imports go round in a circle:\n" + "\n".join(_explain(group, edges) for group in found)


def test_the_worker_package_never_reaches_the_server() -> None:
    edges = arrows()
    reached, todo = {WORKER}, [WORKER]
    while todo:
        source = todo.pop()
        for (start, target), where in edges.items():
            if start == source and target not in reached:
                assert _unit(target).split(".")[0] != SERVER, f"{WORKER} reaches {target} through {where}"
                reached.add(target)
                todo.append(target)


def test_the_arrows_are_read_from_every_kind_of_import() -> None:
    edges = arrows()
    # At the top of a module, from a package's __init__, and the deferred one inside the configuration's validator.
    assert ("gateway.dispatch", "gateway.config") in edges
    assert ("gateway.limits", "gateway.config") in edges
    assert ("gateway.config", "gateway.parsl_providers") in edges
    assert ("gateway.dispatch", "gateway.parsl_providers") in edges
    assert ("gateway.config", WORKER) in edges
    assert circles({("a", "b"): "", ("b", "c"): "", ("c", "a"): "", ("c", "d"): ""}) == [["a", "b", "c"]]
