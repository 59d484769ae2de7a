"""apx_tests.qemu.linux_session: a Linux register holder snapshotted and restored in QEMU TCG.

Without QEMU: the skip reasons, the flip targets, Snapshot's findings naming register and
byte, the Machine's console arguments.  With QEMU and the cached Debian kernel (skipped
with the one-line reason otherwise):

- one ymm run: boot to the ready line, stop inside the spin loop, snapshot, both observers
  equal pattern(1), the booted QEMU is gone; a fresh QEMU restores it and the holder says
  ok; the snapshot with ymm13 byte 21 flipped makes the guest say not ok naming it; the
  snapshot rewritten to pattern(2) makes it name ymm0 byte 0 with pattern(2)'s value;
- the one-line errors of each phase: QEMU died (a guest that powers off before any ready
  line, a truncated stream), holder never ready, console result missing;
- nothing left behind after any of these: every QEMU reaped (/proc), every private
  directory removed.

The apx-marked matrix (every bank, the edit path, the context-switch pair) is
apx_tests/suite/test_linux.py.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from apx_tests import procfs
from apx_tests.guests import build, linux, linux_kernel, linux_programs
from apx_tests.guests.linux_kernel import KernelUnavailable
from apx_tests.qemu import linux_session
from apx_tests.qemu.linux_accel import unavailable_reason
from apx_tests.qemu.linux_session import LinuxHolderRun, LinuxSessionError, Snapshot, StopPoint, flip_target
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.spec import MachineSpec, find_qemu, our_temp_dirs
from apx_tests.xsave import BANKS


# --- no QEMU ----------------------------------------------------------------------------------


def test_unavailable_reasons_under_tcg():
    for bank in ("xmm", "ymm", "x87"):
        assert unavailable_reason(bank, "tcg") is None
    apx = unavailable_reason("apx", "tcg")
    assert "TCG does not emulate APX" in apx and "APX_F" in apx
    for bank in ("opmask", "zmm_hi256", "hi16_zmm"):
        why = unavailable_reason(bank, "tcg")
        assert why.startswith("QEMU TCG never emulates AVX-512") and "0xe0" in why
    assert unavailable_reason("apx", "kvm") is None  # the guest decides there
    assert unavailable_reason("pkru", "tcg") is None  # -cpu max has PKU; Linux enables PKE
    assert "no Linux register holder" in unavailable_reason("nosuchbank", "tcg")
    for why in filter(None, (unavailable_reason(b) for b in BANKS)):
        assert "\n" not in why


def _fake_bzimage(path: Path, release: str, image: bytes) -> Path:
    """A bzImage as far as the boot protocol header goes: setup, version string, gzip payload."""
    import gzip
    import struct
    data = bytearray(2 * 512)  # setup_sects = 1: the payload area starts at 1024
    data[0x1F1] = 1
    data[0x202:0x206] = b"HdrS"
    version = f"{release} (builder@invalid) #1 SMP".encode() + b"\0"
    data[0x300:0x300 + len(version)] = version
    struct.pack_into("<H", data, 0x20E, 0x300 - 0x200)
    payload = gzip.compress(image) + struct.pack("<I", len(image))
    struct.pack_into("<II", data, 0x248, 0, len(payload))
    path.write_bytes(bytes(data) + payload)
    return path


@pytest.mark.parametrize("knows_apx", [False, True])
def test_the_apx_reason_names_the_qemu_and_kernel_that_would_run(tmp_path, monkeypatch, knows_apx):
    """Read from what is there, nothing written in: QEMU's --version, the kernel's header
    version string, and whether its image names XSAVE component 19."""
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 99.7.3 (fake)'\n")
    qemu.chmod(0o755)
    names = b"AVX-512 opmask\0AMX Tile data\0" + (b"APX registers\0" if knows_apx else b"")
    kernel = _fake_bzimage(tmp_path / "vmlinuz-fake", "7.3.0-1-cloud-amd64", b"\0" * 4096 + names)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert linux_kernel.kernel_release(kernel) == "7.3.0-1-cloud-amd64"
    assert linux_kernel.kernel_knows_apx(kernel) is knows_apx
    why = unavailable_reason("apx", "tcg", qemu=str(qemu), kernel=kernel)
    assert why.startswith("QEMU 99.7.3 TCG does not emulate APX (-cpu max has no APX_F")
    if knows_apx:
        assert why.endswith("(guest kernel 7.3.0-1-cloud-amd64 does support APX state)")
    else:
        assert why.endswith("; guest kernel 7.3.0-1-cloud-amd64 has no APX state support either (no XSAVE "
                            "component 19 in its xfeature names), so it would not enable XCR0[19]")
    assert "Debian" not in why and "\n" not in why
    # What the image cannot tell is said as unknown, not guessed.
    unpackable = tmp_path / "vmlinuz-7.4.0"
    unpackable.write_bytes(kernel.read_bytes()[:1024] + b"not a compressed payload")
    assert linux_kernel.kernel_knows_apx(unpackable) is None
    assert "whether guest kernel 7.3.0-1-cloud-amd64 would enable XCR0[19] is unknown" in \
        unavailable_reason("apx", "tcg", qemu=str(qemu), kernel=unpackable)
    # No QEMU: the reason says so instead of a version.
    assert unavailable_reason("apx", "tcg", qemu=str(tmp_path / "none"), kernel=kernel).startswith(
        f"QEMU ({tmp_path / 'none'}: No such file or directory) TCG does not emulate APX")


def test_flip_targets_are_inside_their_registers():
    assert flip_target("ymm") == ("ymm13", 21)
    for bank in linux_programs.holder_banks():
        name, byte = flip_target(bank)
        assert name in BANKS[bank].names and 0 <= byte < BANKS[bank].register(name).width


def _snapshot(bank: str, observed: dict, *, rip: int = 0x40267E, cpl: int = 3, stages=(1,)) -> Snapshot:
    stop = StopPoint(rip, cpl, (0x40266C, 0x402695), 1, "")
    return Snapshot(Path("/nonexistent"), bank, tuple(stages), stop, observed, rip, "linux-tcg ymm")


def test_snapshot_findings_name_observer_register_and_byte():
    good = BANKS["ymm"].pattern(1)
    bad = dict(good)
    value = bytearray(bad["ymm13"])
    value[21] ^= 0xFF
    bad["ymm13"] = bytes(value)
    assert _snapshot("ymm", {"migration": good, "hmp": good}).problems() == []
    snap = _snapshot("ymm", {"migration": good, "hmp": bad})
    assert snap.matching_stage() is None
    (problem,) = snap.problems()
    assert problem == (f"hmp: not pattern(1): avx ymm13 byte 21: want 0x{good['ymm13'][21]:02x} "
                       f"got 0x{good['ymm13'][21] ^ 0xFF:02x}")
    with pytest.raises(LinuxSessionError, match=r"^linux-tcg ymm snapshot: hmp: not pattern\(1\): avx ymm13 byte 21"):
        snap.check()
    # A ctx pair: either holder's pattern is right; the other is not a finding.
    two = BANKS["ymm"].pattern(2)
    assert _snapshot("ymm", {"migration": two, "hmp": two}, stages=(1, 2)).matching_stage() == 2
    outside = _snapshot("ymm", {"migration": good, "hmp": good}, cpl=0, rip=0xFFFFFFFF81000000)
    assert outside.problems()[0].startswith("vCPU not in the holder's spin loop (CPL=0")


def test_machine_spec_console_and_machine_arguments():
    try:
        qemu = find_qemu()
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    spec = MachineSpec.create(accel="tcg", kernel="/k", qemu=qemu, machine="microvm", console=True,
                              extra=("-initrd", "/i", "-append", "a b"))
    argv = spec.argv("/d", "file:/s")
    assert argv[argv.index("-machine") + 1] == "microvm,memory-backend=ram"
    assert argv[argv.index("-serial") + 1] == "chardev:con" and "socket,id=con,path=/d/con.sock" in argv
    assert argv[-6:] == ["-initrd", "/i", "-append", "a b", "-incoming", "file:/s"]
    plain = MachineSpec.create(accel="tcg", kernel="/k", qemu=qemu).argv("/d", None)
    assert plain[plain.index("-machine") + 1] == ("microvm,pit=off,pic=off,rtc=off,isa-serial=off,acpi=off,"
                                                  "memory-backend=ram")
    assert "-serial" not in plain and "id=con" not in " ".join(plain)


# --- real boots ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    try:
        qemu = find_qemu()
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    if not (build.have_llvm_mc() and shutil.which("gcc")):
        pytest.skip("needs llvm-mc >= 18 and gcc (ci/bootstrap installs them)")
    try:
        kernel = linux_kernel.find_kernel(fetch=False)
    except KernelUnavailable as exc:
        pytest.skip(str(exc))
    return {"qemu": qemu, "kernel": kernel}


def _children() -> list[tuple[int, str]]:
    """(pid, comm) of this process's children, zombies included."""
    return [(p.pid, f"{p.comm} ({p.state})") for p in procfs.children()]


