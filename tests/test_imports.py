"""The import graph of worker/, read from the source (AST): no cycle, and every import points down.

The path of a task reads downhill: HTTP -> modes -> tasks -> slots/runner -> functions/params.
Each module has a floor below; a module may import only modules on lower floors. A new module
must be given its floor here, which is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "worker"

FLOORS: dict[str, int] = {
    # The ground: no imports from worker/.
    "errors": 1,
    "jsoncodec": 1,
    "context": 1,
    "health": 1,
    "outcomes": 1,
    "params": 1,
    "targets": 1,
    "giveway": 1,
    "outbox": 1,
    "config": 2,
    "functions": 2,
    "parts": 3,
    "__init__": 3,
    "auth": 3,
    "responses": 3,
    "slots": 4,
    "journal": 4,  # a Part: above parts, below the webhook mode that will use it
    "logs": 4,
    "runner": 4,
    "server": 4,
    "tasks": 5,
    "maintenance": 5,
    "notify": 5,
    "lb_protocol": 5,
    "logtail": 5,
    "examples": 5,
    # Validation and the modes, above the tasks they make and run.
    "envelope": 6,
    "sync": 6,
    "lb_server": 6,
    "lb_client": 6,
    "services": 6,
    "metrics": 6,
    "streaming": 7,
    "webhooks": 7,
    "openapi": 7,
    "http": 8,
    "lifecycle": 9,
    "ctl": 9,  # the operator client: config and the HTTP API from outside, never the daemon
    "cli": 10,
    "__main__": 11,
}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of worker/ that `path` imports (`from worker import x` names module x when
    there is one, else the package's __init__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "worker":
                found |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif node.module.startswith("worker."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("worker.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    return {path.stem: imports_of(path, modules) for path in PACKAGE.glob("*.py")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk, each as the path that closes it."""
    found: list[list[str]] = []
    state: dict[str, str] = {}  # "walking" while on the current path, then "done"

    def walk(node: str, path: list[str]) -> None:
        state[node] = "walking"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "walking":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"c"}}) == [["a", "b", "a"], ["c", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_worker() -> None:
    assert cycles(graph()) == []


def test_every_module_has_a_floor() -> None:
    assert set(graph()) == set(FLOORS)


def test_every_import_points_down() -> None:
    upward = [
        f"{module} (floor {FLOORS[module]}) imports {imported} (floor {FLOORS[imported]})"
        for module, imported_modules in sorted(graph().items())
        for imported in sorted(imported_modules)
        if FLOORS[imported] >= FLOORS[module]
    ]
    assert upward == []


def test_the_path_of_a_task_reads_downhill() -> None:
    path = ["http", "sync", "tasks", "runner", "functions", "params"]
    assert [FLOORS[m] for m in path] == sorted((FLOORS[m] for m in path), reverse=True)
    edges = graph()
    assert {"sync", "streaming", "webhooks"} & edges["http"] == set()  # wired by lifecycle
    assert "tasks" in edges["sync"] and "runner" in edges["tasks"]
    assert "functions" in edges["runner"] and "params" in edges["functions"]
