"""apx_tests.qemu.gdb against real QEMU 10 processes (TCG and, where /dev/kvm opens, KVM).

No mocks: every test starts its own ``qemu-system-x86_64 -machine microvm`` with QMP and
the gdbstub on Unix sockets in a private 0700 temp dir, and kills/reaps it afterwards.

Two guest states are used:

* *reset*: ``-S`` and no kernel; the vCPU sits at the reset vector in real mode.
* *long mode*: the project's multiboot boot stub (apx_tests.guests.boot: 64-bit mode,
  XCR0 = x87|SSE|AVX) entering a payload assembled here from ``GUEST_S`` (llvm-mc,
  apx_tests.guests.build) that loads known values into rbx and r8-r15 and spins on a
  ``go`` word; ``go = 1`` makes it load ymm5 and two x87 values and spin again
  (stage 2 is exercised under TCG only).

The helpers here (``QemuVm``, ``build_guest``, fixtures) are also used by
tests/test_qemu_hmp.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from apx_tests import procfs
from apx_tests.qemu.host import kept_gdb_pids
from apx_tests.guests import boot
from apx_tests.guests.build import GuestBuildError, assemble_object, flat_code
from apx_tests.qemu.gdb import GDB_MISSING, GdbError, GdbSession
from apx_tests.qemu.hmp import hmp_command, parse_info_registers, read_info_registers

QEMU = shutil.which("qemu-system-x86_64")
QBOOT = "/usr/share/qemu/qboot.rom"
GDB = shutil.which("gdb")


def _kvm_cpu() -> str:
    """`-cpu host`, or `host,-arch-capabilities` where this QEMU's -cpu host aborts here
    ("failed to set MSR 0x10a", IA32_ARCH_CAPABILITIES: QEMU 10 on this machine's nested
    PVM KVM); decided by one start of this QEMU (apx_tests.qemu.spec.kvm_cpu_model)."""
    from apx_tests.qemu.spec import kvm_cpu_model
    return kvm_cpu_model(QEMU).cpu

# Every process and temp dir these tests create, for the leak checks.
SPAWNED_PIDS: list[int] = []
TEMP_DIRS: list[str] = []

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (ci/bootstrap installs it)"),
    pytest.mark.skipif(not os.path.exists(QBOOT), reason=f"{QBOOT} missing (package qemu-system-data)"),
]


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm does not open")),
]


# ---------------------------------------------------------------------------
# QEMU process

class QemuVm:
    """One QEMU process with QMP and gdbstub on Unix sockets in a private temp dir."""

    def __init__(self, accel: str, kernel: str | None = None):
        self.accel = accel
        self.dir = tempfile.mkdtemp(prefix="apx-qemu-test-")
        TEMP_DIRS.append(self.dir)
        os.chmod(self.dir, 0o700)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.gdb_path = os.path.join(self.dir, "gdb.sock")
        self.log_path = os.path.join(self.dir, "qemu.log")
        cpu = "max" if accel == "tcg" else _kvm_cpu()
        self.argv = [QEMU, "-machine", "microvm", "-bios", QBOOT, "-nodefaults", "-display", "none",
                     "-no-user-config", "-S", "-m", "16", "-accel", accel, "-cpu", cpu,
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                     "-gdb", f"unix:{self.gdb_path},server=on,wait=off"]
        if kernel:
            self.argv += ["-kernel", kernel]
        self.proc: subprocess.Popen | None = None
        self.qmp = None
        self.sessions: list[GdbSession] = []

    def start(self) -> "QemuVm":
        from qemu.qmp.legacy import QEMUMonitorProtocol

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        SPAWNED_PIDS.append(self.proc.pid)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.qmp_path) and os.path.exists(self.gdb_path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU sockets did not appear in 10 s: {self.log()}")
            time.sleep(0.005)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()
        return self

    def log(self) -> str:
        try:
            return " | ".join(Path(self.log_path).read_text(errors="replace").split("\n")[-5:])
        except OSError:
            return "(no log)"

    def status(self) -> str:
        return self.qmp.cmd("query-status")["status"]

    def hmp(self, command: str) -> str:
        return hmp_command(self.qmp, command)

    def registers(self) -> dict[str, bytes]:
        return parse_info_registers(read_info_registers(self.qmp))

    def read_u32(self, addr: int) -> int:
        """Guest-physical u32 through HMP ``xp`` (no gdb involved)."""
        out = self.hmp(f"xp /1wx {addr:#x}")
        return int(out.split(":")[1].split()[0], 16)

    def gdb(self, **kw) -> GdbSession:
        session = GdbSession(self.gdb_path, **kw)
        self.sessions.append(session)
        session.connect()
        if session.pid:
            SPAWNED_PIDS.append(session.pid)
        return session

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


# ---------------------------------------------------------------------------
# The long-mode guest

# The payload the project's boot stub (guests/boot/multiboot.S, apx_tests.guests.boot)
# enters at CPL3 in 64-bit mode, with XCR0 = 7 (build_boot_image(..., xcr0=7)).  `marker`
# and `go` sit at fixed offsets from the payload's start (PAYLOAD_ADDR).
MARKER_OFFSET, GO_OFFSET = 8, 12
GUEST_S = rf"""
        .text
        jmp     start
        .org {MARKER_OFFSET}
