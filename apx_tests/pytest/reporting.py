"""pytest side of the reports (registered by apx_tests.pytest.plugin through `pytest_plugins`).

  JUnit      with --junitxml and apx-marked tests in the session: the host's facts as
             test-suite properties (apx_tests.pytest.plugin._junit_properties through the
             apx_probe fixture, plus report.summary.host_properties), even when no
             test asked for apx_probe.  Every scenario case gets the properties
             apx.case, apx.backend, apx.bank, apx.scenario, apx.observers (and
             apx.notes, apx.artifacts where there are some).
  KTAP       --apx-ktap FILE (ini apx_ktap): KTAP version 1, one subtest per bank.
  artifacts  --apx-artifacts DIR: everything a test's machines and Run save goes to a
             staging folder DIR/.staging-<pid>/<test id>/; a failing test's folder
             becomes DIR/<test id>/ (with report.txt), a passing one is deleted unless
             --apx-keep-artifacts (ini apx_keep_artifacts).
  summary    after the run: the bank x backend x scenario table and the host line.
  progress   `progress(config, text)` / the `apx_progress` fixture: a line on the
             terminal with -v (for slow phases such as booting Linux under TCG).

Self-tests may implement the hook `pytest_apx_prepare_run(item, case, run)` (e.g. in a
conftest) to set `run.tamper` before a scenario runs: tests/test_report.py injects its
one failure that way.  docs/ci.md describes the whole thing for CI.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..cases import CaseId
from ..report import ktap
from ..report.artifacts import REPORT, RunRecorder, finalize, safe_name
from ..report.records import TestRecord, one_line, parse_case_label
from ..report.summary import case_table, host_line, host_properties, other_tests_line
from .options import apx_artifacts, apx_backends, apx_cpu_profile
from .plugin import get_probe

_state_key = pytest.StashKey["_ItemState"]()
_reports_key = pytest.StashKey["ApxReports"]()
MAX_FAILURE_LINES = 20


class _Hooks:
    @pytest.hookspec
    def pytest_apx_prepare_run(self, item, case, run):
        """Called with each scenario Run before it starts (after the reporting hooks are
        known, before they attach): a self-test may set `run.tamper` here."""


def pytest_addhooks(pluginmanager) -> None:
    pluginmanager.add_hookspecs(_Hooks)


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.plugin made the "apx" group
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx")
    group.addoption("--apx-ktap", metavar="FILE", default=None, dest="apx_ktap",
                    help="write the results as KTAP version 1 (one subtest per bank) to FILE")
    group.addoption("--apx-keep-artifacts", action="store_true", default=None, dest="apx_keep_artifacts",
                    help="with --apx-artifacts: keep the folders of passing tests too")
    parser.addini("apx_ktap", default="", help="apx_tests: KTAP output file")
    parser.addini("apx_keep_artifacts", type="bool", default=False,
                  help="apx_tests: keep artifacts of passing tests too")


def pytest_configure(config: pytest.Config) -> None:
    reports = ApxReports(config)
    config.stash[_reports_key] = reports
    config.pluginmanager.register(reports, "apx-reports")


def pytest_unconfigure(config: pytest.Config) -> None:
    reports = config.stash.get(_reports_key, None)
    if reports is not None and config.pluginmanager.is_registered(reports):
        config.pluginmanager.unregister(reports)


# --- option values --------------------------------------------------------------------------

def apx_ktap(config: pytest.Config) -> str | None:
    value = config.getoption("apx_ktap")
    if value:
        return str(Path(config.invocation_params.dir, value))
    value = config.getini("apx_ktap")
    return str(Path(config.rootpath, value)) if value else None


def apx_keep_artifacts(config: pytest.Config) -> bool:
    value = config.getoption("apx_keep_artifacts")
    return bool(config.getini("apx_keep_artifacts") if value is None else value)


def _shown(path: Path, config: pytest.Config) -> str:
    """A path as CI logs should show it: relative to where pytest was started, if inside."""
    rel = os.path.relpath(path, config.invocation_params.dir)
    return str(path) if rel.startswith("..") else rel


# --- progress ------------------------------------------------------------------------------------

def progress(config: pytest.Config, text: str) -> None:
    """With -v, write `apx: TEXT` on the terminal now (also from inside a test)."""
    if config.getoption("verbose", 0) <= 0:
        return
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        terminal.write_line(f"apx: {text}")


@pytest.fixture
def apx_progress(request: pytest.FixtureRequest):
    """`apx_progress("booting Linux guest (TCG)...")`: a progress line with -v, naming the test."""
    state = request.node.stash.get(_state_key, None)
    name = state.label if state is not None and state.label else request.node.name
    return lambda text: progress(request.config, f"{name}: {text}")


@pytest.fixture
def apx_test_artifacts(request: pytest.FixtureRequest) -> Path | None:
    """This test's artifacts folder while it runs (kept as DIR/<test id>/ if it fails),
    or None without --apx-artifacts.  For tests that save files of their own."""
    state = request.node.stash.get(_state_key, None)
    if state is None or state.staging is None:
        return None
    state.staging.mkdir(parents=True, exist_ok=True)
    return state.staging


# --- JUnit: the host ------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _apx_junit_host_properties(request: pytest.FixtureRequest) -> None:
    """With --junitxml and apx-marked tests: the host's facts as test-suite properties."""
    config = request.config
    if not config.getoption("xmlpath", None):
        return
    if not any(item.get_closest_marker("apx") for item in request.session.items):
        return
    request.getfixturevalue("apx_probe")  # records apx_tests.pytest.plugin._junit_properties
    record = request.getfixturevalue("record_testsuite_property")
    for name, value in host_properties(get_probe(config), apx_backends(config)).items():
        record(name, value)
    record("apx.cpu_profile", apx_cpu_profile(config))


