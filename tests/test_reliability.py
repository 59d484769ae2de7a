"""Reliability: things that go wrong under the scenarios end with a one-line reason and
leave nothing behind.

Each failure mode is made for real: QEMU SIGKILLed between `migrate` and its completion,
gdb SIGKILLed while a register read is under way, a guest that never syncs, a guest that
triple-faults (KVM and QEMU), /dev/kvm missing, not a KVM device, or not permitted (a real
KVM device node with mode 000, opened from a thread without CAP_DAC_OVERRIDE: root would
open anything otherwise), and a missing QEMU binary.  Then the same modes run 50 times in
a row while our child processes (qemu-system-x86_64, gdb), open file descriptors, threads
and temp directories are counted before and after: no growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import stat
import tempfile
import threading
from typing import Callable

import pytest

from apx_tests import procfs
from apx_tests.backend import BackendError
from apx_tests.cases import CaseId, CaseRunner
from apx_tests.guests import boot, protocol
from apx_tests.guests.build import build_payload
from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.kvm.system import KvmUnavailable
from apx_tests.qemu import gdb as gdbmod
from apx_tests.qemu.backend import QemuBackend
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.host import kept_gdb_pids
from apx_tests.qemu.spec import our_temp_dirs
from apx_tests.scenarios import Run
from apx_tests.xsave import BANKS

SPIN = bytes.fromhex("ebfe")   # jmp .   at CPL3: never syncs
UD2 = bytes.fromhex("0f0b")    # #UD with no IDT: triple fault
KVM_DEVICE = os.makedev(10, 232)
YMM = BANKS["ymm"]


def _one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# --- the failure modes: each returns the one-line reason it ended with -------------------------

def _kvm_host_or_skip() -> KvmHost:
    try:
        return KvmHost()
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")


def _qemu_backend(accel: str = "tcg", *, stage_timeout: float | None = None, payload: bytes | None = None):
    try:
        backend = QemuBackend(accel)
    except QemuUnavailable as exc:
        pytest.skip(f"QEMU unavailable: {exc}")
    backend.layout  # the probe boot, with the normal timeouts
    if stage_timeout is not None:
        # Machines of this payload keep the normal QMP/start timeouts (their spec is made
        # now); only the wait for a stage is short.
        backend.host.spec(str(boot.build_boot_image(payload).path))
        backend.host.timeout = stage_timeout
    return backend


def qemu_killed_mid_migrate() -> str:
    backend = _qemu_backend()
    try:
        with Run(backend, YMM, build_payload("ymm").code) as run:
            session = run.start()
            session.run_to(protocol.STAGE_STARTED)
            machine, qmp = session.machine, session.machine.qmp

            def kill_after_migrate(command, **args):
                result = qmp(command, **args)
                if command == "migrate":  # the migration is under way: kill QEMU now
                    os.kill(machine.pid, signal.SIGKILL)
                return result

            machine.qmp = kill_after_migrate
            with pytest.raises(BackendError) as err:
                session.export()
    finally:
        backend.host.close()
    return str(err.value)


@contextlib.contextmanager
def _gdb_killed_on(prefix: str):
    """gdb is SIGKILLed as it is asked for register values (the read then dies midway)."""
    original = gdbmod.GdbSession.command

    def command(self, mi, **kw):
        if mi.startswith(prefix) and self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
        return original(self, mi, **kw)

    gdbmod.GdbSession.command = command
    try:
        yield
    finally:
        gdbmod.GdbSession.command = original


def gdb_killed_mid_read() -> str:
    backend = _qemu_backend()
    try:
        with Run(backend, YMM, build_payload("ymm").code) as run:
            session = run.start()
            session.run_to(protocol.STAGE_STARTED)
            with _gdb_killed_on("-data-list-register-values"), pytest.raises(BackendError) as err:
                session.gdb_view()
            assert session.machine.running  # QEMU outlives its debugger; Run.close() ends it
    finally:
        backend.host.close()
    return str(err.value)


def kvm_hang() -> str:
    host = _kvm_host_or_skip()
    try:
        with Run(KvmBackend(host, timeout=0.2), YMM, SPIN) as run:
            with pytest.raises(BackendError) as err:
                run.start().run_to(protocol.STAGE_STARTED)
    finally:
        host.close()
    return str(err.value)


def qemu_hang() -> str:
    backend = _qemu_backend(stage_timeout=0.4, payload=SPIN)
    try:
        with Run(backend, YMM, SPIN) as run:
            with pytest.raises(BackendError) as err:
                run.start().run_to(protocol.STAGE_STARTED)
    finally:
        backend.host.close()
    return str(err.value)


def _case_failure(case_id: str, **runner_args) -> str:
    with CaseRunner(**runner_args) as runner:
        reason = runner.unavailable(CaseId.parse(case_id))
        if reason:
            pytest.skip(reason)
        result = runner.run(case_id)
    assert result.outcome == "fail" and result.traceback is None, result
    assert len(result.lines) == 1
    return result.lines[0]


def kvm_triple_fault() -> str:
    return _case_failure("kvm-ymm-export", payload=lambda bank: UD2)


def qemu_triple_fault() -> str:
    return _case_failure("qemu-tcg-ymm-export", payload=lambda bank: UD2)


def kvm_missing() -> str:
    with pytest.raises(KvmUnavailable) as err:
        KvmHost(path="/nonexistent/kvm")
    return str(err.value)


def kvm_not_a_device() -> str:
    with tempfile.NamedTemporaryFile(prefix="apx-rel-") as fh, pytest.raises(KvmUnavailable) as err:
        KvmHost(path=fh.name)
    return str(err.value)


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _without_dac_override(fn: Callable[[], object]):
    """Run fn in a thread whose effective capabilities lack DAC override (capabilities are
    per thread on Linux: the rest of the process keeps its own); its result or exception."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict = {}

    def body():
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
        if libc.capget(ctypes.byref(header), data) != 0:
            box["error"] = OSError(ctypes.get_errno(), "capget")
            return
        data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
        if libc.capset(ctypes.byref(header), data) != 0:
            box["error"] = OSError(ctypes.get_errno(), "capset")
            return
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name="apx-no-dac-override")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def kvm_not_permitted() -> str:
    with tempfile.TemporaryDirectory(prefix="apx-rel-") as tmp:
        node = os.path.join(tmp, "kvm")
        try:
            os.mknod(node, stat.S_IFCHR | 0o000, KVM_DEVICE)  # the real KVM device, mode 000
        except PermissionError:
            open(node, "w").close()  # not root: an ordinary file with mode 000 says the same
            os.chmod(node, 0)
        with pytest.raises(KvmUnavailable) as err:
            _without_dac_override(lambda: KvmHost(path=node))
    return str(err.value)