marker: .long 0
        .org {GO_OFFSET}
go:     .long 0
start:
        movabsq $0x0123456789abcdef, %rbx
        movabsq $0x8888888888888801, %r8
        movabsq $0x9999999999999902, %r9
        movabsq $0xaaaaaaaaaaaaaa03, %r10
        movabsq $0xbbbbbbbbbbbbbb04, %r11
        movabsq $0xcccccccccccccc05, %r12
        movabsq $0xdddddddddddddd06, %r13
        movabsq $0xeeeeeeeeeeeeee07, %r14
        movabsq $0xfedcba9876543210, %r15
        movl $1, marker(%rip)
1:      cmpl $0, go(%rip)                # touches no register but rip/rflags
        jne 2f
        pause
        jmp 1b
2:      vmovdqu ymm_pattern(%rip), %ymm5
        fninit
        fldt x87_a(%rip)
        fldt x87_b(%rip)                 # ST0 = b, ST1 = a, TOP = 6
        movl $2, marker(%rip)
3:      pause                            # CPL3: no hlt; spin until QMP stop
        jmp 3b
        .p2align 4
ymm_pattern:
        .byte 0x40,0x41,0x42,0x43,0x44,0x45,0x46,0x47,0x48,0x49,0x4a,0x4b,0x4c,0x4d,0x4e,0x4f
        .byte 0x50,0x51,0x52,0x53,0x54,0x55,0x56,0x57,0x58,0x59,0x5a,0x5b,0x5c,0x5d,0x5e,0x5f
x87_a:  .byte 0x11,0x22,0x33,0x44,0x55,0x66,0x77,0x88,0x01,0x40
        .p2align 1
x87_b:  .byte 0xa1,0xa2,0xa3,0xa4,0xa5,0xa6,0xa7,0xc8,0xfe,0xbf
"""

GUEST_GPRS = {
    "rbx": 0x0123456789ABCDEF, "r8": 0x8888888888888801, "r9": 0x9999999999999902,
    "r10": 0xAAAAAAAAAAAAAA03, "r11": 0xBBBBBBBBBBBBBB04, "r12": 0xCCCCCCCCCCCCCC05,
    "r13": 0xDDDDDDDDDDDDDD06, "r14": 0xEEEEEEEEEEEEEE07, "r15": 0xFEDCBA9876543210,
}
GUEST_YMM5 = bytes(range(0x40, 0x60))
GUEST_ST0 = bytes.fromhex("a1a2a3a4a5a6a7c8febf")   # x87_b, loaded last
GUEST_ST1 = bytes.fromhex("11223344556677880140")   # x87_a


@dataclass(frozen=True)
class Guest:
    path: str
    marker: int
    go: int


def build_guest(directory: Path) -> Guest:
    """GUEST_S assembled with the project's builder (llvm-mc) and appended to the boot stub."""
    src = directory / "guest.S"
    src.write_text(GUEST_S)
    try:
        code = flat_code(assemble_object(src), src)
        image = boot.build_boot_image(code, xcr0=0x7)  # x87 | SSE | AVX
    except GuestBuildError as exc:
        pytest.skip(f"cannot build the long-mode test guest: {exc}")
    base = image.stub["PAYLOAD_ADDR"]
    return Guest(str(image.path), base + MARKER_OFFSET, base + GO_OFFSET)


