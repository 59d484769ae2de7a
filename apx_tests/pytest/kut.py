"""pytest side of a kernel under test (registered by apx_tests.pytest.plugin through `pytest_plugins`).

With ``--apx-kernel KERNEL`` (repeatable; ini ``apx_kernel``) every collected KVM scenario
case gets a twin item that runs inside a QEMU guest booted with KERNEL, against that
kernel's KVM: ``test_scenario[kernel[6.1.0-57-amd64]-kvm-ymm-import]`` next to
``test_scenario[kvm-ymm-import]`` (this host's KVM), so one run shows both, and ``-k
kernel`` selects the guest's alone.  Without the option nothing here does anything.

The items are apx_tests.pytest.remote's RemoteCaseItem with a GuestHost
(apx_tests.kut.guest) as their transport: one boot per kernel and session, started by the
first item, the cases' outcomes and messages exactly the agent's.  A kernel that cannot
be had, does not boot, or has no usable /dev/kvm makes every one of its items a skip with
that one line (a failure under --apx-require); an agent that breaks mid-run fails the
items it did not report.  JUnit gets apx.kernel (the guest's uname -r), its KVM's
supported XCR0, the accelerator; a failing item's artifacts folder gets the case's record
and the guest's console log; the terminal summary has an "apx kernel" section.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from ..cases import CaseId
from ..kut import kernel as kmod
from ..kut.guest import GuestHost, GuestOptions, KernelSpec
from .options import apx_artifacts, apx_cpu_profile, apx_qemu, apx_skip_or_fail
from .remote import RemoteCaseItem, _error_of

_kernels_key = pytest.StashKey["KernelRuns"]()


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.plugin made the "apx" group
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx")
    group.addoption("--apx-kernel", action="append", default=None, dest="apx_kernel", metavar="KERNEL",
                    help="also run the KVM cases inside a QEMU guest booted with KERNEL, against its KVM: "
                         "a bzImage (modules from --apx-kernel-modules), a directory with boot/vmlinuz-* and "
                         "lib/modules/, a linux-image .deb, or 'debian' (docs/kernel-under-test.md); repeatable "
                         "(ini apx_kernel)")
    group.addoption("--apx-kernel-modules", metavar="DIR", default=None, dest="apx_kernel_modules",
                    help="with --apx-kernel BZIMAGE: the INSTALL_MOD_PATH of its `make modules_install`")
    group.addoption("--apx-kernel-timeout", metavar="SECONDS", type=float, default=None,
                    dest="apx_kernel_timeout",
                    help="longest silence from a kernel-under-test guest while cases are pending (default 300)")
    parser.addini("apx_kernel", type="args", default=[], help="apx_tests: kernels under test (--apx-kernel)")
    parser.addini("apx_kernel_modules", default="", help="apx_tests: modules of a bzImage kernel under test")
    parser.addini("apx_kernel_timeout", default="300", help="apx_tests: kernel-under-test silence timeout")


def _path(config: pytest.Config, value: str) -> str:
    if value == kmod.DEBIAN:
        return value
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else str(config.invocation_params.dir / value)


def pytest_configure(config: pytest.Config) -> None:
    texts = config.getoption("apx_kernel") or config.getini("apx_kernel")
    if not texts:
        return
    modules = config.getoption("apx_kernel_modules") or config.getini("apx_kernel_modules") or None
    timeout = config.getoption("apx_kernel_timeout") or config.getini("apx_kernel_timeout")
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"apx_kernel_timeout: {timeout!r} is not a number of seconds") from None
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError("--apx-kernel does not combine with pytest-xdist (-n): each worker would boot "
                                "its own guest")
    specs: list[KernelSpec] = []
    for text in texts:
        spec = _path(config, text)
        if spec != kmod.DEBIAN and not os.path.exists(spec):
            raise pytest.UsageError(f"--apx-kernel {text}: no such file or directory (want a bzImage, a "
                                    "directory, a linux-image .deb, or 'debian')")
        mods = _path(config, modules) if modules else None
        release = kmod.expected_release(spec, mods)
        kspec = KernelSpec(spec, mods, release)
        if any(s.label == kspec.label for s in specs):
            raise pytest.UsageError(f"--apx-kernel: two kernels report release {release}; give each once")
        specs.append(kspec)
    inject = config.getoption("apx_inject", None)
    options = GuestOptions(qemu=apx_qemu(config), cpu_profile=apx_cpu_profile(config), inject=inject,
                           timeout=timeout, artifacts=apx_artifacts(config))
    config.stash[_kernels_key] = KernelRuns(specs, options)


def kernels_of(config: pytest.Config) -> "KernelRuns | None":
    return config.stash.get(_kernels_key, None)


def pytest_report_header(config: pytest.Config) -> list[str]:
    runs = kernels_of(config)
    if runs is None:
        return []
    return [f"apx kernel: the KVM cases also run inside {', '.join(s.label for s in runs.specs)} "
            f"({', '.join(s.spec for s in runs.specs)})"]


class KernelRuns:
    """The kernels of this session: each booted once, by its first item."""

    def __init__(self, specs: list[KernelSpec], options: GuestOptions):
        self.specs = specs
        self.options = options
        self._lock = threading.Lock()
        self._bundle = None
        self.guests = {spec: GuestHost(spec, options, self.bundle) for spec in specs}

    def bundle(self):
        from ..remote.bundle import build_bundle
        with self._lock:
            if self._bundle is None:
                self._bundle = build_bundle()
            return self._bundle

    def ensure_started(self, session: pytest.Session, spec: KernelSpec) -> GuestHost:
        guest = self.guests[spec]
        with self._lock:
            if guest.cases:
                return guest
            ids = [item.case.id for item in session.items if isinstance(item, KernelCaseItem) and item.host == spec]
            guest.cases = list(dict.fromkeys(ids))
        guest.start_async(guest.cases)
        return guest

    def close(self) -> None:
        for guest in self.guests.values():
            guest.close()


# --- collection: every KVM case gets a twin per kernel ------------------------------------------

def _kvm_case(item: pytest.Item) -> CaseId | None:
    case = getattr(item, "case", None)  # a RemoteCaseItem (--apx-host) stands for its case too
    if not isinstance(case, CaseId):
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("apx_case") if callspec is not None else None
    return case if isinstance(case, CaseId) and case.backend == "kvm" else None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so both apply to the kernel items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    runs = kernels_of(config)
    if runs is None:
        return
    from ..faults import FAULTS
    from ..cases import BACKEND_FEATURES
    fault = FAULTS.get(config.getoption("apx_inject", None) or "")
    out, seen = [], set()
    for item in items:
        out.append(item)
        case = _kvm_case(item)
        if case is None or isinstance(item, KernelCaseItem):
            continue
        key = (item.parent.nodeid, item.originalname, case)
        if key in seen:
            continue
        seen.add(key)
        for spec in runs.specs:
            twin = KernelCaseItem.from_parent(item.parent, name=f"{item.originalname}[{spec.label}-{case.id}]",
                                              case=case, host=spec, origin=item)
            why = fault.why_not(case.backend, BACKEND_FEATURES[case.backend]) if fault else None
            if why:
                twin.add_marker(pytest.mark.skip(reason=f"{case.id}: --apx-inject {why}"))
            out.append(twin)
    items[:] = out


class KernelCaseItem(RemoteCaseItem):
    """One KVM case run inside a kernel under test; its outcome is the guest's."""

    def _remote(self) -> GuestHost:
        return kernels_of(self.config).guests[self.host]

    def setup(self) -> None:
        guest = kernels_of(self.config).ensure_started(self.session, self.host)
        error = _error_of(guest.wait_started)
        if error:
            self._save_artifacts(guest, None)
            if guest.unusable:
                apx_skip_or_fail(error, self.config)
            pytest.fail(error, pytrace=False)

    def runtest(self) -> None:
        try:
            super().runtest()
        finally:
            guest = self._remote()
            self._save_artifacts(guest, guest.results.get(self.case.id))

    def _attach(self, guest: GuestHost, result) -> None:
        release = guest.hello.get("kernel", "?")
        props = [("apx.kernel", release), ("apx.kernel.spec", self.host.spec),
                 ("apx.kernel.accel", guest.accel or "?"), ("apx.kernel.duration", f"{result.duration:.6f}")]
        if guest.tree is not None:
            props.append(("apx.kernel.image", str(guest.tree.image)))
        for key, value in sorted(result.facts.items()):
            if value is not None:
                props.append((f"apx.kernel.{key}", str(value)))
        self.user_properties += props
        lines = [f"kernel: {self.host.label} ({self.host.spec}); guest uname -r {release}, python "
                 f"{guest.hello.get('python', '?')}; {guest.accel_why}",
                 f"case: {result.id} {result.outcome} in {result.duration:.3f} s"]
        lines += [f"fact {k}: {v}" for k, v in sorted(result.facts.items())]
        if result.traceback:
            lines += ["guest traceback:", *result.traceback.rstrip().splitlines()]
        self.add_report_section("call", "apx kernel", "\n".join(lines))

    def _save_artifacts(self, guest: GuestHost, result) -> None:
        """The case's record and the guest's console into this item's artifacts folder,
        when it is one that will be kept (a failure, or --apx-keep-artifacts)."""
        from .reporting import _item_state, apx_keep_artifacts
        state = _item_state(self)
        if state.staging is None:
            return
        if result is not None and result.outcome == "pass" and not apx_keep_artifacts(self.config):
            return
        try:
            state.staging.mkdir(parents=True, exist_ok=True)
            if result is not None:
                (state.staging / "record.json").write_text(json.dumps(result.to_json(), indent=1, sort_keys=True))
            (state.staging / "console.log").write_text(guest.console_text())
            (state.staging / "records.jsonl").write_text(guest.records_text())
        except OSError:
            pass


