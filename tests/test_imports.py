"""The import graph, read from the source with ``ast``: no cycles among the package's modules (imports
inside functions count too), the simulator stays clear of gRPC, and bench/ imports nothing from tests/."""
from __future__ import annotations

import ast
import configparser
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> dict[str, Path]:
    """Import package -> its folder, as setup.cfg's ``package_dir`` maps them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.split("=") for line in config["options"]["package_dir"].strip().splitlines()]
    return {package.strip(): ROOT / folder.strip() for package, folder in lines}


def modules(folders: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file of every module directly in each folder (``__init__`` as the package)."""
    found = {}
    for package, folder in folders.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported_names(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The dotted names module ``name`` imports anywhere in its source, relative imports resolved;
    ``from X import Y`` is ``X.Y`` where that is one of the ``known`` modules, else ``X``."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield submodule if submodule in known else source


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Each module -> the modules of ``known`` it imports."""
    return {name: {target for target in imported_names(name, path, known) if target in known and target != name}
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

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
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


PACKAGE = modules(package_folders())
GRAPH = import_graph(PACKAGE)


def test_the_graph_sees_the_package_and_its_imports():
    assert {"gapaware.cli", "gapaware.local_run", "gapaware.server.app", "gapaware.simulator.runner"} <= set(PACKAGE)
    assert "gapaware.local_run" in GRAPH["gapaware.cli"], "an import inside a function is an edge too"
    assert "gapaware.server.policies.asgd" in GRAPH["gapaware.server.policies"], "relative imports are resolved"


def test_no_import_cycle_among_the_package_modules():
    assert cycles(GRAPH) == []


def test_cycles_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_simulator_reaches_neither_the_grpc_app_nor_grpc():
    reached, todo = set(), [name for name in PACKAGE if name.startswith("gapaware.simulator")]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += GRAPH[name]
    assert "gapaware.server.app" not in reached
    third_party = {target.split(".")[0] for name in reached for target in imported_names(name, PACKAGE[name], PACKAGE)}
    assert "grpc" not in third_party


def test_bench_imports_nothing_from_tests():
    for name, path in modules({"bench": ROOT / "bench"}).items():
        roots = {target.split(".")[0] for target in imported_names(name, path, PACKAGE)}
        assert "tests" not in roots, f"{path.relative_to(ROOT)} imports from tests/"
