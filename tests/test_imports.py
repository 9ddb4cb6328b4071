"""Imports flow one way: no circle among the modules, the core never imports the adapters or the benchmark,
and the adapters never import the benchmark.

The graph comes from the source (``ast``), so an import inside a function counts as much as one at the
top of a file; imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the dotted name it is installed under (pyproject maps adapters/ to selproj_plugin.adapters)
PACKAGES = {"selproj_plugin": "selproj_plugin", "adapters": "selproj_plugin.adapters", "benchmark": "benchmark"}
# bottom to top: a module imports from its own layer or the ones below it
LAYERS = ("selproj_plugin", "selproj_plugin.adapters", "benchmark")


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    modules = {}
    for folder, dotted in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([dotted, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node outside ``if TYPE_CHECKING:`` blocks, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports that module
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
        # the longest known module each target names (``import a.b.c`` of a function name counts as a.b)
        known = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                known.add(target)
        graph[name] = known
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def layer(name: str) -> int:
    """Index in LAYERS of the innermost layer holding ``name`` (-1 outside them all)."""
    inside = [i for i, package in enumerate(LAYERS) if name == package or name.startswith(package + ".")]
    return max(inside, default=-1)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'lower.module -> upper.module' for every import into a higher layer."""
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if layer(dst) > layer(src))


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files(ROOT, PACKAGES))


def test_the_walk_sees_every_package(graph):
    assert {"selproj_plugin.engine", "selproj_plugin.strategies.base", "selproj_plugin.adapters.trak", "benchmark.retrieval"} <= set(graph)
    assert "selproj_plugin.capture" in graph["selproj_plugin.engine"]
    assert "selproj_plugin.strategies.base" in graph["selproj_plugin.adapters._common"]
    assert [layer(n) for n in ("selproj_plugin.table", "selproj_plugin.adapters.trak", "benchmark.docs")] == [0, 1, 2]


def test_no_import_circle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_flow_from_the_benchmark_to_the_adapters_to_the_core(graph):
    assert upward_imports(graph) == []


# ---- the checker itself can fail -------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return import_graph(module_files(tmp_path, {"selproj_plugin": "selproj_plugin", "benchmark": "benchmark"}))


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    graph = _package(
        tmp_path,
        {
            "selproj_plugin/__init__.py": "",
            "selproj_plugin/a.py": "from selproj_plugin.b import f\n",
            "selproj_plugin/b.py": "def f():\n    from . import c\n",
            "selproj_plugin/c.py": "import selproj_plugin.a\n",
            "selproj_plugin/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from selproj_plugin import a\n",
        },
    )
    assert graph["selproj_plugin.b"] == {"selproj_plugin.c"}
    assert graph["selproj_plugin.d"] == set()  # type-only imports never run
    assert set(find_cycle(graph)) == {"selproj_plugin.a", "selproj_plugin.b", "selproj_plugin.c"}


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    graph = _package(
        tmp_path,
        {
            "selproj_plugin/__init__.py": "",
            "selproj_plugin/kit.py": "def check():\n    from benchmark.tool import run\n",
            "benchmark/__init__.py": "",
            "benchmark/tool.py": "from selproj_plugin import kit\n",
        },
    )
    assert upward_imports(graph) == ["selproj_plugin.kit -> benchmark.tool"]


def test_test_modules_import_helpers_never_each_other():
    """Fixtures come from conftest.py, helpers from tests/helpers.py, tiny.py and attribution.py, spelt one way."""
    helpers = {p.stem for p in (ROOT / "tests").glob("*.py") if not p.stem.startswith("test_")} - {"conftest"}
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                top, _, rest = name.partition(".")
                if top in helpers or top.startswith("test_") or top == "conftest":
                    wrong.append(f"{path.name}: import {name} (write `from tests... import`)")
                elif top == "tests" and (rest.startswith("test_") or rest.startswith("conftest")):
                    wrong.append(f"{path.name}: imports the test module {name}")
    assert wrong == []
