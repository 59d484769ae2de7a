"""avocado-instrumented tests: one test method per KVM scenario case (`kvm-ymm-import`).

The methods are added to ApxScenario at import time from the scenario catalogue, so
avocado's static loader cannot see them: the `apx` resolver plugin (resolver.py) names
them instead (`avocado run apx:`), and avocado's avocado-instrumented runner imports this
file and calls the method by name, which works for methods made at run time.

Each method runs its case through apx_tests.cases.CaseRunner, the pytest-free
runner the remote agent uses, so the outcome and the messages are those of
`pytest -m apx`:
  - pass -> PASS;
  - the host cannot run the bank -> SKIP with the reason (raised in setUp, where avocado
    allows skips); for the apx bank with `-p apx_require=true` (or APX_REQUIRE=1) -> FAIL
    with "--apx-require: <reason>", as --apx-require does under pytest;
  - scenario findings -> FAIL with one line per finding.
"""

from __future__ import annotations

import os

from avocado import Test
from avocado.core.exceptions import TestSkipError

from apx_tests.cases import CaseId, CaseRunner, case_ids

TRUE = ("1", "true", "yes", "on")


class ApxScenario(Test):
    """A scenario case on a bank through the KVM backend (method name = case id).

    :avocado: disable
    """

    timeout = 300  # avocado runs the method in a thread, where the VMM's SIGALRM bound is off

    def setUp(self):
        self.case_id = self._testMethodName
        self.runner = CaseRunner()
        self.require_failure = None
        case = CaseId.parse(self.case_id)
        reason = self.runner.unavailable(case)
        if reason:
            message = f"{self.case_id}: {reason}"
            if case.bank == "apx" and self._require():
                self.require_failure = f"--apx-require: {message}"  # failed in the test phase
            else:
                raise TestSkipError(message)

    def _require(self) -> bool:
        value = self.params.get("apx_require", default=None)
        if value is None:
            value = os.environ.get("APX_REQUIRE", "")
        return str(value).strip().lower() in TRUE

    def run_case(self):
        if self.require_failure:
            self.fail(self.require_failure)
        result = self.runner.run(self.case_id)
        for key, value in sorted(result.facts.items()):
            self.log.info("fact %s: %s", key, value)
        if result.traceback:
            self.log.error("traceback:\n%s", result.traceback)
        if result.outcome == "skip":  # the host changed between setUp and now
            self.cancel(result.message)
        if result.outcome == "fail":
            self.fail(result.message)

    def tearDown(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


def _case_method(case_id: str):
    def test(self):
        self.run_case()
    test.__name__ = case_id
    test.__doc__ = f"scenario case {case_id}"
    return test


for _case_id in case_ids("kvm"):
    setattr(ApxScenario, _case_id, _case_method(_case_id))
