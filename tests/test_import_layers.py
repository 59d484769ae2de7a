"""The package's imports point one way: no module imports itself back through others, and
the lower layers never import the upper ones (DEVELOPERS: xsave <- backends <- scenarios
<- cases <- plugin/cli; nothing below the pytest glue imports pytest).

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


def _imports(path: Path) -> set[str]:
    """apx_tests modules imported anywhere in `path` (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("apx_tests")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("apx_tests"):
                out.add(target)
                # `from . import x` / `from .pkg import mod`: x may be a module itself
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


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


def test_pytest_stays_in_the_pytest_glue():
    """Only the pytest glue and the shipped suite import pytest: the agent and avocado run
    without it."""
    glue = {"apx_tests.plugin", "apx_tests.report_pytest", "apx_tests.faults_pytest",
            "apx_tests.remote.pytest_remote"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name in glue or name.startswith(("apx_tests.suite", "apx_tests.pytest")) or "pytest" in path.stem:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "pytest" or n.startswith(("pytest.", "_pytest")) for n in names):
                offenders.append(name)
    assert not offenders, offenders