def qemu_missing() -> str:
    with CaseRunner(qemu="/nonexistent/qemu-system-x86_64") as runner:
        result = runner.run("qemu-tcg-ymm-export")
    assert result.outcome == "skip" and len(result.lines) == 1, result
    with pytest.raises(QemuUnavailable) as err:
        QemuBackend("tcg", qemu="/nonexistent/qemu-system-x86_64")
    assert str(err.value) in result.lines[0]
    return result.lines[0]


MODES: dict[str, tuple[Callable[[], str], tuple[str, ...]]] = {
    "qemu_killed_mid_migrate": (qemu_killed_mid_migrate, ("qemu-tcg ymm:", "killed by SIGKILL", "migrate")),
    "gdb_killed_mid_read": (gdb_killed_mid_read, ("qemu-tcg ymm: gdb view:", "-data-list-register-values")),
    "kvm_hang": (kvm_hang, ("kvm ymm: guest hung: no sync within 0.2 s", "last stage none")),
    "qemu_hang": (qemu_hang, ("qemu-tcg ymm: no '0' on debugcon within 0.4 s", "waiting for stage 0")),
    "kvm_triple_fault": (kvm_triple_fault, ("kvm-ymm-export: kvm ymm:", "SHUTDOWN")),
    # "qemu-tcg ymm:" with one QEMU, "qemu10-tcg ymm:" where ci/bootstrap added a side QEMU.
    "qemu_triple_fault": (qemu_triple_fault, ("qemu-tcg-ymm-export: qemu", "-tcg ymm:", "triple-fault")),
    "kvm_missing": (kvm_missing, ("/nonexistent/kvm: No such file or directory",)),
    "kvm_not_a_device": (kvm_not_a_device, ("not a KVM device", "Inappropriate ioctl for device")),
    "kvm_not_permitted": (kvm_not_permitted, ("/kvm: Permission denied",)),
    "qemu_missing": (qemu_missing, ("qemu-tcg-ymm-export: qemu-tcg backend unavailable: "
                                    "/nonexistent/qemu-system-x86_64: not an executable file",)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_failure_ends_with_one_line(mode):
    run, wanted = MODES[mode]
    message = _one_line(run())
    for text in wanted:
        assert text in message, message


def test_a_real_kvm_node_opens_with_dac_override():
    """The control of kvm_not_permitted: the same mode-000 node is the real KVM (root with
    CAP_DAC_OVERRIDE opens it), so only the permission made the difference."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mknod)")
    _kvm_host_or_skip().close()
    with tempfile.TemporaryDirectory(prefix="apx-rel-") as tmp:
        node = os.path.join(tmp, "kvm")
        os.mknod(node, stat.S_IFCHR | 0o000, KVM_DEVICE)
        host = KvmHost(path=node)
        try:
            assert host.supported_xcr0 & 0x3 == 0x3
        finally:
            host.close()


# --- nothing left behind ---------------------------------------------------------------------

def _children() -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every descendant process of this one, zombies included, but
    the gdbs live QEMU hosts keep between views on purpose (the plugin's hosts keep theirs
    until the session ends when the suite runs in this process)."""
    kept = kept_gdb_pids()
    return [(p.pid, p.comm, p.state) for p in procfs.descendants() if p.pid not in kept]


def _resources() -> dict:
    gc.collect()
    return {
        "children": sorted(_children()),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "temp_dirs": our_temp_dirs(),
    }


RUNS = 50


def test_fifty_failures_leak_nothing():
    for run, _ in MODES.values():  # warm up: imports, caches, the boot images
        run()
    before = _resources()
    assert not [c for c in before["children"] if c[1].startswith(("qemu-system", "gdb"))], before
    names = list(MODES)
    for i in range(RUNS):
        run, wanted = MODES[names[i % len(names)]]
        message = _one_line(run())
        assert wanted[0] in message, message
    after = _resources()
    assert after["children"] == before["children"], after["children"]
    assert after["fds"] <= before["fds"], (before["fds"], after["fds"], os.listdir("/proc/self/fd"))
    assert after["threads"] <= before["threads"]
    assert after["temp_dirs"] == before["temp_dirs"]
