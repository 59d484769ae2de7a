"""The package's imports point one way: no module imports itself back through others, and
the lower layers never import the upper ones (DEVELOPERS: xsave <- backends <- scenarios
<- cases <- plugin/cli; nothing outside the pytest glue, apx_tests.pytest, imports
pytest or the glue).

Read from the source with ast, lazy imports inside functions included: a circle hidden in
a function body is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apx_tests"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(source: str, name: str, is_package: bool, filename: str = "<planted>") -> set[str]:
    """Every module name imported anywhere in `source` (the module `name`), made absolute;
    `from X import a` counts X and X.a (a may be a module itself)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            # `from . import x` / `from .pkg import mod`: x may be a module itself
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def _imports(path: Path) -> set[str]:
    """apx_tests modules imported anywhere in `path` (absolute names)."""
    names = _imported(path.read_text(), _module_name(path), path.name == "__init__.py", str(path))
    return {n for n in names if n.startswith("apx_tests")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # an import of a package counts as an import of its __init__, not of every submodule
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_package_edge(a: str, b: str) -> bool:
    """A package's __init__ re-exports its submodules, which import siblings through the
    package: that is the package's own wiring, not a circle between modules."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_circle_between_modules():
    graph = {a: {b for b in deps if not _is_package_edge(a, b)} for a, deps in _graph().items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_xsave_imports_nothing_above_it():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("apx_tests.xsave"):
            assert all(d.startswith("apx_tests.xsave") for d in deps), (name, deps)


# The pytest glue: the plugin package.  Everything else runs without pytest (the remote
# agent, avocado, the CLI), so it neither imports pytest nor the glue.
GLUE = "apx_tests.pytest"
# Allowed to import both, with the reason:
PYTEST_ALLOWED = {
    # the shipped apx-marked suite: pytest test modules themselves, run by the plugin (they
    # use apx_tests.pytest.options.apx_skip_or_fail)
    "apx_tests.suite": "the shipped pytest suite",
}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _pytest_offenders(modules: dict[str, tuple[str, bool]]) -> list[tuple[str, str]]:
    """(module, what it imports) for each module outside the glue (and PYTEST_ALLOWED) that
    imports pytest, _pytest or the glue; `modules` maps a name to (source, is_package)."""
    offenders = []
    for name, (source, is_package) in sorted(modules.items()):
        if _in(name, GLUE) or any(_in(name, allowed) for allowed in PYTEST_ALLOWED):
            continue
        for imported in sorted(_imported(source, name, is_package)):
            if _in(imported, "pytest") or _in(imported, "_pytest") or _in(imported, GLUE):
                offenders.append((name, imported))
    return offenders


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in PACKAGE.rglob("*.py")}


def test_pytest_stays_in_the_pytest_glue():
    """Only apx_tests.pytest (and the shipped suite) import pytest or apx_tests.pytest:
    the agent and avocado run without pytest, and nothing below the glue depends on it."""
    modules = _package_sources()
    assert any(_in(name, GLUE) for name in modules), "the glue package is missing"
    assert not _pytest_offenders(modules)


def test_the_pytest_check_catches_planted_imports():
    clean = {"apx_tests.cases": ("import os\nfrom .xsave import layout\n", False),
             "apx_tests.pytest.plugin": ("import pytest\nfrom .options import x\n", False),
             "apx_tests.pytest": ("", True),
             "apx_tests.suite.test_x": ("import pytest\nfrom apx_tests.pytest.options import y\n", False)}
    assert _pytest_offenders(clean) == []
    planted = {
        "apx_tests.a": ("import pytest\n", False),
        "apx_tests.b": ("def f():\n    from _pytest.config import Config\n", False),
        "apx_tests.remote.c": ("from ..pytest import options\n", False),
        "apx_tests.d": ("from apx_tests import pytest as glue\n", False),
        "apx_tests.e": ("import apx_tests.pytest.plugin\n", False),
        "apx_tests.kut": ("from ..pytest.remote import RemoteCaseItem\n", True),
    }
    found = {name for name, _ in _pytest_offenders({**clean, **planted})}
    assert found == set(planted)
    # a name that merely starts with "pytest" is not pytest
    assert _pytest_offenders({"apx_tests.f": ("import pytest_xdist\nimport apx_tests.pytestish\n", False)}) == []
