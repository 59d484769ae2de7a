"""apx_tests.qemu.machine (with spec, qmp, errors): one QEMU process, started, watched and always cleaned up.

Real qemu-system-x86_64, real guests (the boot image with the xmm payload).  Every
failure must be ONE line, and after every test no QEMU of ours and no private
directory of ours may remain.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from apx_tests import procfs
from apx_tests.guests import boot, protocol
from apx_tests.guests.build import build_payload
from apx_tests.qemu import machine as qm
from apx_tests.qemu.errors import QemuError, QemuUnavailable
from apx_tests.qemu.machine import Machine
from apx_tests.qemu.spec import MachineSpec, die_with_parent_prefix, our_temp_dirs, sweep_stale_dirs

GPA = boot.DEFAULT_MAILBOX_GPA


_alive = procfs.alive


@pytest.fixture(scope="module")
def image():
    return boot.build_boot_image(build_payload("xmm").code)


@pytest.fixture
def spec(image):
    try:
        return MachineSpec.create(accel="tcg", kernel=image.path, timeout=5.0)
    except QemuUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(our_temp_dirs())
    yield
    assert qm.live_machines() == []
    assert set(our_temp_dirs()) - before == set()


def _mailbox():
    return {GPA: boot.mailbox_bytes(protocol.bank_bytes("xmm"))}


# --- unavailable / broken QEMU: one line ----------------------------------------------------

def test_missing_binary_is_one_line(image, monkeypatch):
    with pytest.raises(QemuUnavailable) as err:
        MachineSpec.create(accel="tcg", kernel=image.path, qemu="/nonexistent/qemu-system-x86_64")
    assert str(err.value) == "/nonexistent/qemu-system-x86_64: not an executable file"
    assert isinstance(err.value, OSError)  # the plugin turns OSError into "backend unavailable"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("APX_QEMU", raising=False)
    with pytest.raises(QemuUnavailable, match=r"^qemu-system-x86_64: not found in PATH \(install"):
        MachineSpec.create(accel="tcg", kernel=image.path)
    monkeypatch.setenv("APX_QEMU", "qemu-from-env")
    with pytest.raises(QemuUnavailable, match="^qemu-from-env: not found in PATH"):
        MachineSpec.create(accel="tcg", kernel=image.path)


def test_qemu_dying_on_a_bad_option_is_one_line_with_stderr(spec):
    bad = MachineSpec(**{**spec.__dict__, "extra": ("-frobnicate",)})
    with pytest.raises(QemuError) as err:
        Machine(bad, preload=_mailbox())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("qemu-tcg: QEMU exited with status 1 (QEMU error, or isa-debug-exit status 0)")
    assert "stderr: qemu-system-x86_64: -frobnicate: invalid option" in message


def test_unknown_cpu_model_is_one_line(spec):
    bad = MachineSpec(**{**spec.__dict__, "cpu": "no-such-cpu"})
    with pytest.raises(QemuError, match=r"exited with status 1 .*stderr: .*no-such-cpu") as err:
        Machine(bad, preload=_mailbox())
    assert "\n" not in str(err.value)


def test_guest_hang_is_one_line_and_leaves_nothing(spec, image):
    """A payload that never syncs: the wait ends after the timeout with the last
    debugcon output; close() leaves no process."""
    hang = boot.build_boot_image(b"\xf3\x90\xeb\xfc")  # 1: pause; jmp 1b
    hung = MachineSpec(**{**spec.__dict__, "kernel": str(hang.path), "timeout": 0.5})
    m = Machine(hung, preload=_mailbox())
    pid = m.pid
    try:
        with pytest.raises(QemuError) as err:
            m.expect(b"0")
    finally:
        m.close()
    assert str(err.value) == "qemu-tcg: no '0' on debugcon within 0.5 s; debugcon 'blu'"
    assert not _alive(pid)
    assert not os.path.exists(m.workdir)


def test_triple_fault_is_named(spec):
    crash = boot.build_boot_image(b"\x0f\x0b")  # ud2 at CPL3 with no IDT: triple fault
    with pytest.raises(QemuError) as err:  # may already surface while QMP connects
        with Machine(MachineSpec(**{**spec.__dict__, "kernel": str(crash.path)}), preload=_mailbox()) as m:
            m.expect(b"0")
    assert "QEMU exited with status 0 (the guest reset or triple-faulted (-no-reboot), or QEMU quit)" in str(err.value)


# --- the process and its private directory ----------------------------------------------

def test_private_directory_unix_sockets_only(spec):
    with Machine(spec, preload=_mailbox()) as m:
        mode = os.stat(m.workdir).st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert os.path.basename(m.workdir).startswith(f"apx-qemu-{os.getpid()}-")
        joined = " ".join(m.argv)
        assert "tcp" not in joined and "port=" not in joined and "host=" not in joined
        for sock in ("gdb.sock",):
            assert stat.S_ISSOCK(os.stat(m.path(sock)).st_mode)
        with open(f"/proc/{m.pid}/net/unix") as fh:  # QEMU's own sockets: all in the private dir
            paths = [line.split()[-1] for line in fh.read().splitlines()[1:] if len(line.split()) > 7]
        ours = [p for p in paths if p.startswith(m.workdir)]
        assert m.path("gdb.sock") in ours
        assert json.loads(open(m.path("cmdline.json")).read()) == m.argv
    assert not _alive(m.pid)
    assert not os.path.exists(m.workdir)


def test_keyboard_interrupt_cleans_up(spec, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        with Machine(spec, preload=_mailbox()) as m:
            pid = m.pid
            raise KeyboardInterrupt
    assert not _alive(pid) and not os.path.exists(m.workdir)

    seen = {}

    def interrupted(self):
        seen["pid"], seen["dir"] = self.pid, self.workdir
        raise KeyboardInterrupt

    monkeypatch.setattr(Machine, "_connect_qmp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Machine(spec, preload=_mailbox())
    assert not _alive(seen["pid"]) and not os.path.exists(seen["dir"])


@pytest.mark.parametrize("how", ["setpriv", "preexec_fn"])
def test_qemu_dies_with_its_parent(image, tmp_path, how):
    """PR_SET_PDEATHSIG: a SIGKILLed Python leaves no QEMU running -- set by `setpriv
    --pdeathsig` where util-linux has it, else by a preexec_fn."""
    if how == "setpriv" and not die_with_parent_prefix():
        pytest.skip("no setpriv with --pdeathsig here")
    script = textwrap.dedent(f"""
        import sys, time
        from apx_tests.qemu import machine
        from apx_tests.qemu.machine import Machine
        from apx_tests.qemu.spec import MachineSpec
        if {how!r} == "preexec_fn":
            machine.die_with_parent_prefix = lambda: ()
        m = Machine(MachineSpec.create(accel="tcg", kernel={str(image.path)!r}))
        print(m.pid, m.workdir, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, workdir = child.stdout.readline().split()
        pid = int(pid)
        assert _alive(pid)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(pid)
        assert os.path.isdir(workdir)  # a SIGKILLed process cannot clean up ...
        assert workdir in sweep_stale_dirs()  # ... the next process of ours does
        assert not os.path.exists(workdir)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("mode", [0o644, None])
def test_a_qemu_that_cannot_be_executed_is_unavailable(spec, tmp_path, mode):
    """The same one line whether exec or our check before `setpriv` refuses the binary."""
    import dataclasses

    binary = tmp_path / "qemu-system-x86_64"
    if mode is not None:
        binary.write_bytes(b"")
        binary.chmod(mode)
    why = "Permission denied" if mode is not None else "No such file or directory"
    with pytest.raises(QemuUnavailable, match=rf"^qemu-tcg: cannot run {binary}: {why}$"):
        Machine(dataclasses.replace(spec, qemu=str(binary)))


# --- what a machine does ---------------------------------------------------------------------

def test_memory_qmp_hmp_pmemsave(spec):
    with Machine(spec, preload=_mailbox()) as m:
        m.expect(b"0")
        assert m.status() == "running"
        header = m.read(GPA, protocol.HEADER_SIZE)
        assert protocol.read_mailbox(header).stage == 0
        assert m.pmemsave(GPA, protocol.HEADER_SIZE) == header  # QEMU's view == the mapping
        m.write(GPA + protocol.LOAD_AREA, b"\x5a" * 16)
        assert m.pmemsave(GPA + protocol.LOAD_AREA, 16) == b"\x5a" * 16
        assert "RIP=" in m.hmp("info registers")
        with pytest.raises(QemuError, match=r"^qemu-tcg: QMP no-such-command failed: .*not been found"):
            m.qmp("no-such-command")
        with pytest.raises(QemuError, match="outside RAM"):
            m.read(len(m.memory) - 4, 8)


def _verify_loaded_bytes_and_exit(restored):
    """A restored guest at stage 1 still holds bytes 0..255, verifies them against EXPECT
    (status ok at stage 2) and exits through isa-debug-exit with status pass."""
    assert restored.read(GPA + protocol.LOAD_AREA, 256) == bytes(range(256))
    restored.write(GPA + protocol.EXPECT_AREA, bytes(range(256)))
    restored.write(GPA + protocol.OFF_GO, struct.pack("<I", 1))
    restored.expect(b"2")
    assert protocol.read_mailbox(restored.read(GPA, 24)).status == protocol.STATUS_OK
    restored.write(GPA + protocol.OFF_GO, struct.pack("<I", 2))
    assert restored.wait_exit() == 3


def test_save_and_restore_into_a_fresh_process(spec, tmp_path):
    with Machine(spec, preload=_mailbox()) as m:
        m.expect(b"0")
        m.write(GPA + protocol.LOAD_AREA, bytes(range(256)))
        m.write(GPA + protocol.OFF_GO, struct.pack("<I", 0))
        m.expect(b"1")
        saved = m.save(m.path("state.mig"))
        assert m.status() == "postmigrate"
        restored = Machine(spec, incoming=saved)
        m.close()  # the stream is loaded: the original may go
        with restored:
            assert restored.status() == "running" and restored.debug_output == b""
            _verify_loaded_bytes_and_exit(restored)


def test_incoming_defer(spec):
    with Machine(spec, preload=_mailbox()) as m:
        m.expect(b"0")
        saved = m.save(m.path("state.mig"))
        with Machine(spec, defer=True) as standby:
            assert standby.status() == "inmigrate"
            standby.migrate_incoming(saved)
            assert standby.status() == "running"
            assert standby.read(GPA, protocol.HEADER_SIZE) == m.read(GPA, protocol.HEADER_SIZE)
            standby.write(GPA + protocol.OFF_GO, struct.pack("<I", 0))
            standby.expect(b"1")


def _loaded_and_saved_with_ram_file(m, tmp_path):
    """The guest at stage 1 with bytes 0..255 loaded; saved with RAM as a file."""
    m.expect(b"0")
    m.write(GPA + protocol.LOAD_AREA, bytes(range(256)))
    m.write(GPA + protocol.OFF_GO, struct.pack("<I", 0))
    m.expect(b"1")
    return m.save(tmp_path / "state.mig", ram_to=tmp_path / "state.ram"), tmp_path / "state.ram"


def test_ram_as_a_file_save_and_restore(spec, tmp_path):
    """save(ram_to=): the stream carries no RAM page (x-ignore-shared, recorded in the
    stream), the RAM file holds the guest's memory, and restore() continues the guest
    from the two: its mailbox, its registers, its next stage."""
    from apx_tests.qemu.migration.stream import MigrationStream

    with Machine(spec, preload=_mailbox()) as m:
        saved, ram = _loaded_and_saved_with_ram_file(m, tmp_path)
        assert m.status() == "postmigrate"
        stream = MigrationStream.open(saved)
        assert stream.capabilities() == ["x-ignore-shared"]
        guest_ram = stream.ram_blocks["ram"]  # the memory-backend-file; QEMU's own ROMs are still sent
        assert guest_ram.page_count("unsent") == guest_ram.page_total, \
            (guest_ram.page_count("data"), guest_ram.page_count("zero"))
        with open(ram, "rb") as fh:  # the same bytes as QEMU's RAM, by the link
            fh.seek(GPA + protocol.LOAD_AREA)
            assert fh.read(256) == bytes(range(256))
    # The saving QEMU and its directory are gone; the stream and the RAM file restore it.
    with Machine.restore(spec, saved, ram) as restored:
        assert restored.status() == "running" and "ram_copy" in restored.timing.phases  # the copy ran
        _verify_loaded_bytes_and_exit(restored)
    with open(ram, "rb") as fh:  # the restore copied the file: the guest's writes stayed in its own
        fh.seek(GPA + protocol.EXPECT_AREA)
        assert fh.read(256) != bytes(range(256))


def test_ram_as_a_file_the_ram_is_what_restores(spec, tmp_path):
    """The self-test: restoring the same stream with an empty RAM file of the same size
    must not continue the guest (its code, page tables and mailbox are gone), so the
    RAM the guest runs on after restore() really comes from the file."""
    with Machine(spec, preload=_mailbox()) as m:
        saved, ram = _loaded_and_saved_with_ram_file(m, tmp_path)
    empty = tmp_path / "empty.ram"
    with open(empty, "wb") as fh:
        fh.truncate(os.path.getsize(ram))
    try:
        with Machine.restore(spec, saved, empty) as restored:
            assert restored.read(GPA + protocol.LOAD_AREA, 256) == bytes(256)
            restored.write(GPA + protocol.OFF_GO, struct.pack("<I", 1))
            with pytest.raises(QemuError):
                restored.expect(b"2", timeout=1.0)
    except QemuError as exc:  # or QEMU stops at once (a triple fault with -no-reboot)
        assert "\n" not in str(exc)


def test_ram_file_copy_keeps_holes_and_says_what_is_wrong(tmp_path):
    size = 64 << 20
    src = tmp_path / "src.ram"
    with open(src, "wb") as fh:
        fh.truncate(size)
        fh.seek(5 << 20)
        fh.write(b"\xa5" * 4096)
    dst = tmp_path / "dst.ram"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        assert qm.copy_ram_file(src, fd, "t") >= 4096
        assert os.pread(fd, 4096, 5 << 20) == b"\xa5" * 4096
        assert os.pread(fd, 16, 0) == bytes(16)
        assert os.fstat(fd).st_blocks * 512 < size // 4  # holes stayed holes
        with pytest.raises(QemuError, match=r"^t: guest RAM file .*missing.ram: No such file or directory$"):
            qm.copy_ram_file(tmp_path / "missing.ram", fd, "t")
        os.ftruncate(fd, size // 2)
        with pytest.raises(QemuError, match=r"^t: guest RAM file .*src.ram has 67108864 bytes, the machine 33554432$"):
            qm.copy_ram_file(src, fd, "t")
    finally:
        os.close(fd)


def test_migrations_end_on_their_migration_event(spec, monkeypatch):
    """A save and a migrate-incoming end on QEMU's MIGRATION event ('completed'), without
    polling query-migrate: if the events stopped coming (capability off, listener gone),
    every wait would run into the timeout before its poll."""
    commands = []
    qmp = Machine.qmp

    def recording(self, command, **args):
        commands.append(command)
        return qmp(self, command, **args)

    monkeypatch.setattr(Machine, "qmp", recording)
    with Machine(spec, preload=_mailbox()) as m:
        m.expect(b"0")
        saved = m.save(m.path("first.mig"))
        m.cont()
        m.save(m.path("second.mig"))
        with Machine(spec, defer=True) as standby:
            standby.connect()
            standby.migrate_incoming(saved)
            assert standby.status() == "running"
    assert commands.count("migrate") == 2 and commands.count("migrate-incoming") == 1
    assert commands.count("migrate-set-capabilities") == 2  # once per QEMU
    assert "query-migrate" not in commands


def test_incoming_defer_refusing_garbage_is_one_line(spec, tmp_path):
    junk = tmp_path / "junk.mig"
    junk.write_bytes(b"QEVM\0\0\0\3" + b"\xff" * 64)
    with Machine(spec, defer=True) as standby:
        with pytest.raises(QemuError) as err:
            standby.migrate_incoming(junk)
    assert "\n" not in str(err.value) and "stderr:" in str(err.value)


def test_restoring_garbage_is_one_line(spec, tmp_path):
    junk = tmp_path / "junk.mig"
    junk.write_bytes(b"QEVM\0\0\0\3" + b"\xff" * 64)
    with pytest.raises(QemuError) as err:
        Machine(spec, incoming=junk)
    assert "\n" not in str(err.value) and "stderr:" in str(err.value)


def test_keep_artifacts(spec, tmp_path):
    out = tmp_path / "artifacts"
    with Machine(spec, preload=_mailbox()) as m:
        m.keep_artifacts(out)
        m.expect(b"0")
        m.save(m.path("kept.mig"), keep=True)
        pid = m.pid
    names = sorted(p.name for p in out.iterdir())
    prefix = f"qemu-tcg-{pid}-"
    assert names == sorted(prefix + n for n in ("cmdline.json", "debugcon.log", "kept.mig", "qemu.stderr"))
    assert (out / f"{prefix}debugcon.log").read_bytes() == b"blu0"
