"""The package's shape: imports in one direction (no circles in ``harness/``), and the style ruff enforces
(configured in pyproject.toml)."""

import ast
import pathlib
import subprocess

import pytest
from ruff.__main__ import find_ruff_bin

from .helpers import REPO

HARNESS = REPO / "harness"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``harness`` module -> the ``harness`` modules it imports (at any depth of its code: a lazy import
    inside a function closes a circle as surely as one at the top)."""
    modules = {module_name(p): p for p in HARNESS.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:  # `from . import loop` imports the module harness.training.loop
                    graph[name].add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_harness():
    graph = import_graph()
    assert "harness.training.loop" in graph["harness.training.ray_train"]  # the graph sees relative imports
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# What each part of ``harness`` may import (docs/architecture.md): every layer only those below it. Leaf
# modules (errors, precision, extras, cli, storage, console) are open to all; the command-line modules
# (train, sweep, report, evaluate, aggregate, studies_doc, bench) sit on top and may import anything.
LEAVES = {"errors", "precision", "extras", "cli", "storage", "console", "plugins", "metrics"}
ALLOWED = {
    "moe": set(),
    "models": {"moe"},
    "metrics": set(),
    "config": {"moe", "models"},
    "data": {"config"},
    "tasks": {"config", "data", "models", "moe"},
    "training": {"config", "models", "moe", "tasks"},
    "analysis": {"config"},
    "tuning": {"analysis", "config", "training"},
}


def package_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``harness`` part -> the other parts it imports (a part: ``harness.<part>`` module or package)."""
    part = lambda module: module.split(".")[1] if "." in module else module  # noqa: E731
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if part(module) != part(target):
                edges.setdefault(part(module), set()).add(part(target))
    return edges


def test_each_layer_imports_only_the_layers_below_it():
    edges = package_imports(import_graph())
    assert "tasks" in edges["training"]  # the graph sees the packages
    wrong = {pkg: sorted(t - ALLOWED[pkg] - LEAVES) for pkg, t in edges.items() if pkg in ALLOWED}
    assert {pkg: t for pkg, t in wrong.items() if t} == {}


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_passes_on_the_repository(command):
    """``ruff format --check`` and ``ruff check``: CI enforces the formatter and the linter."""
    ruff = find_ruff_bin()  # the binary itself: a second Python would cost a marked (slow) test
    done = subprocess.run([ruff, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
