"""The project's imports go one way: no cycle, no import hidden inside a function, config.py a leaf.

A cycle is what forces a function-level import (the import runs late, when the other module is
loaded), so both are looked for by reading the source with `ast`, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("classifier", "configs")
SCRIPTS = ("train.py", "evaluate.py", "export.py", "predict.py")


def project_sources() -> dict[str, Path]:
    """Module name -> file, for every module of the package, the presets and the top-level scripts."""
    sources = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            sources[name] = path
    for script in SCRIPTS:
        sources[Path(script).stem] = ROOT / script
    return sources


def imported_project_modules(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The project modules an import statement loads: `from classifier import data` loads
    classifier.data, `from classifier.data import Splits` loads classifier.data."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return {name for name in names if name in modules}


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> every project module it imports, wherever the import is; the imports found inside
    functions, as file:line)."""
    sources = project_sources()
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    nested: list[str] = []
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= imported_project_modules(node, modules) - {name}
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and imported_project_modules(node, modules):
                    nested.append(f"{path.relative_to(ROOT)}:{node.lineno} in {func.name}()")
    return graph, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Depth-first search with the path on a stack."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None


def test_no_project_import_inside_a_function():
    _, nested = import_graph()
    assert nested == []


def test_config_is_a_leaf():
    graph, _ = import_graph()
    assert graph["classifier.config"] == set()


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a made-up graph with a cycle is reported, and its modules named."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_both_import_forms():
    graph, _ = import_graph()
    assert "classifier.checkpoint" in graph["classifier.models"]  # from classifier.checkpoint import ...
    assert "configs" in graph["classifier.cli"]  # from configs import get_preset
