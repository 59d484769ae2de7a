"""The QEMU backend: a multiboot guest in qemu-system-x86_64 (KVM or TCG) behind the
backend-neutral Session interface (apx_tests.backend).  One QEMU binary with one
accelerator (version, CPU flags, APX facts, the guest's XSAVE layout) is a ``host.QemuHost``.

    backend = QemuBackend("tcg")                 # or "kvm"; qemu= a binary path
    backend.unavailable_reason(BANKS["ymm"])     # None, or why not (one line)
    with backend.start(bank, payload) as s:      # QemuSession
        s.run_to(0); s.export(); ...

How each Session operation maps onto QEMU (docs/qemu.md has the why):

  start        build the boot image (guests/boot/multiboot.S + the bank's payload, the
               same bytes the KVM micro-VMM runs), boot a Machine with the mailbox
               preloaded into guest RAM (go = GO_HOLD: the guest waits at stage 0)
  run_to(n)    write mailbox.go = previous stage into guest RAM (a shared mapping: no
               QEMU call), wait for the sync character on isa-debugcon
  export       QMP stop + migrate to file + cont; MigrationStream -> XsaveImage with
               the guest's own XSAVE layout (CPUID leaf 0xD as the boot stub read it)
  import_image the bank's registers of the image (raw bytes) and its XSTATE_BV bits for
               the bank's components are patched into a copy of the current stream,
               which a fresh QEMU restores (-incoming file:, or the standby that
               expect_restore() started: migrate-incoming); the session moves there
  snapshot     a migration file; restore(snapshot) = a fresh QEMU from it (the standby
               the snapshot took from its session, if any)
  read/write_area  the shared guest-RAM mapping (pmemsave and the gdbstub also work,
               see Machine.pmemsave and the "gdb" view)
  finish       release stage 2; the status from isa-debug-exit's exit code (status<<1)|1
  views        partial register views: "gdb" (gdbstub through gdb/MI: GPRs, x87, xmm,
               never ymm/zmm/k on QEMU 10) and "hmp" (HMP info registers: x87, xmm/ymm,
               zmm/k when XCR0 enables them)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import weakref
from dataclasses import dataclass, field
from typing import Callable

from ..backend import Backend, BackendError, ImportRejected, Session
from ..guests import boot, protocol
from ..profiles import DEFAULT_PROFILE, PROFILES, CpuProfile
from ..xsave import Bank, XsaveImage, narrower_names
from ..xsave.layout import component_name
from .errors import QemuError
from .host import FEATURES, QemuHost, _boot_failure_hint
from .machine import Machine, describe_exit
from .spec import MachineSpec

TCG_NO_APX = "QEMU TCG does not emulate APX"
GPR_VIEW_NAMES = tuple(f"r{n}" for n in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp")) + tuple(
    f"r{i}" for i in range(8, 32)) + ("rip", "rflags")


def _names(mask: int) -> str:
    return ", ".join(f"{bit} {component_name(bit)}" for bit in range(64) if mask >> bit & 1)


@dataclass(frozen=True)
class QemuSnapshot:
    """A paused point: a migration file (owned by the backend's snapshot directory), and
    the standby QEMU its session had started for a restore (used by the first restore;
    closed when the snapshot goes)."""
    path: str
    stage: int | None
    bank: str
    spec: MachineSpec
    standby: list = field(default_factory=list, compare=False, repr=False)


class QemuBackend(Backend):
    """Backend "qemu-kvm" or "qemu-tcg" ("qemu11-kvm" ... with a version tag, when several
    QEMUs run side by side)."""

    def __init__(self, accel: str = "tcg", qemu: str | None = None, *, host: QemuHost | None = None,
                 timeout: float = 10.0, cpu: str | None = None,
                 profile: CpuProfile = PROFILES[DEFAULT_PROFILE], tag: str = ""):
        self.host = host or QemuHost(accel, qemu, cpu=cpu, timeout=timeout, profile=profile, tag=tag)
        self.accel = self.host.accel
        self.name = self.host.label
        self.features = FEATURES[self.accel]

    def host_unavailable(self, bank: Bank) -> str | None:
        """What this QEMU and host lack for `bank`, apart from what the profile took away."""
        if bank.name == "apx":
            why = self.host.apx_unavailable()
            if why:
                return why
        try:
            guest = self.host.guest
        except QemuError:
            return None  # the boot problem is the test's failure, not a reason to skip
        missing = bank.xcr0_mask & ~guest.xcr0 & self.host.profile.xcr0
        if missing:
            return (f"QEMU {self.host.version_text} {self.accel} -cpu {self.host.cpu_text}: the guest's XCR0 "
                    f"{guest.xcr0:#x} (all that "
                    f"CPUID.(EAX=0xD,ECX=0) offers) lacks {missing:#x} ({_names(missing)})")
        return None

    def start(self, bank: Bank, payload: bytes) -> "QemuSession":
        return QemuSession.boot(self, bank, payload)

    def idle(self) -> None:
        self.host.drop_spare_boot()

    def run_closed(self) -> None:
        """The Run's sessions are closed (scenarios.engine.Run.close): the standby QEMUs its
        snapshots still hold go too, so no QEMU outlives the Run that started it."""
        for machine in list(self.host.handed):
            machine.close()
        self.host.handed.clear()


class QemuSession(Session):
    """A guest in one QEMU process at a time: imports and restores move it to a new one."""

    def __init__(self, owner: QemuBackend, bank: Bank, machine: Machine, stage: int | None,
                 spec: MachineSpec, image: boot.BootImage | None = None):
        super().__init__()
        self.owner = owner
        self.host = owner.host
        self.backend = owner.name
        self.features = owner.features
        self.bank = bank
        self.layout = owner.layout
        self.machine = machine
        self.stage = stage
        self.spec = spec
        self.image = image
        self.mailbox_gpa = boot.DEFAULT_MAILBOX_GPA
        self.clock = owner.host.clock
        self._seen = 0  # debugcon offset after the last sync character consumed
        self._generation = 0  # bumps whenever guest RAM or state may differ from the last save
        self._saved: tuple[str, int] | None = None  # (path, generation) of the newest save
        self._counter = 0
        self._parsed = None  # (path, MigrationStream) of the newest parse
        self._standby: Machine | None = None  # a QEMU starting up for the next restore
        # The VM stays stopped after a save until the guest is released (_release): it
        # would only spin on the mailbox meanwhile, a whole core under TCG, while the
        # host parses, compares and starts the next QEMUs.
        self._paused = False
        self._closed = False
        owner.host._sessions.add(self)

    @property
    def where(self) -> str:
        return f"{self.backend} {self.bank.name}"

    # ---- boot -------------------------------------------------------------------------------
    @classmethod
    def boot(cls, owner: QemuBackend, bank: Bank, payload: bytes) -> "QemuSession":
        clock = owner.host.clock
        owner.layout  # the probe boot, if not done yet: its failure must not leak a machine
        with clock.timed("build"):
            try:
                image = boot.build_boot_image(payload)
            except Exception as exc:  # GuestBuildError: one line already
                raise BackendError(f"{owner.name} {bank.name}: {exc}") from None
            spec = owner.host.spec(str(image.path))
        mailbox = boot.mailbox_bytes(bank.size)
        with clock.timed("boot"):
            machine = owner.host.boot_machine(spec, {boot.DEFAULT_MAILBOX_GPA: mailbox}, f"{owner.name} {bank.name}")
        return cls(owner, bank, machine, None, spec, image)

    def expect_restore(self) -> None:
        """The scenario will continue this guest in a fresh QEMU (an import, a restore):
        start that QEMU now (-incoming defer, not waited for), once this one is up.  Its
        start-up, most of a restore's time, then overlaps the guest's stages, the saves and
        the parses; the restore connects to it and loads the stream with migrate-incoming
        (docs/qemu.md, "Standby QEMU").  Only the first restore or import uses it."""
        if self._standby is not None or self._closed:
            return
        # prealloc: the standby populates its guest RAM while it starts (off the critical
        # path), so loading the stream no longer faults in each page as it first reads it
        # (restore ~20 ms less here).  The boot's QEMU keeps lazy RAM: there the same cost
        # would only move from its first save into the boot (MachineSpec.prealloc).
        spec = dataclasses.replace(self.spec, prealloc=True)
        with self.clock.timed("standby"):  # the spawn only: QEMU's start-up is not waited for
            self._standby = Machine.standby(spec, label=self.machine.label)
        self.host.standbys.add(self._standby)

    # ---- guest control ----------------------------------------------------------------------
    def _release(self, stage: int) -> None:
        self.machine.write(self.mailbox_gpa + protocol.OFF_GO, struct.pack("<I", stage))
        self._generation += 1
        if self._paused:
            self._paused = False
            try:
                self.machine.cont()
            except QemuError as exc:
                raise BackendError(f"{exc} (resuming the guest to release stage {stage})") from None

    def run_to(self, stage: int) -> None:
        if self.stage is not None:
            self._release(self.stage)
        want = protocol.sync_char(stage)
        with self.clock.timed("guest"):
            try:
                at = self.machine.expect(want, since=self._seen, timeout=self.host.timeout)
            except QemuError as exc:
                raise BackendError(f"{exc} (waiting for stage {stage}, last stage "
                                   f"{'none' if self.stage is None else self.stage})"
                                   f"{_boot_failure_hint(self.machine)}") from None
        between = bytes(self.machine.debug_output[self._seen:at])
        stray = bytes(c for c in between if chr(c) in "012" or c == ord("X"))
        if stray:
            raise BackendError(f"{self.where}: debugcon showed {stray!r} before stage {stage} "
                               f"(after stage {self.stage})")
        self._seen = at + 1
        self.stage = stage
        self._generation += 1

    def finish(self) -> int:
        if self.stage is not None:
            self._release(self.stage)
        with self.clock.timed("finish"):
            try:
                code = self.machine.wait_exit(self.host.timeout)
            except QemuError as exc:
                raise BackendError(f"{exc} (waiting for the guest to finish after stage {self.stage})") from None
        if code is None or code <= 0 or not code & 1 or (code >> 1) > protocol.STATUS_MISMATCH:
            raise BackendError(f"{self.where}: expected the guest to finish through isa-debug-exit, QEMU "
                               f"{describe_exit(code)}{_boot_failure_hint(self.machine)}; "
                               f"stderr: {self.machine.stderr_tail() or 'empty'}")
        return code >> 1

    # ---- state ------------------------------------------------------------------------------
    def _new_path(self, what: str) -> str:
        self._counter += 1
        return self.machine.path(f"{what}-{self._counter}.mig")

    def _save(self) -> str:
        """The current state as a migration file; reused while nothing changed since."""
        if self._saved is not None and self._saved[1] == self._generation and os.path.exists(self._saved[0]):
            return self._saved[0]
        path = self._new_path("state")
        with self.clock.timed("save"):
            try:
                self.machine.save(path)  # stopped now, until _release
                self._paused = True
            except QemuError as exc:
                raise BackendError(str(exc)) from None
        if self._saved is not None and self._saved[0] != path:
            try:
                os.unlink(self._saved[0])
            except OSError:
                pass
        self._saved = (path, self._generation)
        return path

    def _stream(self, path: str):
        """The parsed stream of `path` (the newest one is kept: export then import of the
        same state parse once)."""
        from .migration.stream import MigrationStream, MigrationStreamError
        if self._parsed is not None and self._parsed[0] == path:
            return self._parsed[1]
        with self.clock.timed("parse"):
            try:
                stream = MigrationStream.open(path)
            except MigrationStreamError as exc:
                raise BackendError(f"{self.where}: {exc}") from None
        self._parsed = (path, stream)
        return stream

    def export(self) -> XsaveImage:
        from .migration.stream import MigrationStreamError
        stream = self._stream(self._save())
        with self.clock.timed("parse"):
            try:
                cpu = stream.cpu_state(0, accelerator=self.owner.accel)
                return cpu.to_xsave(self.layout, where=f"{self.backend} migration stream")
            except MigrationStreamError as exc:
                raise BackendError(f"{self.where}: {exc}") from None

    def observers(self) -> dict[str, Callable[[], XsaveImage]]:
        """Observers giving a whole XsaveImage (what scenarios compare).  The partial
        register views of the gdbstub and HMP are in views()."""
        return {"migration": self.export}

    def views(self) -> dict[str, Callable[[], dict[str, bytes]]]:
        """Partial register views: name -> callable -> {register: raw little-endian bytes},
        only the registers of this bank the observer can see (possibly under a narrower
        name: gdb shows ymm banks as xmm0-15)."""
        return {"gdb": self.gdb_view, "hmp": self.hmp_view}

    def gpr_views(self) -> dict[str, Callable[[], dict[str, bytes]]]:
        """GPRs from the migration stream, the gdbstub and HMP (each as 8-byte values)."""
        return {"migration": self._stream_gprs,
                "gdb": lambda: self.gdb_view(GPR_VIEW_NAMES),
                "hmp": lambda: self.hmp_view(GPR_VIEW_NAMES)}

    def _stream_gprs(self) -> dict[str, bytes]:
        from .migration.stream import MigrationStreamError
        stream = self._stream(self._save())
        try:
            cpu = stream.cpu_state(0, accelerator=self.owner.accel)
        except MigrationStreamError as exc:
            raise BackendError(f"{self.where}: {exc}") from None
        return {name: value.to_bytes(8, "little") for name, value in cpu.gprs.items()}

    def _view_names(self) -> list[str]:
        names = [n for reg in self.bank.names for n in (reg, *narrower_names(reg))]
        return list(dict.fromkeys(names))

    def hmp_view(self, names=None) -> dict[str, bytes]:
        from .hmp import HmpParseError, parse_info_registers, read_info_registers
        with self.clock.timed("hmp"):
            try:
                regs = parse_info_registers(read_info_registers(self.machine.hmp))
            except (QemuError, HmpParseError) as exc:
                raise BackendError(f"{self.where}: hmp view: {exc}") from None
        return {n: regs[n] for n in (names or self._view_names()) if n in regs}

    def gdb_view(self, names=None) -> dict[str, bytes]:
        """Attach gdb to the gdbstub (stops the VM), read, detach (resumes it)."""
        def read(gdb, offered):
            wanted = [n for n in (names or self._view_names()) if n in offered]
            return gdb.read_registers(wanted) if wanted else {}
        return self._with_gdb("gdb view", read)

    def debugger_write(self, values: dict[str, bytes]) -> dict[str, bytes]:
        """Write registers through the gdbstub (gdb `P` packets): each bank register under
        its own name or, where the stub only offers that, its low bytes under a narrower
        one (QEMU 10: xmmN for ymmN).  Returns {name written: bytes} as the stub took it."""
        def write(gdb, offered):
            written = {}
            for name, value in values.items():
                shown = next((n for n in [name, *narrower_names(name)] if n in offered), None)
                if shown is None:
                    continue
                width = len(gdb.read_registers([shown])[shown])
                gdb.write_register(shown, value[:width])
                written[shown] = value[:width]
            return written
        return self._with_gdb("gdb write", write)

    def debugger_offer(self) -> str:
        features = getattr(self, "_gdb_features", None)
        return f"gdbstub features {', '.join(features)}" if features else ""

    def _with_gdb(self, what: str, work):
        """Attach gdb (stops the VM), do `work(gdb, offered register names)`, detach (resumes
        it); the VM runs again afterwards, also when gdb failed (a stopped guest would only
        hang the next stage)."""
        from .gdb import GdbError
        with self.clock.timed("gdb"):
            gdb = self.host.gdb_session(self.machine.gdb_socket, self._gdb_transcript_path())
            try:
                gdb.connect()
                offered = set(gdb.register_names())
                self._gdb_features = sorted(gdb.features())
                result = work(gdb, offered)
                gdb.detach()
            except GdbError as exc:
                raise BackendError(f"{self.where}: {what}: {exc}") from None
            finally:
                self.host.release_gdb(gdb)  # kept for the next view if it detached cleanly
                try:
                    # gdb's detach resumes the VM, even one stopped by a save: stop it again
                    # (the guest waits for its release); a failed view may leave it stopped
                    # by gdb: resume it, or the next stage would only hang.
                    if self.machine.running:
                        running = self.machine.status() == "running"
                        if self._paused and running:
                            self.machine.stop()
                        elif not self._paused and not running:
                            self.machine.cont()
                except QemuError:
                    pass  # QEMU is gone: the error that matters is already on its way
        return result

    def import_image(self, image: XsaveImage) -> None:
        """Patch the bank's registers (raw bytes) and the bank's XSTATE_BV bits of `image`
        into a copy of the current migration stream; continue in a fresh QEMU from it."""
        from .migration.stream import MigrationStreamError
        stream = self._stream(self._save())
        path = self._new_path("import")
        with self.clock.timed("patch"):
            try:
                edits = self._register_edits(stream, image)
                stream.patch(path, edits)
            except (MigrationStreamError, ValueError) as exc:
                raise BackendError(f"{self.where}: import: {exc}") from None
        self._move_to(path, rejected=True)

    def _register_edits(self, stream, image: XsaveImage) -> dict:
        edits: dict = {}
        for reg in self.bank.registers:
            value = b"".join(image.raw_component_bytes(slot.component)[slot.offset:slot.offset + slot.size]
                             for slot in reg.slots)
            for leaf, raw in stream.register_edits(reg.name, value, mark_xstate=False).items():
                if leaf in edits and edits[leaf] != raw:
                    raise BackendError(f"{self.where}: import: {reg.name} shares stream field {leaf.path} "
                                       f"with another register of the bank")
                edits[leaf] = raw
        cpu = stream.cpu_state(0, accelerator=self.owner.accel)
        leaf = cpu.leaves.get("env.xstate_bv")
        if leaf is not None:
            mask = self.bank.xstate_mask
            new = (cpu.xstate_bv & ~mask) | (image.xstate_bv & mask)
            if new != cpu.xstate_bv:
                edits[leaf] = new.to_bytes(leaf.size, "big")
        return edits

    def _move_to(self, path: str, *, rejected: bool = False) -> None:
        """Continue this session in a fresh QEMU restoring `path`."""
        try:
            self.machine.stop()  # a spinning guest would compete for the CPU with the new QEMU
        except QemuError:
            pass
        standby, self._standby = self._standby, None
        if standby is not None:
            self.host.standbys.discard(standby)
        with self.clock.timed("restore"):
            try:
                fresh = _restored(self.spec, path, self.machine.label, self.host.artifacts, standby)
            except QemuError as exc:
                if rejected:
                    raise ImportRejected(f"{exc} (restoring the patched stream)") from None
                raise BackendError(str(exc)) from None
        old, self.machine = self.machine, fresh
        old.close()
        self._seen = 0
        self._saved = self._parsed = None
        self._generation += 1

    def snapshot(self) -> QemuSnapshot:
        if self.stage is None:
            raise BackendError(f"{self.where}: snapshot before the guest reached a sync point")
        state = self._save()  # reused when nothing changed since the last export
        path = self.host.snapshot_path()
        try:
            os.replace(state, path)  # same file system (both private dirs are on /dev/shm)
        except OSError:
            shutil.copyfile(state, path)
        self._saved = None
        snap = QemuSnapshot(path, self.stage, self.bank.name, self.spec)
        if self._standby is not None:  # the restore that likely follows takes it
            snap.standby.append(self._standby)
            self.host.handed.add(self._standby)
            self._standby = None
        weakref.finalize(snap, _drop_snapshot, path, snap.standby)
        return snap

    def restore(self, snapshot: QemuSnapshot) -> "QemuSession":
        """A fresh QEMU restoring the snapshot file: the guest continues there."""
        if snapshot.bank != self.bank.name:
            raise BackendError(f"{self.where}: snapshot of bank {snapshot.bank}")
        standby = snapshot.standby.pop() if snapshot.standby else None
        if standby is not None:
            self.host.standbys.discard(standby)
            self.host.handed.discard(standby)
        with self.clock.timed("restore"):
            try:
                machine = _restored(snapshot.spec, snapshot.path, f"{self.backend} {self.bank.name}",
                                    self.host.artifacts, standby)
            except QemuError as exc:
                raise BackendError(str(exc)) from None
        return QemuSession(self.owner, self.bank, machine, snapshot.stage, snapshot.spec, self.image)

    # ---- mailbox ------------------------------------------------------------------------------
    def write_area(self, offset: int, data: bytes) -> None:
        try:
            self.machine.write(self.mailbox_gpa + offset, data)
        except QemuError as exc:
            raise BackendError(str(exc)) from None
        self._generation += 1

    def read_area(self, offset: int, size: int) -> bytes:
        try:
            return self.machine.read(self.mailbox_gpa + offset, size)
        except QemuError as exc:
            raise BackendError(str(exc)) from None

    # ---- lifetime ---------------------------------------------------------------------------
    def _gdb_transcript_path(self) -> str | None:
        """Where a gdb session saves its MI transcript when it closes: the artifacts
        directory of the host (set per test by apx_tests.pytest.reporting), else nowhere."""
        if not self.host.artifacts:
            return None
        self._counter += 1
        return os.path.join(self.host.artifacts, f"{self.machine.label}-{self.machine.pid or 0}-"
                                                 f"gdb-{self._counter}.json")

    def keep_artifacts(self, directory: str) -> None:
        self.machine.keep_artifacts(directory)
        if self._saved is not None:
            self.machine.keep_file(self._saved[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._standby is not None:
            self._standby.close()
            self._standby = None
        self.machine.close()


def _restored(spec: MachineSpec, path: str, label: str, artifacts: str | None,
              standby: Machine | None) -> Machine:
    """A QEMU restoring `path`: the standby started for it (ready by now: connect, then
    migrate-incoming from the file), else a new one started with -incoming file:PATH.
    Either loads the same stream the same way and exits with QEMU's error if it refuses it."""
    if standby is None:
        return Machine(spec, incoming=path, label=label, artifacts=artifacts)
    standby.adopt(label, artifacts)
    try:
        standby.connect()
        standby.migrate_incoming(path)
    except BaseException:
        standby.close()
        raise
    return standby


def _drop_snapshot(path: str, standby: list) -> None:
    for machine in standby:
        machine.close()
    standby.clear()
    _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