@pytest.fixture(scope="session")
def guest(tmp_path_factory) -> Guest:
    return build_guest(tmp_path_factory.mktemp("qemu-guest"))


# ---------------------------------------------------------------------------
# fixtures

@pytest.fixture(params=ACCELS)
def accel(request) -> str:
    return request.param


@pytest.fixture
def vm(accel):
    """A VM at the reset vector (``-S``, no kernel): real mode, XCR0 = 1."""
    machine = QemuVm(accel)
    try:
        yield machine.start()
    finally:
        machine.close()


def start_long_mode(accel: str, guest: Guest) -> QemuVm:
    """A VM whose guest reached its spin loop in 64-bit mode; left paused (QMP stop)."""
    machine = QemuVm(accel, kernel=guest.path)
    try:
        machine.start()
        machine.qmp.cmd("cont")
        wait_for(lambda: machine.read_u32(guest.marker) == 1, "the guest to reach 64-bit mode")
        machine.qmp.cmd("stop")
        return machine
    except BaseException:
        machine.close()
        raise


@pytest.fixture
def long_vm(accel, guest):
    machine = start_long_mode(accel, guest)
    try:
        yield machine
    finally:
        machine.close()


def run_stage2(machine: QemuVm, guest: Guest) -> None:
    """Release the guest (go = 1): it loads ymm5 and ST0/ST1 (TOP = 6) and spins. TCG only."""
    assert machine.accel == "tcg", "stage 2 (AVX/x87) is exercised under TCG only"
    with machine.gdb() as g:
        g.write_memory(guest.go, (1).to_bytes(4, "little"))
        g.detach()                                       # resumes the VM
    wait_for(lambda: machine.read_u32(guest.marker) == 2, "the guest to load ymm5 and x87")
    machine.qmp.cmd("stop")


@pytest.fixture
def stage2_vm(guest):
    machine = start_long_mode("tcg", guest)
    try:
        run_stage2(machine, guest)
        yield machine
    finally:
        machine.close()


XMM3 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")   # 16 distinct bytes


# ---------------------------------------------------------------------------
# what the stub offers

def test_register_names_and_features(vm):
    with vm.gdb() as g:
        names = g.register_names()
        features = g.features()
        target = g.target_registers()
    for n in [f"xmm{i}" for i in range(16)] + [f"st{i}" for i in range(8)] + ["rax", "r15", "rip", "mxcsr"]:
        assert n in names, n
    assert "" not in names
    # QEMU 10: one feature holds everything; no AVX/AVX-512/APX registers at all.
    assert features == {"org.gnu.gdb.i386.core"}
    assert not [n for n in names if re.fullmatch(r"(ymm|zmm)\d+h?|k[0-7]|r(1[6-9]|2\d|3[01])", n)]
    assert target["st0"].bitsize == 80 and target["xmm0"].bitsize == 128 and target["rax"].bitsize == 64
    assert target["xmm0"].regnum == 49 and target["st0"].regnum == 33     # remote numbers (P packets)


def test_unknown_register_names_the_gap(vm):
    with vm.gdb() as g:
        with pytest.raises(GdbError) as e:
            g.read_registers(["ymm0"])
    msg = str(e.value)
    assert "ymm0" in msg and "10.0 and 11.1 alike" in msg and vm.gdb_path in msg and "\n" not in msg


# ---------------------------------------------------------------------------
# stop/resume semantics

def test_attach_at_prelaunch_keeps_it_and_detach_starts_the_vm(vm):
    assert vm.status() == "prelaunch"
    g = vm.gdb()
    assert vm.status() == "prelaunch"          # attaching to a -S VM changes nothing visible ...
    assert g.stop_record and g.stop_record["frame"]["addr"] == "0x000000000000fff0"
    g.detach()
    assert vm.status() == "running"            # ... but detaching starts it, like QMP cont
    g.close()


