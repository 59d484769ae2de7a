"""The apx_tests pytest plugin (entry point ``pytest11: apx = apx_tests.pytest.plugin``).

Registers the ``apx`` marker, the ``apx`` option group and its ini mirrors, the
session-scoped ``apx_probe`` fixture, and loads the package's other plugin modules
(``pytest_plugins`` below): apx_tests.pytest.items (the scenario cases), .remote and
.labgrid (--apx-host, --apx-place), .faults (--apx-inject), .reporting (JUnit, KTAP,
artifacts, the summary), .kut (--apx-kernel).  The option values and
``apx_skip_or_fail`` are apx_tests.pytest.options.

Never load this module from a conftest as well: the entry point already does, and a
second registration makes pytest refuse to start.
"""

from __future__ import annotations

import pytest

from ..cases import BACKEND_CHOICES
from ..probe import Probe, probe
from ..profiles import DEFAULT_PROFILE, PROFILES
from .options import (_configs, apx_backends, apx_cpu_profile, apx_qemu_paths, apx_qemus, apx_require,
                      qemu_backends_chosen)

MARKER = "apx: scenarios over XSAVE register banks (APX R16-R31 and the stand-in banks)"

_probe_key = pytest.StashKey[Probe]()

# The package's other plugin modules, in this order: registration order decides the order
# of their hooks (LIFO among untagged ones) and which apx_case_runner fixture wins (faults
# wraps the one of items).
pytest_plugins = [
    # the scenario cases: parametrization, deselection, apx_case_runner/apx_case
    "apx_tests.pytest.items",
    # --apx-host, fleets (docs/remote.md)
    "apx_tests.pytest.remote",
    # --apx-inject (docs/faults.md)
    "apx_tests.pytest.faults",
    # JUnit properties, KTAP, artifacts, the summary (docs/ci.md)
    "apx_tests.pytest.reporting",
    # --apx-place: labgrid places as remote hosts (docs/remote.md, "labgrid places")
    "apx_tests.pytest.labgrid",
    # --apx-kernel: the KVM cases inside a QEMU guest of a kernel under test (docs/kernel-under-test.md)
    "apx_tests.pytest.kut",
    # -n N: the Linux items on one worker, each backend's items on one worker
    "apx_tests.pytest.xdist_scopes",
]


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


def get_probe(config: pytest.Config) -> Probe:
    """The probe of this host, computed once per session (stored on the config)."""
    if _probe_key not in config.stash:
        config.stash[_probe_key] = probe(qemu=[q.path for q in apx_qemus(config)])
    return config.stash[_probe_key]


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
    if qemu_backends_chosen(config):
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
