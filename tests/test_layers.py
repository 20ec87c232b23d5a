"""The package's modules import each other without circles (read from the source, so an
import inside a function counts as much as one at the top)."""

from __future__ import annotations

from support.imports import NAME
from support.imports import graph as import_graph


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
    graph = import_graph()
    cycles = [cycle for name in graph if (cycle := _cycle_through(graph, name))]
    assert cycles == []


def test_cli_imports_doctor_and_demo_and_never_the_reverse() -> None:
    graph = import_graph()
    assert {f"{NAME}._doctor", f"{NAME}._demo"} <= graph[f"{NAME}.cli"]
    importers = {name for name, imported in graph.items() if f"{NAME}.cli" in imported}
    assert importers == {f"{NAME}.__main__"}


def test_the_cycle_finder_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert _cycle_through(graph, "d") is None