def test_attach_stops_a_running_vm_and_killing_gdb_keeps_it_stopped(vm):
    vm.qmp.cmd("cont")
    assert vm.status() == "running"
    g = vm.gdb()
    assert vm.status() == "paused"
    g.close()                                  # SIGKILL: the socket closes without a detach
    time.sleep(0.2)
    assert vm.status() == "paused"
    vm.qmp.cmd("cont")
    assert vm.status() == "running"


def test_attach_keeps_a_qmp_stopped_vm_stopped_and_detach_resumes_it(vm):
    vm.qmp.cmd("cont")
    vm.qmp.cmd("stop")
    assert vm.status() == "paused"
    g = vm.gdb()
    assert vm.status() == "paused"
    g.detach()                                 # resumes although QMP stopped it
    assert vm.status() == "running"
    g.close()


def test_qmp_cont_while_attached_runs_the_vm(vm):
    g = vm.gdb()
    vm.qmp.cmd("cont")
    assert vm.status() == "running"            # QMP does not ask gdb; gdb's view is stale now
    g.close()
    assert vm.status() == "running"


# ---------------------------------------------------------------------------
# registers and memory

def test_write_read_xmm3_and_rax_at_reset(vm):
    with vm.gdb() as g:
        g.write_register("xmm3", XMM3)
        # Real mode: QEMU keeps only the low 32 bits of a GPR write; verify says so.
        with pytest.raises(GdbError, match=r"rax .*did not stick"):
            g.write_register("rax", (0x1122334455667788).to_bytes(8, "little"))
        g.write_register("rax", (0x55667788).to_bytes(8, "little"))
        got = g.read_registers(["xmm3", "rax", "r8", "rip"])
        assert got["xmm3"] == XMM3
        assert got["rax"] == (0x55667788).to_bytes(8, "little")
        assert got["rip"] == (0xFFF0).to_bytes(8, "little")
        hmp = vm.registers()
    assert hmp["xmm3"] == XMM3
    assert hmp["eax"] == (0x55667788).to_bytes(4, "little")
    assert "rax" not in hmp and "ymm3" not in hmp          # 32-bit format, XMM lines only


def test_write_read_xmm3_and_rax_in_long_mode(long_vm):
    rax = (0x1122334455667788).to_bytes(8, "little")
    with long_vm.gdb() as g:
        g.write_register("xmm3", XMM3)
        g.write_register("rax", rax)
        got = g.read_registers(["xmm3", "rax", *GUEST_GPRS])
    assert got["xmm3"] == XMM3 and got["rax"] == rax
    for name, value in GUEST_GPRS.items():
        assert got[name] == value.to_bytes(8, "little"), name
    hmp = long_vm.registers()
    assert hmp["rax"] == rax
    assert hmp["xmm3"] == XMM3
    assert hmp["ymm3"] == XMM3 + bytes(16)        # gdb cannot see or touch the upper half


def test_written_state_across_resume(long_vm, record_property):
    """gdb writes go into QEMU's CPU state; what survives a resume depends on the accelerator.

    TCG runs on that state directly: everything survives.  KVM: QEMU puts the state
    back with KVM_SET_REGS (rax always survives) and KVM_SET_XSAVE, whose XSTATE_BV is
    QEMU's ``env->xstate_bv`` as last read from KVM -- the gdbstub does not set bits in
    it.  A component whose bit is 0 is restored in its init state, so a gdb-written
    x87 (st7) or SSE (xmm3, mxcsr) value is silently dropped.  This guest never used
    x87/SSE; measured here, env.xstate_bv at the stop was 0x0 or 0x2 (bit 0 never, bit 1
    about half the time), so each component either keeps the written value or comes
    back in its init state, never anything else.
    """
    rax = (0xA5A5A5A55A5A5A5A).to_bytes(8, "little")
    st7 = bytes.fromhex("0102030405060788ff3f")
    mxcsr = (0x1F81).to_bytes(4, "little")
    with long_vm.gdb() as g:
        g.write_register("xmm3", XMM3)
        g.write_register("rax", rax)
        g.write_register("st7", st7)
        g.write_register("mxcsr", mxcsr)
        g.detach()
    assert long_vm.status() == "running"
    time.sleep(0.05)                               # let the guest spin with the new state
    long_vm.qmp.cmd("stop")
    with long_vm.gdb() as g:
        got = g.read_registers(["xmm3", "rax", "r15", "st7", "mxcsr"])
    assert got["rax"] == rax
    assert got["r15"] == GUEST_GPRS["r15"].to_bytes(8, "little")
    hmp = long_vm.registers()
    assert hmp["xmm3"] == got["xmm3"] and hmp["st7"] == got["st7"]
    sse = (got["xmm3"], got["mxcsr"])
    if long_vm.accel == "tcg":
        assert sse == (XMM3, mxcsr) and got["st7"] == st7
    else:
        assert sse in [(XMM3, mxcsr), (bytes(16), (0x1F80).to_bytes(4, "little"))], sse
        assert got["st7"] in (st7, bytes(10))
        record_property("kvm_sse_write_survived", sse[0] == XMM3)
        record_property("kvm_x87_write_survived", got["st7"] == st7)