def assert_nothing_left(run: LinuxHolderRun) -> None:
    """Every QEMU the run started is reaped (no /proc entry: not running, not a zombie),
    and every private directory it made is gone."""
    assert run.pids
    children = _children()
    for pid in run.pids:
        # Gone from /proc, or (pid reused) no longer our child: reaped either way.
        assert not procfs.exists(pid) or pid not in [p for p, _ in children], \
            f"QEMU pid {pid} still exists: {children}"
    left = [p for p in run.temp_paths if os.path.exists(p)]
    assert left == [], left
    assert not [d for d in our_temp_dirs() if d in run.temp_paths]


@pytest.fixture(scope="module")
def ymm_run(env):
    """One ymm run: boot, snapshot, and the restores the tests below look at."""
    run = LinuxHolderRun("ymm", **env)
    try:
        ready = run.boot()
        booted = run.machine
        boot_pid, boot_dir = booted.pid, booted.workdir
        snap = run.snapshot()
        after_snapshot = (run.machine, os.path.exists(f"/proc/{boot_pid}"), os.path.exists(boot_dir))
        plain = run.restore()
        flipped = run.restore(run.flipped("ymm13", 21))
        edited = run.restore(run.edited(2))
        out = dict(run=run, ready=ready, snap=snap, plain=plain, flipped=flipped, edited=edited,
                   after_snapshot=after_snapshot, snapshot_exists=snap.path.exists())
    finally:
        run.close()
    out["after_close"] = snap.path.exists()
    return out


