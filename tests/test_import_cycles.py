"""No import cycles among the project's own modules (cluster, coordinator, node_agent and
the client package, studiofleet_client).

Imports are read from source with `ast`, so every import counts: module level, inside a
function (a lazy import hides a cycle only until it runs) and under `if TYPE_CHECKING:`
(a type-only import still ties the two modules into one unit a reader must hold at once).
Run this file with python to print the cycles it finds.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder (relative to the repository) -> the top-level packages in it.
PACKAGES = {".": ("cluster", "coordinator", "node_agent"), "client": ("studiofleet_client",)}
# Generated protobuf code: not ours to shape.
SKIP = ("cluster/api/studiofleet/", "client/studiofleet_client/api/studiofleet/")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file in PACKAGES."""
    modules: dict[str, Path] = {}
    for folder, packages in PACKAGES.items():
        base = root / folder
        for package in packages:
            for path in sorted((base / package).rglob("*.py")) if (base / package).is_dir() else ():
                if any(path.relative_to(root).as_posix().startswith(skip) for skip in SKIP):
                    continue
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b.c`: the longest prefix that is ours
                parts = alias.name.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts:
                    found.add(".".join(parts))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif target in modules:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest path a -> ... -> a inside the component, to name in a failure."""
    members = set(component)
    best: list[str] = []
    for start in component:
        parents: dict[str, str] = {start: start}
        frontier = [start]
        while frontier:
            closing = next((v for v in frontier if start in graph[v]), None)
            if closing is not None:
                path = [closing]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                path = path[::-1] + [start]
                if not best or len(path) < len(best):
                    best = path
                break
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
    return best


def describe(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{' -> '.join(shortest_cycle(graph, component))}  (component: {', '.join(component)})"
        for component in cycles(graph)
    ]


def test_finds_a_cycle_in_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_reads_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "node_agent"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "agent.py").write_text("from node_agent import service\n")
    (pkg / "service.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from node_agent.agent import Agent\n"
        "def f():\n    from . import agent\n"
    )
    (pkg / "main.py").write_text("import node_agent.agent as a\n")
    for other in ("cluster", "coordinator"):
        (tmp_path / other).mkdir()
    graph = import_graph(tmp_path)
    assert graph["node_agent.agent"] == {"node_agent.service"}
    assert graph["node_agent.service"] == {"node_agent.agent"}
    assert graph["node_agent.main"] == {"node_agent.agent"}
    assert cycles(graph) == [["node_agent.agent", "node_agent.service"]]


def test_no_import_cycles_among_project_modules():
    graph = import_graph()
    assert len(graph) > 50, "the checker found too few modules; is ROOT right?"
    found = describe(graph)
    assert not found, (
        "import cycles (imports read with ast, lazy and TYPE_CHECKING ones included); cut each "
        "by moving what both sides need into a module of its own, or by passing a collaborator "
        "or callback instead of importing its owner:\n" + "\n".join(found)
    )


# What each layer may not import (DESIGN "Layout"): cluster/ knows no role, and the client
# package imports nothing of the project (an app installs it alone).
FORBIDDEN = {
    "cluster": ("coordinator", "node_agent"),
    "studiofleet_client": ("cluster", "coordinator", "node_agent"),
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imported in sorted(graph.items()):
        banned = FORBIDDEN.get(module.split(".")[0], ())
        out += [
            f"{module} imports {target}"
            for target in sorted(imported)
            if target.split(".")[0] in banned
        ]
    return out


def test_layers_import_only_downwards():
    assert layer_violations({"cluster.x": {"coordinator.y", "cluster.z"}}) == [
        "cluster.x imports coordinator.y"
    ]
    found = layer_violations(import_graph())
    assert not found, (
        "cluster/ is shared by every role and the client package is installed alone: move "
        "what both need down into cluster/ (or the client):\n" + "\n".join(found)
    )


if __name__ == "__main__":
    for line in describe(import_graph()):
        print(line)
