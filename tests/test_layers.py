"""The library's floors: imports go downward only, with no cycle, and Prefect stays in ``pipeline/flows/``.

Each module of ``pipeline/`` has a floor (:data:`FLOORS`, lowest first: a top-level module or a wing folder). A
module may import modules of its own floor or of a lower one, never of a higher one (``curvature/`` importing
``flows/`` fails here); and the import graph of the package's files has no cycle, lazy imports inside functions
included (they run too). The graph is read from the source with the same reader as the stage-dependency check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_stage_deps import ROOT, _module_file, imported_modules

# Lowest first. A name is a top-level module (``pipeline/<name>.py``) or a wing (``pipeline/<name>/``).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "io"),
    ("config",),
    ("repro", "provenance", "tables", "metrics", "data", "docs", "live"),
    ("curvature",),
    ("training",),
    ("landscape",),
    ("sweep", "report", "api"),
    ("flows",),
    ("stage",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(FLOORS) for name in names}


def place(path: Path) -> str:
    """The floor name of a package file: its wing folder, or its top-level module name."""
    parts = path.relative_to(ROOT / "pipeline").parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def package_files() -> list[Path]:
    return sorted((ROOT / "pipeline").rglob("*.py"))


def import_graph(files: list[Path]) -> dict[Path, set[Path]]:
    """file -> the package files it imports (package ``__init__`` files above a module left out: they hold only
    docstrings, and counting them would make every wing import its own face)."""
    graph = {}
    for path in files:
        targets = {_module_file(m) for m in imported_modules(path)}
        graph[path] = {t for t in targets if t is not None and t != path and t.name != "__init__.py"}
    return graph


def upward_imports(graph: dict[Path, set[Path]]) -> list[str]:
    """``a -> b`` for every import from a lower floor to a higher one."""
    bad = []
    for source, targets in graph.items():
        for target in targets:
            if RANK[place(target)] > RANK[place(source)]:
                bad.append(f"{source.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    return sorted(bad)


def find_cycle(graph: dict) -> list | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ()), key=str):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph, key=str):
        if node not in state and (found := visit(node)):
            return found
    return None


GRAPH = import_graph(package_files())


def test_every_package_file_has_a_floor():
    assert not [str(p.relative_to(ROOT)) for p in GRAPH if place(p) not in RANK], "add it to FLOORS"


def test_imports_go_downward_only():
    bad = upward_imports(GRAPH)
    assert not bad, "imports from a lower floor to a higher one:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(str(p.relative_to(ROOT)) for p in cycle)


def test_prefect_is_imported_only_in_flows():
    outside = []
    for path in package_files():
        if place(path) == "flows":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "prefect" or n.startswith(("prefect.", "prefect_")) for n in names):
                outside.append(str(path.relative_to(ROOT)))
    assert not outside, f"Prefect imported outside pipeline/flows/: {sorted(set(outside))}"


def test_the_checks_fail_on_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None
    curvature, flows = ROOT / "pipeline/curvature/eigen.py", ROOT / "pipeline/flows/runtime.py"
    assert upward_imports({curvature: {flows}}) == ["pipeline/curvature/eigen.py -> pipeline/flows/runtime.py"]
    assert upward_imports({flows: {curvature}}) == []


@pytest.mark.parametrize("wing", ["training", "curvature", "landscape", "sweep", "report", "flows"])
def test_every_wing_says_what_it_holds(wing):
    init = ROOT / "pipeline" / wing / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc) > 40, f"{init.relative_to(ROOT)}: a docstring saying what the wing holds"
