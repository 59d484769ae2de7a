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

from .backend import BackendError
from .guests.build import GuestBuildError, build_payload
from .probe import BANK_ORDER, Probe, probe
from .qemu.backend import FEATURES as QEMU_FEATURES
from .scenarios import SCENARIOS, Run, ScenarioFailure
from .xsave import BANKS

BACKENDS = ("kvm", "qemu")
BACKEND_CHOICES = BACKENDS + ("all",)
MARKER = "apx: scenarios over XSAVE register banks (APX R16-R31 and the stand-in banks)"

_probe_key = pytest.StashKey[Probe]()
_configs: list[pytest.Config] = []  # a stack: pytester runs sessions inside a session

# --- remote hosts (--apx-host, fleets): their own plugin module, docs/remote.md ---------------
pytest_plugins = ["apx_tests.remote.pytest_remote"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx", "apx_tests: x86 extended state through KVM and QEMU")
    group.addoption("--apx-backend", action="append", choices=BACKEND_CHOICES, default=None,
                    dest="apx_backend", metavar="{kvm,qemu,all}",
                    help="backend(s) to run scenarios on; repeat for several (default: all, "
                         "or the apx_backend ini value)")
    group.addoption("--apx-require", action="store_true", default=None, dest="apx_require",
                    help="lab mode: a scenario that cannot run here fails instead of skipping")
    group.addoption("--apx-qemu", metavar="PATH", default=None, dest="apx_qemu",
                    help="qemu-system-x86_64 binary (default: apx_qemu ini, $APX_QEMU, or PATH)")
    group.addoption("--apx-artifacts", metavar="DIR", default=None, dest="apx_artifacts",
                    help="directory for artifacts kept from failing scenarios (images, logs)")
    parser.addini("apx_backend", type="args", default=["all"],
                  help="apx_tests: default backend(s) (kvm, qemu, all)")
    parser.addini("apx_require", type="bool", default=False,
                  help="apx_tests: lab mode, scenarios that cannot run fail")
    parser.addini("apx_qemu", default="", help="apx_tests: qemu-system-x86_64 binary")
    parser.addini("apx_artifacts", default="", help="apx_tests: artifacts directory")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    bad = [b for b in config.getini("apx_backend") if b not in BACKEND_CHOICES]
    if bad:
        raise pytest.UsageError(f"apx_backend ini: unknown backend(s) {', '.join(bad)}; "
                                f"choose from {', '.join(BACKEND_CHOICES)}")
    _configs.append(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config in _configs:
        _configs.remove(config)


# --- option values ------------------------------------------------------------------

def apx_require(config: pytest.Config) -> bool:
    value = config.getoption("apx_require")
    return bool(config.getini("apx_require") if value is None else value)


def apx_backends(config: pytest.Config) -> tuple[str, ...]:
    """The selected backends, 'all' expanded, in BACKENDS order."""
    chosen = config.getoption("apx_backend") or config.getini("apx_backend") or ["all"]
    if "all" in chosen:
        return BACKENDS
    return tuple(b for b in BACKENDS if b in chosen)


def apx_qemu(config: pytest.Config) -> str | None:
    return config.getoption("apx_qemu") or config.getini("apx_qemu") or None


def apx_artifacts(config: pytest.Config) -> str | None:
    value = config.getoption("apx_artifacts") or config.getini("apx_artifacts")
    if not value:
        return None
    return value if os.path.isabs(value) else str(config.rootpath / value)


def get_probe(config: pytest.Config) -> Probe:
    """The probe of this host, computed once per session (stored on the config)."""
    if _probe_key not in config.stash:
        config.stash[_probe_key] = probe(qemu=apx_qemu(config))
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
    for b in p.banks.values():
        props[f"apx.bank.{b.name}"] = "runnable" if b.kvm_runnable else f"not runnable: {b.reason}"
    return props


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = "require (lab mode)" if apx_require(config) else "skip when unavailable"
    return [f"apx: backends {','.join(apx_backends(config))}; {mode}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """If the probe ran this session, say in one block what it found (CI logs)."""
    if _probe_key not in config.stash:
        return
    p = config.stash[_probe_key]
    terminalreporter.section("apx probe")
    for line in p.report_lines():
        terminalreporter.write_line(line)


# --- scenarios: bank x backend x scenario ---------------------------------------------------

@dataclass(frozen=True)
class ScenarioCase:
    """One generated test: a scenario on a bank through a backend (id `kvm-ymm-import`)."""
    backend: str
    bank: str
    scenario: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.bank}-{self.scenario}"


def scenario_cases(config: pytest.Config) -> list[ScenarioCase]:
    cases = []
    for backend in (b for choice in apx_backends(config) for b in BACKEND_GROUPS.get(choice, (choice,))):
        if backend not in BACKEND_FACTORIES:
            continue
        for bank in BANK_ORDER:
            for name, scenario in SCENARIOS.items():
                if scenario.requires <= BACKEND_FEATURES[backend] and scenario.applies_to(bank):
                    cases.append(ScenarioCase(backend, bank, name))
    return cases


def _kvm_backend(config: pytest.Config):
    from .kvm.backend import KvmBackend, KvmHost
    return KvmBackend(KvmHost())


def _qemu_backend(accel: str):
    def factory(config: pytest.Config):
        from .qemu.backend import QemuBackend
        return QemuBackend(accel, qemu=apx_qemu(config))  # QemuUnavailable is an OSError: a skip
    return factory


# Backends that can run scenarios so far, and the Session features each offers.
# A --apx-backend choice may stand for several backends (qemu: QEMU with KVM and with TCG).
BACKEND_GROUPS = {"qemu": ("qemu-kvm", "qemu-tcg")}
BACKEND_FACTORIES = {"kvm": _kvm_backend, "qemu-kvm": _qemu_backend("kvm"), "qemu-tcg": _qemu_backend("tcg")}
BACKEND_FEATURES = {"kvm": frozenset({"raw_xsave", "legacy_get_xsave", "fresh_vm", "set_xcr0", "xstate_bv_init"}),
                    "qemu-kvm": QEMU_FEATURES["kvm"], "qemu-tcg": QEMU_FEATURES["tcg"]}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "apx_case" in metafunc.fixturenames:
        cases = scenario_cases(metafunc.config)
        metafunc.parametrize("apx_case", cases, ids=[c.id for c in cases], indirect=True)


class _Backends:
    """Backends opened lazily, once per session; an open failure is remembered as the
    reason every case of that backend skips (or fails with --apx-require)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.opened: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def get(self, name: str):
        if name not in self.opened and name not in self.errors:
            try:
                self.opened[name] = BACKEND_FACTORIES[name](self.config)
            except OSError as exc:
                self.errors[name] = f"{name} backend unavailable: {exc.strerror or exc}"
        if name in self.errors:
            return None, self.errors[name]
        return self.opened[name], None

    def close(self) -> None:
        for backend in self.opened.values():
            host = getattr(backend, "host", None)
            if host is not None:
                host.close()
        self.opened.clear()


@pytest.fixture(scope="session")
def apx_backends_cache(pytestconfig: pytest.Config):
    backends = _Backends(pytestconfig)
    yield backends
    backends.close()


@pytest.fixture
def apx_case(request: pytest.FixtureRequest, apx_backends_cache: _Backends):
    """A scenario case: `apx_case.execute()` runs it and fails with one line per finding.
    The skip (or, for the apx bank under --apx-require, the failure) when this host cannot
    run it happens in the test itself, so it is reported as the test's outcome."""
    case: ScenarioCase = request.param
    backend, error = apx_backends_cache.get(case.backend)
    bank = BANKS[case.bank]
    return _Execution(case, backend, bank, request.config,
                      error or backend.unavailable_reason(bank))


@dataclass
class _Execution:
    case: ScenarioCase
    backend: Any
    bank: Any
    config: pytest.Config
    unavailable: str | None

    def execute(self) -> None:
        if self.unavailable:
            if self.case.bank == "apx":
                apx_skip_or_fail(f"{self.case.id}: {self.unavailable}", self.config)
            pytest.skip(f"{self.case.id}: {self.unavailable}")
        try:
            payload = build_payload(self.case.bank).code
        except GuestBuildError as exc:
            pytest.fail(f"{self.case.id}: {exc}", pytrace=False)
        scenario = SCENARIOS[self.case.scenario]
        try:
            with Run(self.backend, self.bank, payload) as run:
                scenario.run(run)
        except ScenarioFailure as failure:
            pytest.fail(f"{self.case.id}: " + "\n".join(failure.lines), pytrace=False)
        except BackendError as exc:
            pytest.fail(f"{self.case.id}: {exc}", pytrace=False)
