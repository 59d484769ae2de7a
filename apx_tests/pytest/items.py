"""Scenario cases as pytest items: the ``apx_case`` parametrization (bank x backend x
scenario, a QEMU backend's once per QEMU of the run), deselection of what --apx-backend
left out, and the ``apx_case_runner``/``apx_case`` fixtures that run a case and turn its
result into the test's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ..cases import CaseId, CaseResult, CaseRunner, cases
from .options import (apx_artifacts, apx_backends, apx_cpu_profile, apx_qemu_paths, apx_qemus,
                      apx_skip_or_fail, qemu_backends_chosen)


# --- scenarios: bank x backend x scenario ---------------------------------------------------
# Which cases exist and how one is run and judged live in apx_tests.cases (shared with the
# remote agent and avocado); here they only become pytest items and outcomes.

def scenario_cases(config: pytest.Config) -> list[CaseId]:
    """The selected backends' cases; a QEMU backend's once per QEMU of the run."""
    backends = apx_backends(config)
    tags = tuple(q.tag for q in apx_qemus(config)) if qemu_backends_chosen(config) else ("",)
    return cases(backends, tags)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect tests marked apx_backend(NAME) whose backend --apx-backend left out: they
    are not part of this run (not skips that would look like missing capabilities)."""
    chosen = set(apx_backends(config))
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("apx_backend")
        unselected = marker is not None and marker.args[0] not in chosen
        # The scenario test when no scenario backend was chosen (--apx-backend linux): an
        # empty parametrization, which pytest would report as a skip.
        callspec = getattr(item, "callspec", None)
        empty = "apx_case" in getattr(item, "fixturenames", ()) and (
            callspec is None or "apx_case" not in callspec.params)
        (drop if unselected or empty else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "apx_case" in metafunc.fixturenames:
        chosen = scenario_cases(metafunc.config)
        metafunc.parametrize("apx_case", chosen, ids=[c.id for c in chosen], indirect=True)


@pytest.fixture(scope="session")
def apx_case_runner(pytestconfig: pytest.Config):
    """One CaseRunner per session: each backend is opened once, closed at the end."""
    qemu = apx_qemus(pytestconfig) if qemu_backends_chosen(pytestconfig) else apx_qemu_paths(pytestconfig)
    # A spare boot QEMU (keep_warm) starts on the core the case does not use; under an
    # xdist worker no core is idle, so a spare only adds a QEMU: -n 2 was no faster with
    # them (9.8-9.9 s with, 9.7-10.5 s without; docs/bench.md, Step K fifth round).
    with CaseRunner(qemu=qemu, artifacts=apx_artifacts(pytestconfig),
                    profile=apx_cpu_profile(pytestconfig),
                    keep_warm=not hasattr(pytestconfig, "workerinput")) as runner:
        yield runner


@pytest.hookimpl(tryfirst=True)  # before pytest's own teardown ends the item's fixtures
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A scenario case whose backend the next item does not share (or the last item): the
    backend lets go of what it kept warm for its next case (the spare boot QEMU), so it
    does not outlive the backend's cases for the rest of the session."""
    execution = getattr(item, "funcargs", {}).get("apx_case")
    if not isinstance(execution, _Execution):
        return
    following = getattr(getattr(nextitem, "callspec", None), "params", {}).get("apx_case")
    if not isinstance(following, CaseId) or following.label != execution.case.label:
        execution.runner.idle(execution.case.label)


@pytest.fixture
def apx_case(request: pytest.FixtureRequest, apx_case_runner: CaseRunner):
    """A scenario case: `apx_case.execute()` runs it; the outcome becomes the test's: a
    skip with the reason (a failure under --apx-require for the apx bank), or a failure
    with one line per finding."""
    return _Execution(request.param, apx_case_runner, request.config)


@dataclass
class _Execution:
    case: CaseId
    runner: CaseRunner
    config: pytest.Config

    def execute(self) -> CaseResult:
        result = self.runner.run(self.case.id)
        if result.outcome == "skip":
            if result.require_applies:
                apx_skip_or_fail(result.message, self.config)
            pytest.skip(result.message)
        if result.outcome == "fail":
            detail = f"\n{result.traceback}" if result.traceback else ""
            pytest.fail(result.message + detail, pytrace=False)
        return result
