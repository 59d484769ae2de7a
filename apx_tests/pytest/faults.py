"""pytest side of fault injection (registered by apx_tests.pytest.plugin through `pytest_plugins`).

``--apx-inject FAULT`` runs every scenario case (tests taking the ``apx_case`` fixture)
with FAULT applied between the backend and the scenario engine (apx_tests.faults): the
scenarios able to see that bug fail, with their usual one-line findings, the others pass.
A case whose backend the fault does not apply to (``stream_flip`` on kvm, ``gdb_drop``
without a debugger) is skipped saying so.  The terminal summary lists which cases caught
the fault.

    pytest -m apx --apx-backend kvm --apx-inject zero_after_export
    ci/fault-table        # every fault x scenario, the table in docs/faults.md
"""

from __future__ import annotations

import re

import pytest

from ..cases import BACKEND_FEATURES, CaseId
from ..faults import FAULTS

# The case id at the end of a node id; a kernel under test's prefix (kernel[R]-) stays on
# it, so the tally tells the guest's cases from this host's.
_CASE_ID = re.compile(r"\[(?:[^\]\[]*-)?((?:kernel\[[^\]]*\]-)?(?:qemu-kvm|qemu-tcg|kvm)-[a-z0-9_]+-[a-z0-9_]+)\]$")
_tally_key = pytest.StashKey["_Tally"]()


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.plugin made the "apx" group
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx")
    group.addoption("--apx-inject", choices=list(FAULTS), default=None, dest="apx_inject", metavar="FAULT",
                    help="run the scenarios with a deliberate VMM bug between backend and scenarios, to "
                         f"see which catch it (docs/faults.md): {', '.join(FAULTS)}")


def injected(config: pytest.Config):
    name = config.getoption("apx_inject", None)
    return FAULTS[name] if name else None


def pytest_configure(config: pytest.Config) -> None:
    fault = injected(config)
    if fault is None:
        return
    hosts = config.getoption("apx_host", None) or (config.getini("apx_hosts") if _has_ini(config, "apx_hosts") else [])
    if hosts:
        raise pytest.UsageError("--apx-inject runs the cases locally; it does not combine with --apx-host")
    tally = config.stash[_tally_key] = _Tally(fault)
    config.pluginmanager.register(tally, "apx-inject-tally")


def _has_ini(config: pytest.Config, name: str) -> bool:
    try:
        config.getini(name)
    except ValueError:
        return False
    return True


def pytest_report_header(config: pytest.Config) -> list[str]:
    fault = injected(config)
    if fault is None:
        return []
    return [f"apx inject: {fault.name} ({fault.summary}); the scenarios that catch it fail"]


@pytest.fixture(scope="session")
def apx_case_runner(apx_case_runner, pytestconfig: pytest.Config):
    """The plugin's CaseRunner, with the --apx-inject fault's session wrapper."""
    fault = injected(pytestconfig)
    if fault is not None:
        apx_case_runner.session_wrapper = fault.wrap
    return apx_case_runner


def _case_of(item: pytest.Item) -> CaseId | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("apx_case") if callspec is not None else None
    return case if isinstance(case, CaseId) else None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    fault = injected(config)
    if fault is None:
        return
    for item in items:
        case = _case_of(item)
        if case is None:
            continue
        why = fault.why_not(case.backend, BACKEND_FEATURES[case.backend])
        if why:
            item.add_marker(pytest.mark.skip(reason=f"{case.id}: --apx-inject {why}"))


class _Tally:
    """Which scenario cases failed (caught the fault), passed (missed it) or skipped; on the
    controlling process under pytest-xdist, where the reports arrive."""

    def __init__(self, fault):
        self.fault = fault
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        m = _CASE_ID.search(report.nodeid)
        if m is None:
            return
        case = m.group(1)
        if report.failed:
            self.outcomes[case] = "caught"
        elif report.skipped:
            self.outcomes.setdefault(case, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(case, "missed")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        caught = sorted(c for c, o in self.outcomes.items() if o == "caught")
        missed = sum(1 for o in self.outcomes.values() if o == "missed")
        skipped = sum(1 for o in self.outcomes.values() if o == "skipped")
        terminalreporter.section("apx inject")
        terminalreporter.write_line(f"{self.fault.name}: caught by {len(caught)} case(s), missed by {missed}, "
                                    f"{skipped} skipped")
        for case in caught:
            terminalreporter.write_line(f"  caught: {case}")


def pytest_unconfigure(config: pytest.Config) -> None:
    tally = config.stash.get(_tally_key, None)
    if tally is not None and config.pluginmanager.is_registered(tally):
        config.pluginmanager.unregister(tally)