def test_snapshot_is_taken_inside_the_spin_loop(ymm_run):
    snap = ymm_run["snap"]
    ready = ymm_run["ready"][0]
    assert ready.bank == "ymm" and ready.fields["load"] == "1" and ready.fields["expect"] == "1"
    assert snap.stop.cpl == 3 and ready.spin_range[0] <= snap.stop.rip < ready.spin_range[1]
    assert snap.stream_rip == snap.stop.rip
    assert 1 <= snap.stop.tries <= linux_session.STOP_TRIES


def test_both_observers_see_the_loaded_pattern(ymm_run):
    snap = ymm_run["snap"]
    assert snap.problems() == []
    pattern = BANKS["ymm"].pattern(1)
    for observer in ("migration", "hmp"):
        assert snap.observed[observer] == pattern, observer


def test_the_booted_qemu_is_gone_before_the_restore(ymm_run):
    machine, pid_alive, dir_alive = ymm_run["after_snapshot"]
    assert machine is None and not pid_alive and not dir_alive
    assert ymm_run["snapshot_exists"]


def test_a_fresh_qemu_continues_the_holder(ymm_run):
    plain = ymm_run["plain"]
    assert plain.ok and plain.result.name == "holder-ymm", plain.console
    assert plain.exit_code == (linux.EXIT_STATUS_PASS << 1) | 1
    assert plain.report.ready == [] and plain.report.started_uptime is None, "continued, not rebooted"
    assert plain.report.lines[0] == "# apx-init: released", plain.console
    assert plain.report.done
    pids = ymm_run["run"].pids
    assert len(pids) == 4 and len(set(pids)) == 4  # boot + three restores, each its own QEMU


def test_a_flipped_byte_is_named_by_the_guest(ymm_run):
    flipped = ymm_run["flipped"]
    value = BANKS["ymm"].pattern(1)["ymm13"][21]
    assert not flipped.ok
    assert flipped.result.directive.startswith(
        f"ymm ymm13 byte 21: want 0x{value:02x} got 0x{value ^ 0xFF:02x} (1 differing byte"), flipped.result
    assert flipped.exit_code == (linux.EXIT_STATUS_FAIL << 1) | 1
    with pytest.raises(LinuxSessionError, match=r"^linux-tcg ymm result: holder-ymm not ok: ymm ymm13 byte 21"):
        flipped.check_ok()


