"""The `apx` avocado resolver: `avocado run apx:` / `apx:kvm-ymm-*,kvm-apx-export`.

A reference `apx:` (every case) or `apx:PATTERN[,PATTERN...]` (shell-style patterns over
case ids such as `kvm-ymm-import`) resolves into one avocado-instrumented runnable per
case, `<scenarios.py>:ApxScenario.<case id>`, tagged `apx`, `backend:kvm`, `bank:<bank>`
and `scenario:<name>` (so `-t bank:ymm` filters). The path of scenarios.py itself is
accepted as a reference too and means every case.
"""

from __future__ import annotations

import fnmatch
import os

try:
    from avocado.core.extension_manager import PluginPriority
    from avocado.core.nrunner.runnable import Runnable
    from avocado.core.plugin_interfaces import Resolver
    from avocado.core.resolver import ReferenceResolution, ReferenceResolutionResult
except Exception as exc:  # noqa: BLE001
    if __name__ != "__main__":
        raise  # avocado (or a test) importing this module: its own error handling applies
    # `python -m apx_tests.avocado_plugin.resolver` is a command: one line, no traceback.
    raise SystemExit(" ".join(f"apx_tests: error: avocado cannot be imported: {type(exc).__name__}: "
                              f"{exc} (avocado-framework is a dependency: run ci/bootstrap)".split())) from None

PREFIX = "apx:"
TEST_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios.py")
TEST_CLASS = "ApxScenario"


def _patterns(reference: str) -> list[str] | None:
    if reference == "apx" or reference.startswith(PREFIX):
        rest = reference[len(PREFIX):] if reference.startswith(PREFIX) else ""
        return [p for p in rest.split(",") if p] or ["*"]
    try:
        if os.path.samefile(reference, TEST_FILE):
            return ["*"]
    except OSError:
        pass
    return None


def runnables(patterns: list[str]) -> list[Runnable]:
    from apx_tests.cases import CaseId, case_ids
    out = []
    for case_id in case_ids("kvm"):
        if not any(fnmatch.fnmatchcase(case_id, p) for p in patterns):
            continue
        case = CaseId.parse(case_id)
        tags = {"apx": None, "backend": {case.backend}, "bank": {case.bank}, "scenario": {case.scenario}}
        out.append(Runnable("avocado-instrumented", f"{TEST_FILE}:{TEST_CLASS}.{case_id}", tags=tags))
    return out


class ApxResolver(Resolver):
    name = "apx"
    description = "apx_tests scenario cases: apx:[PATTERN[,PATTERN...]], e.g. apx:kvm-ymm-*"
    priority = PluginPriority.HIGH

    def resolve(self, reference):
        patterns = _patterns(reference)
        if patterns is None:
            return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND,
                                       info="not an apx: reference")
        try:
            found = runnables(patterns)
        except Exception as exc:  # an import problem in the tree: say so in one line
            return ReferenceResolution(reference, ReferenceResolutionResult.ERROR,
                                       info=f"apx_tests cannot list its cases: {type(exc).__name__}: {exc}")
        if not found:
            return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND,
                                       info=f"no apx_tests case matches {', '.join(patterns)}")
        return ReferenceResolution(reference, ReferenceResolutionResult.SUCCESS, found)


def recipe(patterns: list[str]) -> list[dict]:
    """The same runnables as a runnables recipe (JSON), for avocado's own
    `runnables-recipe` resolver: works where this plugin is not registered."""
    return [{"kind": r.kind, "uri": r.uri, "kwargs": {"tags": r.get_serializable_tags()}}
            for r in runnables(patterns)]


if __name__ == "__main__":  # python -m apx_tests.avocado_plugin.resolver [PATTERN...] > apx.json
    import json
    import sys

    print(json.dumps(recipe(sys.argv[1:] or ["*"]), indent=1))