# --- the end -----------------------------------------------------------------------------------------

def pytest_sessionfinish(session: pytest.Session) -> None:
    runs = kernels_of(session.config)
    if runs is not None:
        runs.close()


def pytest_unconfigure(config: pytest.Config) -> None:
    runs = kernels_of(config)
    if runs is not None:
        runs.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    runs = kernels_of(config)
    if runs is None:
        return
    started = [g for g in runs.guests.values() if g.cases]
    if not started:
        return
    terminalreporter.section("apx kernel")
    for guest in started:
        c = guest.counts()
        s = guest.seconds
        times = ", ".join(f"{k} {s[k]:.1f} s" for k in ("prepare", "boot", "cases", "total") if k in s)
        terminalreporter.write_line(
            f"{guest.label} ({guest.spec.spec}): {len(guest.results)}/{len(guest.cases)} cases reported "
            f"({c['pass']} passed, {c['fail']} failed, {c['skip']} skipped); guest uname -r "
            f"{guest.hello.get('kernel', '?')}, KVM supported XCR0 {guest.kvm_xcr0 or '?'}; {times}")
        terminalreporter.write_line(f"{guest.label}: {guest.accel_why or 'not started'}")
        if guest.start_error is not None:
            terminalreporter.write_line(str(guest.start_error))
        if guest.cleanup_note:
            terminalreporter.write_line(f"{guest.label}: {guest.cleanup_note}")