# --- per test ---------------------------------------------------------------------------------------

@dataclass
class _ItemState:
    label: str | None                  # the case label, if the test is a case
    parsed: tuple[str, str, str] | None
    dirname: str
    staging: Path | None = None
    recorder: RunRecorder | None = None
    host: object | None = None          # a QEMU host whose artifacts dir points at staging
    host_artifacts: str | None = None
    local_case: bool = False            # runs through apx_case (a Run here)
    failure: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failure)


def _case_of(item: pytest.Item) -> CaseId | None:
    case = getattr(item, "case", None)  # RemoteCaseItem
    if isinstance(case, CaseId):
        return case
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("apx_case") if callspec is not None else None
    return case if isinstance(case, CaseId) else None


def _item_state(item: pytest.Item) -> _ItemState:
    state = item.stash.get(_state_key, None)
    if state is not None:
        return state
    name = item.name
    param = name[name.index("[") + 1:-1] if "[" in name and name.endswith("]") else None
    case = _case_of(item)
    label = None
    if case is not None:
        label = param if param and param.endswith(case.id) else case.id
    elif param and item.get_closest_marker("apx") is not None and parse_case_label(param):
        label = param  # an apx-marked test with a case id of its own (the Linux cases)
    parsed = parse_case_label(label) if label else None
    module = Path(item.nodeid.split("::")[0]).stem
    dirname = safe_name(label if label else f"{module}-{name}")
    state = _ItemState(label, parsed, dirname, local_case=case is not None and not hasattr(item, "host"))
    reports = item.config.stash.get(_reports_key, None)
    if reports is not None and reports.staging_root is not None:
        state.staging = reports.staging_root / dirname
    item.stash[_state_key] = state
    return state


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = _item_state(item)
    if state.parsed is not None:
        backend, bank, scenario = state.parsed
        item.user_properties += [("apx.case", state.label), ("apx.backend", backend), ("apx.bank", bank),
                                 ("apx.scenario", scenario)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Give the session's CaseRunner this test's prepare_run while the test runs."""
    execution = getattr(item, "funcargs", {}).get("apx_case")
    runner = getattr(execution, "runner", None)
    if runner is not None and hasattr(runner, "prepare_run"):
        runner.prepare_run = lambda case, run: _prepare_run(item, case, run)
    try:
        yield
    finally:
        if runner is not None and hasattr(runner, "prepare_run"):
            runner.prepare_run = None
        state = item.stash.get(_state_key, None)
        if state is not None and state.host is not None:
            state.host.artifacts = state.host_artifacts
            state.host = None


def _prepare_run(item: pytest.Item, case: CaseId, run) -> None:
    state = _item_state(item)
    keep = apx_keep_artifacts(item.config)
    state.recorder = RunRecorder(state.staging, keep=keep)
    host = getattr(run.backend, "host", None)
    if state.staging is not None and host is not None and hasattr(host, "artifacts"):
        if state.host is None:
            state.host, state.host_artifacts = host, host.artifacts
        host.artifacts = str(state.staging)  # every Machine of this test saves its logs here
    item.config.hook.pytest_apx_prepare_run(item=item, case=case, run=run)
    state.recorder.attach(run)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    state = _item_state(item)
    if call.when == "teardown" and state.parsed is not None:
        if state.recorder is not None:
            item.user_properties.append(("apx.observers", ",".join(state.recorder.observers) or "none"))
            if state.recorder.notes:
                item.user_properties.append(("apx.notes", "; ".join(state.recorder.notes)))
        elif state.local_case:
            item.user_properties.append(("apx.observers", "none"))
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        state.failure.append(f"--- {report.when} ---\n{report.longreprtext}")
    if call.when == "teardown":
        kept = _finish_artifacts(item, state)
        if kept is not None:
            report.user_properties.append(("apx.artifacts", _shown(kept, item.config)))


def _finish_artifacts(item: pytest.Item, state: _ItemState) -> Path | None:
    reports = item.config.stash.get(_reports_key, None)
    if reports is None or reports.root is None or state.staging is None:
        return None
    staging = state.staging
    has_files = staging.is_dir() and any(staging.iterdir())
    if not (state.failed or (reports.keep and has_files)):
        finalize(staging, None)
        return None
    staging.mkdir(parents=True, exist_ok=True)
    (staging / REPORT).write_text(_report_text(item, state, staging))
    return finalize(staging, reports.root / reports.unique(state.dirname))


def _report_text(item: pytest.Item, state: _ItemState, staging: Path) -> str:
    lines = [f"test: {item.nodeid}", f"outcome: {'failed' if state.failed else 'passed (kept)'}"]
    if state.parsed is not None:
        backend, bank, scenario = state.parsed
        lines.append(f"case: {state.label} (backend {backend}, bank {bank}, scenario {scenario})")
    if state.recorder is not None:
        lines += state.recorder.summary_lines()
    lines.append("files: " + (", ".join(sorted(p.name for p in staging.iterdir() if p.name != REPORT))
                              or "none"))
    return "\n".join(lines + state.failure) + "\n"


# --- the whole run: KTAP, terminal summary -----------------------------------------------------------

def _failure(report) -> tuple[str, list[str]]:
    """(the cause in one line, the lines worth showing) of a failed phase."""
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else (lines[0] if lines else "")
    message = message[len("Failed: "):] if message.startswith("Failed: ") else message
    if len(lines) > MAX_FAILURE_LINES and crash is not None:
        lines = [*message.splitlines(), f"at {crash.path}:{crash.lineno}"]
    return (message.splitlines() or [""])[0], lines


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


class ApxReports:
    """Collects every test's outcome (also on pytest-xdist's controller) and writes the
    KTAP file and the terminal summary at the end."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.records: dict[str, TestRecord] = {}
        self.keep = apx_keep_artifacts(config)
        root = apx_artifacts(config)
        self.root = Path(root) if root else None
        self.staging_root = self.root / f".staging-{os.getpid()}" if self.root else None
        self._names: set[str] = set()

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}-{n}"
        self._names.add(candidate)
        return candidate

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    def pytest_runtest_logreport(self, report) -> None:
        props = {str(k): str(v) for k, v in report.user_properties}
        record = self.records.get(report.nodeid)
        if record is None:
            record = self.records[report.nodeid] = TestRecord.for_test(report.nodeid, props, len(self.records))
        record.properties.update(props)
        xfail = getattr(report, "wasxfail", None)
        if report.skipped and xfail is None:
            record.update(report.when, "skipped", reason=_skip_reason(report))
        elif report.failed:
            reason, lines = _failure(report)
            record.update(report.when, "failed", reason=reason, lines=lines)
        else:
            record.update(report.when, report.outcome, xfail=xfail)

    def pytest_sessionstart(self, session) -> None:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)  # there, empty, when all passed

    def pytest_sessionfinish(self, session) -> None:
        if self.staging_root is not None:
            try:
                self.staging_root.rmdir()  # empty unless a test never reached teardown
            except OSError:
                pass
        path = apx_ktap(self.config)
        if path and not self.is_worker:
            header = [host_line(get_probe(self.config)), f"apx_tests: {len(self.records)} tests"]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(ktap.render(list(self.records.values()), header))

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config) -> None:
        records = list(self.records.values())
        table = case_table(records)
        if not table:
            return
        terminalreporter.section("apx summary")
        terminalreporter.write_line(one_line(host_line(get_probe(config)), 1000))
        for line in table:
            terminalreporter.write_line(line)
        others = other_tests_line(records)
        if others:
            terminalreporter.write_line(others)
        path = apx_ktap(config)
        if path:
            terminalreporter.write_line(f"KTAP: {_shown(Path(path), config)}")
        if self.root is not None:
            kept = [r for r in records if r.artifacts]
            terminalreporter.write_line(f"artifacts: {_shown(self.root, config)} "
                                        f"({len(kept)} folder{'s' if len(kept) != 1 else ''})")
