"""The apx_tests pytest plugin (entry point ``pytest11: apx = apx_tests.plugin``).

Registers the ``apx`` marker, the ``apx`` option group and its ini mirrors, the
session-scoped ``apx_probe`` fixture, and ``apx_skip_or_fail``: the one place that
decides between "skip" (default) and "fail" (``--apx-require``, lab mode) when a
scenario cannot run on this host.

Never load this module from a conftest as well: the entry point already does, and a
second registration makes pytest refuse to start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from .cases import BACKEND_CHOICES, CaseId, CaseResult, CaseRunner, cases, expand_backends
from .probe import Probe, probe
from .profiles import DEFAULT_PROFILE, PROFILES

MARKER = "apx: scenarios over XSAVE register banks (APX R16-R31 and the stand-in banks)"

_probe_key = pytest.StashKey[Probe]()
_configs: list[pytest.Config] = []  # a stack: pytester runs sessions inside a session

# --- remote hosts (--apx-host, fleets): their own plugin module, docs/remote.md ---------------
pytest_plugins = ["apx_tests.remote.pytest_remote", "apx_tests.faults_pytest", "apx_tests.report_pytest",
                  # --apx-place: labgrid places as remote hosts (docs/remote.md, "labgrid places")
                  "apx_tests.remote.pytest_labgrid",
                  # --apx-kernel: the KVM cases inside a QEMU guest of a kernel under test (docs/kernel-under-test.md)
                  "apx_tests.kut.pytest_kut"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx", "apx_tests: x86 extended state through KVM and QEMU")
    group.addoption("--apx-backend", action="append", choices=BACKEND_CHOICES, default=None,
                    dest="apx_backend", metavar="{" + ",".join(BACKEND_CHOICES) + "}",
                    help="backend(s) to run cases on: kvm (the embedded VMM), qemu-kvm, qemu-tcg, "
                         "qemu-tcg-linux (Linux guests; also 'linux'), qemu (all three QEMU ones), "
                         "all; repeat for several; cases of other backends are deselected "
                         "(default: all, or the apx_backend ini value)")
    group.addoption("--apx-require", action="store_true", default=None, dest="apx_require",
                    help="lab mode: a scenario that cannot run here fails instead of skipping")
    group.addoption("--apx-qemu", metavar="PATH", action="append", default=None, dest="apx_qemu",
                    help="qemu-system-x86_64 binary; repeat to run the QEMU cases on several side by side "
                         "(ids then carry the version: qemu11-kvm-ymm-export); the first also runs the Linux "
                         "guests (default: the apx_qemu ini list, $APX_QEMU (':'-separated), else PATH's QEMU "
                         "plus ci/bootstrap's side QEMUs, e.g. QEMU 11 on Debian 12)")
    group.addoption("--apx-cpu", choices=tuple(PROFILES), default=None, dest="apx_cpu",
                    metavar="{" + ",".join(PROFILES) + "}",
                    help="CPU profile: run as this kind of host by restricting the guest CPU "
                         "(KVM CPUID/XCR0, QEMU -cpu features): " +
                         "; ".join(f"{p.name}: {p.title}" for p in PROFILES.values()) +
                         " (default: host, or the apx_cpu ini value)")
    group.addoption("--apx-artifacts", metavar="DIR", default=None, dest="apx_artifacts",
                    help="directory for artifacts kept from failing scenarios (images, logs)")
    parser.addini("apx_backend", type="args", default=["all"],
                  help="apx_tests: default backend(s) (kvm, qemu, all)")
    parser.addini("apx_require", type="bool", default=False,
                  help="apx_tests: lab mode, scenarios that cannot run fail")
    parser.addini("apx_qemu", type="args", default=[],
                  help="apx_tests: qemu-system-x86_64 binaries (one or several, space-separated)")
    parser.addini("apx_artifacts", default="", help="apx_tests: artifacts directory")
    parser.addini("apx_cpu", default=DEFAULT_PROFILE, help="apx_tests: CPU profile (--apx-cpu)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    config.addinivalue_line("markers", "apx_backend(name): the backend a test belongs to; "
                                       "--apx-backend deselects it when not chosen")
    bad = [b for b in config.getini("apx_backend") if b not in BACKEND_CHOICES]
    if bad:
        raise pytest.UsageError(f"apx_backend ini: unknown backend(s) {', '.join(bad)}; "
                                f"choose from {', '.join(BACKEND_CHOICES)}")
    if config.getini("apx_cpu") not in PROFILES:
        raise pytest.UsageError(f"apx_cpu ini: unknown CPU profile {config.getini('apx_cpu')!r}; "
                                f"choose from {', '.join(PROFILES)}")
    if len(apx_qemu_paths(config) or ()) > 1:
        apx_qemus(config)  # several QEMUs asked for: each must work (their versions name the ids)
    _configs.append(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config in _configs:
        _configs.remove(config)


# --- option values ------------------------------------------------------------------

def apx_require(config: pytest.Config) -> bool:
    value = config.getoption("apx_require")
    return bool(config.getini("apx_require") if value is None else value)


def apx_backends(config: pytest.Config) -> tuple[str, ...]:
    """The selected backends, as concrete backend names (kvm, qemu-kvm, qemu-tcg)."""
    chosen = config.getoption("apx_backend") or config.getini("apx_backend") or ["all"]
    return expand_backends(chosen)


def apx_qemu_paths(config: pytest.Config) -> list[str] | None:
    """The QEMUs asked for (--apx-qemu, else the apx_qemu ini), or None for the default."""
    return list(config.getoption("apx_qemu") or config.getini("apx_qemu") or []) or None


def apx_qemu(config: pytest.Config) -> str | None:
    """The primary QEMU asked for (the first --apx-qemu / ini entry), or None for the
    default: what the Linux guests and the kernel under test run on."""
    paths = apx_qemu_paths(config)
    return paths[0] if paths else None


_qemus_key = pytest.StashKey[list]()


def apx_qemus(config: pytest.Config) -> list:
    """The run's QEMUs (apx_tests.qemu.binaries.QemuBinary: path, version, tag), resolved
    once per session; a list that cannot be used (two QEMUs, one without a version) is a
    usage error naming it."""
    if _qemus_key not in config.stash:
        from .qemu.binaries import QemuListError, resolve_qemus
        try:
            config.stash[_qemus_key] = resolve_qemus(apx_qemu_paths(config))
        except QemuListError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[_qemus_key]


def _qemu_backends_chosen(config: pytest.Config) -> bool:
    return any(b.startswith("qemu-") for b in apx_backends(config))


def apx_cpu_profile(config: pytest.Config) -> str:
    return config.getoption("apx_cpu") or config.getini("apx_cpu") or DEFAULT_PROFILE


def apx_artifacts(config: pytest.Config) -> str | None:
    value = config.getoption("apx_artifacts") or config.getini("apx_artifacts")
    if not value:
        return None
    return value if os.path.isabs(value) else str(config.rootpath / value)


def get_probe(config: pytest.Config) -> Probe:
    """The probe of this host, computed once per session (stored on the config)."""
    if _probe_key not in config.stash:
        config.stash[_probe_key] = probe(qemu=[q.path for q in apx_qemus(config)])
    return config.stash[_probe_key]


# --- the decision ---------------------------------------------------------------------

def apx_skip_or_fail(reason: str, config: pytest.Config | None = None) -> NoReturn:
    """Skip the current test with ``reason``; with --apx-require fail it instead."""
    config = config or (_configs[-1] if _configs else None)
    if config is not None and apx_require(config):
        pytest.fail(f"--apx-require: {reason}", pytrace=False)
    try:
        # Report the skip at the test, not at this helper (what skipif markers do).
        exc = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without that keyword
        exc = pytest.skip.Exception(reason)
    raise exc


# --- fixtures and hooks -----------------------------------------------------------------

@pytest.fixture(scope="session")
def apx_probe(pytestconfig: pytest.Config, record_testsuite_property) -> Probe:
    """What this host can do (apx_tests.probe.Probe), computed once per session.

    With --junitxml, the key facts also become <property> elements of the test suite.
    """
    p = get_probe(pytestconfig)
    for name, value in _junit_properties(p).items():
        record_testsuite_property(name, value)
    return p


def _junit_properties(p: Probe) -> dict[str, str]:
    def h(v):
        return "unknown" if v is None else f"{v:#x}"
    props = {
        "apx.cpu": f"{p.cpu.vendor} family {p.cpu.family} model {p.cpu.model} stepping {p.cpu.stepping}",
        "apx.cpu.apx_f": str(p.cpu.apx),
        "apx.host.xcr0": h(p.cpu.xcr0),
        "apx.kernel": p.kernel_release,
        "apx.kvm": "present" if p.kvm.present else f"unavailable: {p.kvm.error}",
        "apx.kvm.supported_xcr0": h(p.kvm.supported_xcr0),
        "apx.kvm.xsave2_size": str(p.kvm.xsave2_size),
        "apx.qemu": p.qemu.version or f"unavailable: {p.qemu.error}",
    }
    if len(p.qemus) > 1:  # side by side: every version (each one's details: report.summary.host_properties)
        props["apx.qemu"] = ",".join(q.version or "unavailable" for q in p.qemus)
    for b in p.banks.values():
        props[f"apx.bank.{b.name}"] = "runnable" if b.kvm_runnable else f"not runnable: {b.reason}"
    return props


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = "require (lab mode)" if apx_require(config) else "skip when unavailable"
    lines = [f"apx: backends {','.join(apx_backends(config))}; CPU profile {apx_cpu_profile(config)}; {mode}"]
    if _qemu_backends_chosen(config):
        qemus = apx_qemus(config)
        lines.append("apx: QEMU " + ", ".join(
            f"{q.version or 'unavailable'} ({q.backend('*')}: {q.path})" for q in qemus))
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """If the probe ran this session, say in one block what it found (CI logs)."""
    if _probe_key not in config.stash:
        return
    p = config.stash[_probe_key]
    terminalreporter.section("apx probe")
    for line in p.report_lines():
        terminalreporter.write_line(line)


# --- scenarios: bank x backend x scenario ---------------------------------------------------
# Which cases exist and how one is run and judged live in apx_tests.cases (shared with the
# remote agent and avocado); here they only become pytest items and outcomes.

def scenario_cases(config: pytest.Config) -> list[CaseId]:
    """The selected backends' cases; a QEMU backend's once per QEMU of the run."""
    backends = apx_backends(config)
    tags = tuple(q.tag for q in apx_qemus(config)) if _qemu_backends_chosen(config) else ("",)
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
    qemu = apx_qemus(pytestconfig) if _qemu_backends_chosen(pytestconfig) else apx_qemu_paths(pytestconfig)
    with CaseRunner(qemu=qemu, artifacts=apx_artifacts(pytestconfig),
                    profile=apx_cpu_profile(pytestconfig)) as runner:
        yield runner


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