def test_an_edited_stream_reaches_the_guest(ymm_run):
    """The holder expects pattern(1); the stream holds pattern(2) in every register: the
    guest sees pattern(2)'s bytes (the suite's edit path boots a holder expecting them)."""
    edited = ymm_run["edited"]
    one, two = BANKS["ymm"].pattern(1)["ymm0"][0], BANKS["ymm"].pattern(2)["ymm0"][0]
    assert edited.result.directive.startswith(f"ymm ymm0 byte 0: want 0x{one:02x} got 0x{two:02x}"), edited.result


def test_timings(ymm_run, record_property):
    seconds = ymm_run["run"].seconds
    for phase in ("boot_to_ready", "stop", "snapshot", "observe", "restore", "release_to_result"):
        assert isinstance(seconds[phase], float), phase  # each phase was clocked (its size is the bench's)
        record_property(phase, round(seconds[phase], 3))
    print(f"\nlinux ymm: boot->ready {seconds['boot_to_ready']:.2f} s, snapshot {seconds['snapshot']:.2f} s, "
          f"observe {seconds['observe']:.2f} s, 3 restores {seconds['restore']:.2f} s, "
          f"release->result {seconds['release_to_result']:.2f} s, stops {seconds['stop_tries']}")


def test_nothing_left_behind(ymm_run):
    assert not ymm_run["after_close"]
    assert_nothing_left(ymm_run["run"])


# --- one-line errors naming the phase -------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_qemu_dying_before_the_ready_line(env, monkeypatch):
    """A bank TCG lacks, let through: the guest's holder skips, /init powers off, and
    QEMU exits before any ready line."""
    monkeypatch.setattr(linux_session, "unavailable_reason", lambda bank, accel="tcg", **_: None)
    run = LinuxHolderRun("zmm_hi256", **env)
    try:
        with pytest.raises(LinuxSessionError) as info:
            run.boot()
    finally:
        run.close()
    text = _one_line(info.value)
    assert text.startswith("linux-tcg zmm_hi256 boot: holder never ready (the guest: ok holder-zmm_hi256 # SKIP CPU "
                           "lacks AVX512F (CPUID.(EAX=7,ECX=0):EBX[16]=0)): qemu-tcg boot: QEMU exited with status 3 "
                           "(isa-debug-exit status 1) while waiting for holder ready line on the serial console"), text
    assert "console: '# apx-init: done pass=0 fail=0 skip=1'" in text, text
    assert_nothing_left(run)


def test_holder_never_ready(env):
    run = LinuxHolderRun("xmm", timeout=0.5, **env)
    try:
        with pytest.raises(LinuxSessionError) as info:
            run.boot()
    finally:
        run.close()
    text = _one_line(info.value)
    assert re.match(r"linux-tcg xmm boot: holder never ready: qemu-tcg boot: no holder ready line "
                    r"on the serial console within 0.5 s; console: ", text), text
    assert_nothing_left(run)


def test_restore_errors(env):
    """A truncated stream (QEMU refuses it and exits) and a result that does not come in time."""
    run = LinuxHolderRun("xmm", **env)
    try:
        run.boot()
        run.snapshot()
        truncated = run.workdir / "truncated.mig"
        stream = run.snap.path.read_bytes()  # devices and vCPU only: RAM travels as a file
        truncated.write_bytes(stream[:len(stream) // 2])
        with pytest.raises(LinuxSessionError) as info:
            run.restore(truncated)
        text = _one_line(info.value)
        assert text.startswith("linux-tcg xmm restore: qemu-tcg restore1: QEMU exited with status 1"), text
        assert "(restoring truncated.mig)" in text and not truncated.exists()
        run.timeout = 0.01
        with pytest.raises(LinuxSessionError) as info:
            run.restore()
        text = _one_line(info.value)
        assert re.match(r"linux-tcg xmm result: console result missing: qemu-tcg restore2: no KTAP result for "
                        r"holder-xmm on the serial console within 0.01 s; console: ", text), text
        assert run.snap.path.exists(), "the snapshot itself is kept until close()"
    finally:
        run.close()
    assert_nothing_left(run)