def test_memory_roundtrip(vm):
    data = bytes((i * 37 + 11) & 0xFF for i in range(64))
    with vm.gdb() as g:
        g.write_memory(0x3000, data)
        assert g.read_memory(0x3000, len(data)) == data
        assert g.read_memory(0x3000 + 5, 7) == data[5:12]
    # cross-check through QMP/HMP, no gdb involved
    out = vm.hmp("xp /8bx 0x3000")
    assert bytes(int(tok, 16) for tok in out.split(":")[1].split()) == data[:8]


def test_read_all_registers_sizes(vm):
    with vm.gdb() as g:
        regs = g.read_registers()
    assert len(regs) == 66
    assert {len(regs[f"st{i}"]) for i in range(8)} == {10}
    assert {len(regs[f"xmm{i}"]) for i in range(16)} == {16}
    assert len(regs["rax"]) == 8 and len(regs["eflags"]) == 4 and len(regs["mxcsr"]) == 4
    assert regs["mxcsr"] == (0x1F80).to_bytes(4, "little") and regs["fctrl"] == (0x37F).to_bytes(4, "little")


def test_x87_reads_are_top_relative_but_writes_are_physical(stage2_vm):
    """QEMU 10's stub reads stN as ST(N) (relative to TOP) but writes physical register N."""
    with stage2_vm.gdb() as g:
        got = g.read_registers(["st0", "st1", "fstat", "xmm5"])
        assert got["st0"] == GUEST_ST0 and got["st1"] == GUEST_ST1
        assert (int.from_bytes(got["fstat"], "little") >> 11) & 7 == 6
        assert got["xmm5"] == GUEST_YMM5[:16]
        new = bytes.fromhex("01020304050607880040")
        with pytest.raises(GdbError, match=r"st0 .*did not stick"):
            g.write_register("st0", new)
        after = g.read_registers(["st0", "st2"])
        assert after["st0"] == GUEST_ST0           # ST(0) = physical R6: unchanged
        assert after["st2"] == new                 # physical R0 = ST((0 - 6) & 7) = ST(2)
    hmp = stage2_vm.registers()
    assert hmp["st0"] == GUEST_ST0 and hmp["st2"] == new


def test_write_register_rejects_wrong_size(vm):
    with vm.gdb() as g:
        with pytest.raises(GdbError, match="xmm3: 8 bytes given, the register has 16"):
            g.write_register("xmm3", bytes(8))
        # st at TOP = 0 (reset): physical == relative, the raw 80-bit write sticks
        g.write_register("st7", bytes.fromhex("0102030405060788ff3f"))
        assert g.read_registers(["st7"])["st7"] == bytes.fromhex("0102030405060788ff3f")


# ---------------------------------------------------------------------------
# errors, transcript, timing

def test_gdb_missing(tmp_path):
    with pytest.raises(GdbError) as e:
        GdbSession(tmp_path / "none.sock", gdb="gdb-that-does-not-exist-here").connect()
    assert str(e.value) == GDB_MISSING


def test_socket_missing(tmp_path):
    sock = tmp_path / "no-such.sock"
    with pytest.raises(GdbError) as e:
        GdbSession(sock).connect()
    assert str(sock) in str(e.value) and "\n" not in str(e.value)


