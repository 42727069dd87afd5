"""The source's shape: no module imports one that imports it back (type-only imports
included, since a reader follows them too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "model_gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "model_gateway"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that ``path`` imports, relatively (``from .x import y``)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if package == ["model_gateway"]:
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        target = ".".join([*base, *([node.module] if node.module else [])]) or "model_gateway"
        named = {f"{target}.{alias.name}" if target != "model_gateway" else alias.name
                 for alias in node.names} & modules  # fmt: skip
        found |= named or ({target} & modules)
    return found - {name}


def test_no_import_cycles() -> None:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    assert "admin" in graph["app"] and "store.base" in graph["store.sqlite"]  # it sees imports

    def reaches(start: str, goal: str) -> list[str] | None:
        seen, todo = {start}, [[start]]
        while todo:
            trail = todo.pop()
            for nxt in sorted(graph[trail[-1]]):
                if nxt == goal:
                    return [*trail, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append([*trail, nxt])
        return None

    loops = [loop for name in sorted(graph) if (loop := reaches(name, name))]
    assert not loops, " ; ".join(" -> ".join(loop) for loop in loops)


def test_the_server_edge_meets_the_gateway_only_at_its_interface() -> None:
    """serving/ is built on uvicorn's internals; the rest of the gateway sees it only through
    its interface (the package, its signals and limits), and it sees nothing of the gateway
    but the configuration and the errors it answers with."""
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    interface = {"serving", "serving.signals", "serving.limits"}
    for path in paths:
        name = module_name(path)
        imported = imports_of(path, modules)
        if name.startswith("serving"):
            outside = {m for m in imported if not m.startswith("serving")}
            assert outside <= {"config", "errors"}, (name, outside)
        else:
            edge = {m for m in imported if m.startswith("serving")}
            assert edge <= interface, (name, edge)
