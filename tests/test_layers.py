"""The package's modules import each other without circles (read from the source, so an
import inside a function counts as much as one at the top)."""

from __future__ import annotations

import ast
from pathlib import Path

import agw_persist_cache

PACKAGE = Path(agw_persist_cache.__file__).parent
NAME = "agw_persist_cache"


def _module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, with ``from . import x`` resolved to ``x``.

    The parent packages that Python initialises on the way to a submodule do not count: they
    are not a dependency the importing module chose.
    """
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from pkg import mod`` needs mod, not pkg's names
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != here}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in files}
    return {_module_name(path): _imports(path, modules) for path in files}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    graph = _graph()
    cycles = [cycle for name in graph if (cycle := _cycle_through(graph, name))]
    assert cycles == []


def test_cli_imports_doctor_and_demo_and_never_the_reverse() -> None:
    graph = _graph()
    assert {f"{NAME}._doctor", f"{NAME}._demo"} <= graph[f"{NAME}.cli"]
    importers = {name for name, imported in graph.items() if f"{NAME}.cli" in imported}
    assert importers == {f"{NAME}.__main__"}


def test_the_cycle_finder_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert _cycle_through(graph, "d") is None