def test_qemu_dies_mid_session(vm):
    g = vm.gdb(timeout=5)
    g.read_registers(["rax"])
    vm.proc.kill()
    vm.proc.wait()
    with pytest.raises(GdbError) as e:
        g.read_registers(["xmm0", "xmm1"])
    msg = str(e.value)
    assert vm.gdb_path in msg and "read_registers xmm0,xmm1" in msg and "\n" not in msg
    pid = g.pid
    g.close()
    assert g.pid is None and not _alive(pid)


def test_stale_socket_after_qemu_exit(vm):
    vm.proc.kill()
    vm.proc.wait()                                 # the socket file stays behind
    g = GdbSession(vm.gdb_path, timeout=5)
    with pytest.raises(GdbError, match="Connection refused") as e:  # refused, not timed out
        g.connect()
    assert vm.gdb_path in str(e.value)
    assert g.pid is None                           # the failed attach killed its gdb


def test_second_client_waits_and_its_queued_connection_stops_the_vm(vm):
    """QEMU's gdbstub serves one client; a second connect is queued, times out here, and
    when QEMU later accepts the dead queued connection, that attach stops the VM."""
    first = vm.gdb()
    second = GdbSession(vm.gdb_path, timeout=1.5)
    with pytest.raises(GdbError, match="another gdb attached") as e:
        second.connect()
    assert "-target-select" in str(e.value) and second.pid is None
    second.close()
    assert first.read_registers(["rip"])["rip"] == (0xFFF0).to_bytes(8, "little")
    first.detach()                                 # resumes ... then the queued connection is accepted
    wait_for(lambda: vm.status() == "paused", "the queued gdb connection to stop the VM", timeout=5)
    first.close()


def test_reattach_after_detach(vm):
    g = vm.gdb()
    g.detach()
    assert vm.status() == "running" and not g.connected
    g.connect()                                    # same gdb process, new attach: stops it again
    assert g.connected and vm.status() == "paused"
    assert len(g.read_registers(["rip"])["rip"]) == 8
    g.close()


def test_gdb_dies_mid_session(vm):
    g = vm.gdb(timeout=5)
    pid = g.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GdbError) as e:
        g.read_registers(["xmm0"])
    msg = str(e.value)
    assert "gdb exited" in msg or "cannot write" in msg, msg
    assert vm.gdb_path in msg and "\n" not in msg
    assert g.pid is None and not _alive(pid)
    g.close()
    assert vm.status() == "prelaunch"          # the VM is untouched


def test_transcript_written(vm, tmp_path):
    path = tmp_path / "gdb-transcript.json"
    with vm.gdb(transcript_path=path) as g:
        g.read_registers(["xmm0"])
    data = json.loads(path.read_text())
    commands = [c["command"] for c in data["commands"]]
    assert data["socket"] == vm.gdb_path
    assert any(c.startswith("-target-select remote") for c in commands)
    assert any(c.startswith("-data-list-register-values r") for c in commands)
    assert all(c["seconds"] is not None for c in data["commands"])


# ---------------------------------------------------------------------------
# leaks (keep last)

def _alive(pid: int | None) -> bool:
    """True while ``pid`` is a gdb/QEMU process (a zombie counts: it was never reaped)."""
    proc = None if pid is None else procfs.stat(pid)
    return proc is not None and proc.comm.startswith(("gdb", "qemu-system"))


def children_named(*names: str) -> list[tuple[int, str]]:
    """Our children by name, but the gdbs QEMU hosts keep between views on purpose (those of
    the plugin's hosts live until the session ends when the suite runs in this process)."""
    kept = kept_gdb_pids()
    return [(p.pid, p.comm) for p in procfs.children() if p.comm.startswith(names) and p.pid not in kept]


def test_zz_no_leftover_processes_or_dirs():
    if not SPAWNED_PIDS:
        pytest.skip("no QEMU was started in this run (tests deselected or skipped)")
    assert [p for p in SPAWNED_PIDS if _alive(p)] == []
    assert children_named("gdb", "qemu-system") == []
    assert [d for d in TEMP_DIRS if os.path.exists(d)] == []
