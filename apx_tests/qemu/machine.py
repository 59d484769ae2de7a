"""One qemu-system-x86_64 process: started, watched, talked to, and always cleaned up.

    spec = MachineSpec.create(accel="tcg", kernel=image.path)
    with Machine(spec, preload={MAILBOX_GPA: mailbox}) as m:   # boots; QMP connected
        m.expect(b"0", timeout=5)          # wait for a character on isa-debugcon
        m.write(gpa, data); m.read(gpa, n) # guest RAM, shared with QEMU (no QEMU call)
        m.save(path)                       # QMP stop + migrate to file:PATH (VM stays stopped)
        m.cont()
        m.hmp("info registers")
        code = m.wait_exit(5)              # isa-debug-exit: (status << 1) | 1
    Machine(spec, incoming=path)           # a fresh QEMU restoring a saved stream

What each QEMU gets is ``spec.MachineSpec.argv`` (docs/qemu.md): guest RAM is a
memory-backend-file this process also maps (mailbox reads and writes cost no QEMU round
trip), isa-debugcon, QMP (``qmp.QmpConnection``, every call under a timeout; -S, then
`cont` once connected) and the serial console are chardev sockets this process listens
on, plus a gdbstub socket and -incoming for restores.

Every socket is a Unix socket inside a private 0700 directory (tempfile.mkdtemp, on
/dev/shm when it is there, so guest RAM is tmpfs); never TCP.  close() kills and
reaps QEMU, closes QMP and the sockets, and removes the directory -- also after an
exception or KeyboardInterrupt -- and QEMU gets PR_SET_PDEATHSIG, so even a killed
Python does not leave it running.  Errors are QemuError / QemuUnavailable with
one-line messages (what, QEMU's exit status or the last debugcon output, and the tail
of QEMU's stderr).
"""

from __future__ import annotations

import atexit
import errno
import json
import mmap
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .. import process
from .errors import QemuError, QemuUnavailable
from .qmp import QmpConnection, QmpTimeout
from .spec import (MachineSpec, _die_with_parent, _private_tmp_root, die_with_parent_prefix, sweep_stale_dirs,
                   temp_prefix)

QMP_EXIT_GRACE = 2.0  # seconds to let a QEMU whose QMP connection dropped finish exiting
POLL_MIN, POLL_MAX = 0.0002, 0.002  # query-migrate polling: a round trip costs ~0.2 ms
MIGRATION_DONE = frozenset({"completed", "failed", "cancelled"})  # MIGRATION event statuses that end one

_swept = False  # sweep_stale_dirs() ran in this process (before its first machine)


# --- leak protection ----------------------------------------------------------------------

_LIVE: "weakref.WeakSet[Machine]" = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:  # pragma: no cover - only runs when a caller forgot close()
    for machine in list(_LIVE):
        try:
            machine.close()
        except Exception:
            pass


def live_machines() -> list["Machine"]:
    return [m for m in _LIVE if m.running]


# --- guest RAM as a file ------------------------------------------------------------------

# The migration capability that leaves file-backed shared RAM out of the stream; both
# sides must set it (QEMU records it in the stream's configuration section and refuses a
# mismatch).  Only settable over QMP: it is no `-global migration.` property.
RAM_AS_FILE = [{"capability": "x-ignore-shared", "state": True}]


def copy_ram_file(source: str | os.PathLike, fd: int, label: str) -> int:
    """Copy the data extents of the RAM file `source` into the open RAM file `fd` (same
    size), leaving its holes holes: guest RAM is a sparse tmpfs file and mostly never
    touched, so this copies what the guest used, not its size.  Returns bytes copied."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise QemuError(f"{label}: guest RAM file {source}: {exc.strerror or exc}") from None
    copied = 0
    try:
        size = os.fstat(src).st_size
        if size != os.fstat(fd).st_size:
            raise QemuError(f"{label}: guest RAM file {source} has {size} bytes, the machine "
                            f"{os.fstat(fd).st_size}")
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            hole = os.lseek(src, data, os.SEEK_HOLE)
            while data < hole:
                try:
                    n = os.copy_file_range(src, fd, hole - data, data, data)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    # Across file systems (a RAM file kept outside /dev/shm): read and write.
                    n = os.pwrite(fd, os.pread(src, min(hole - data, 1 << 20), data), data)
                if n == 0:
                    raise QemuError(f"{label}: guest RAM file {source} shrank while copied")
                data += n
                copied += n
            offset = hole
    except OSError as exc:
        raise QemuError(f"{label}: copying guest RAM from {source}: {exc.strerror or exc}") from None
    finally:
        os.close(src)
    return copied


# --- the machine ------------------------------------------------------------------------

@dataclass
class _Timing:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


class Machine(process.Closing):
    """One QEMU process (see the module docstring).  Construct = start; close() always."""

    def __init__(self, spec: MachineSpec, *, preload: dict[int, bytes] | None = None,
                 incoming: str | os.PathLike | None = None, defer: bool = False,
                 artifacts: str | os.PathLike | None = None, label: str | None = None,
                 connect: bool = True, ram_from: str | os.PathLike | None = None):
        self.spec = spec
        self.label = label or spec.name
        self.timing = _Timing()
        self.debug_output = bytearray()
        self.console_output = bytearray()  # the serial console (spec.console)
        self.exit_code: int | None = None
        self.proc: subprocess.Popen | None = None
        self.qmp_client = None
        self.memory: mmap.mmap | None = None
        self._artifacts = Path(artifacts) if artifacts else None
        self._keep: list[Path] = []
        self._pidfd: int | None = None
        self._listeners: dict[str, socket.socket] = {}
        self._dbg: socket.socket | None = None
        self._con: socket.socket | None = None
        self._qmp_sock: socket.socket | None = None
        self._ram_fd: int | None = None
        self._closed = False
        self._stderr_file = None
        self.incoming = None if incoming is None else os.fspath(incoming)
        global _swept
        if not _swept:
            _swept = True
            sweep_stale_dirs()
        self.workdir = tempfile.mkdtemp(prefix=temp_prefix(), dir=_private_tmp_root())  # mode 0700
        _LIVE.add(self)
        self._mode = "defer" if defer else (f"file:{self.incoming}" if self.incoming else None)
        self._connected = False
        try:
            self._spawn(preload or {}, self._mode)
            if ram_from is not None:
                # After the spawn, so QEMU's start-up overlaps the copy: QEMU waits for
                # the stream (inmigrate) and touches no guest RAM before it loads.
                t0 = time.perf_counter()
                copy_ram_file(ram_from, self._ram_fd, self.label)
                self.timing.add("ram_copy", time.perf_counter() - t0)
            if connect:
                self.connect()
        except BaseException:
            self.close()
            raise

    @classmethod
    def standby(cls, spec: MachineSpec, *, label: str | None = None) -> "Machine":
        """A QEMU started with `-incoming defer` and not waited for: it initialises in the
        background while the caller goes on.  `connect()` then `migrate_incoming(path)`
        make it a restore of `path` (what `Machine(spec, incoming=path)` is, minus the
        wait for QEMU's start-up); close() it when unused."""
        return cls(spec, defer=True, label=label, connect=False)

    @classmethod
    def restore(cls, spec: MachineSpec, stream: str | os.PathLike, ram: str | os.PathLike, *,
                label: str | None = None, artifacts: str | os.PathLike | None = None) -> "Machine":
        """A fresh QEMU continuing a save(..., ram_to=ram): guest RAM is a copy of `ram`,
        the stream (devices and vCPU state, no RAM) loads with x-ignore-shared set, as on
        the saving side, and the VM resumes."""
        machine = cls(spec, defer=True, label=label, artifacts=artifacts, connect=False, ram_from=ram)
        try:
            machine.connect()
            machine.qmp("migrate-set-capabilities", capabilities=RAM_AS_FILE)
            machine.migrate_incoming(stream)
        except BaseException:
            machine.close()
            raise
        return machine

    def adopt(self, label: str, artifacts: str | os.PathLike | None) -> "Machine":
        """A QEMU started ahead (a standby, a spare boot) taken on by its user: its label
        and artifacts directory become the user's, as if made for it now; connect() next."""
        self.label = label
        if artifacts:
            self.keep_artifacts(artifacts)
        return self

    def connect(self) -> None:
        """Wait for QEMU's sockets and QMP (a machine made with connect=False); then, as the
        constructor does: resume a boot, wait for an -incoming file: load."""
        if self._connected:
            return
        self._connected = True
        try:
            self._finish_start(self._mode)
        except BaseException:
            self.close()
            raise

    # ---- paths ---------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @property
    def gdb_socket(self) -> str:
        return self.path("gdb.sock")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ---- start ---------------------------------------------------------------------------
    def _spawn(self, preload: dict[int, bytes], incoming: str | None) -> None:
        t0 = time.perf_counter()
        size = self.spec.memory_mib << 20
        self._ram_fd = os.open(self.path("ram"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._ram_fd, size)
        self.memory = mmap.mmap(self._ram_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        for gpa, data in preload.items():
            self.write(gpa, data)
        for name in ("qmp", "dbg", "con") if self.spec.console else ("qmp", "dbg"):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind(self.path(f"{name}.sock"))
            listener.listen(1)
            self._listeners[name] = listener
        self.argv = self.spec.argv(self.workdir, incoming)
        with open(self.path("cmdline.json"), "w") as fh:
            json.dump(self.argv, fh)
        self._stderr_file = open(self.path("qemu.stderr"), "w+b")
        wrapper = die_with_parent_prefix()  # PR_SET_PDEATHSIG, by setpriv or else a preexec_fn
        try:
            if wrapper and not os.access(self.spec.qemu, os.X_OK):  # what exec would refuse, as exec says it
                code = errno.EACCES if os.path.exists(self.spec.qemu) else errno.ENOENT
                raise OSError(code, os.strerror(code))
            self.proc = subprocess.Popen([*wrapper, *self.argv], stdin=subprocess.DEVNULL, stdout=self._stderr_file,
                                         stderr=self._stderr_file, close_fds=True,
                                         preexec_fn=None if wrapper else _die_with_parent, cwd=self.workdir)
        except OSError as exc:
            raise QemuUnavailable(f"{self.label}: cannot run {self.spec.qemu}: {exc.strerror or exc}") from None
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self.timing.add("spawn", time.perf_counter() - t0)

    def _finish_start(self, incoming: str | None) -> None:
        t1 = time.perf_counter()
        self._accept_all()
        self._connect_qmp()
        self.timing.add("qmp", time.perf_counter() - t1)
        # QEMU starts with -S: nothing in the guest runs (or exits) while QMP connects.
        if incoming and incoming != "defer":
            t2 = time.perf_counter()
            self.wait_incoming()
            self.timing.add("incoming", time.perf_counter() - t2)
        elif not incoming:
            self.cont()

    def _wait_fds(self, fds: list, timeout: float) -> list:
        """select() on `fds` plus QEMU's exit; raises QemuError when QEMU is gone."""
        extra = [self._pidfd] if self._pidfd is not None else []
        step = timeout if self._pidfd is not None else min(timeout, 0.005)
        ready, _, _ = select.select(list(fds) + extra, [], [], max(step, 0))
        if self._pidfd is not None and self._pidfd in ready or self.proc.poll() is not None:
            self._reap()
            raise self._died()
        return ready

    def _accept_all(self) -> None:
        deadline = time.monotonic() + self.spec.timeout
        pending = dict(self._listeners)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"QEMU did not connect its {' and '.join(pending)} socket(s) within "
                                 f"{self.spec.timeout:g} s")
            for listener in self._wait_fds(list(pending.values()), remaining):
                name = next((n for n, s in pending.items() if s is listener), None)
                if name is None:
                    continue
                conn, _ = listener.accept()
                conn.set_inheritable(False)
                if name == "dbg":
                    conn.setblocking(False)
                    self._dbg = conn
                elif name == "con":
                    conn.setblocking(False)
                    self._con = conn
                else:
                    self._qmp_sock = conn
                del pending[name]
                listener.close()
                self._listeners.pop(name, None)

    def _connect_qmp(self) -> None:
        try:
            self.qmp_client = QmpConnection(self._qmp_sock, self.spec.timeout)
        except Exception as exc:
            raise self._qmp_failure("connect", exc) from None

    # ---- QMP -----------------------------------------------------------------------------
    def qmp(self, command: str, **args):
        """One QMP command; its 'return' value.  QemuError (one line) on any failure."""
        if self.qmp_client is None:
            raise self.error(f"QMP {command}: not connected")
        try:
            return self.qmp_client.cmd(command, **args)
        except Exception as exc:
            raise self._qmp_failure(command, exc) from None

    def _qmp_failure(self, command: str, exc: BaseException) -> QemuError:
        from qemu.qmp import ConnectError, ExecInterruptedError, StateError

        lost = isinstance(exc, (ConnectError, ExecInterruptedError, StateError, EOFError, ConnectionError,
                                QmpTimeout))
        if self.proc is not None and lost:
            # The connection dropped: QEMU is exiting (an error, or the guest's isa-debug-exit).
            # Give it a moment, so the message says why rather than "EOF".
            try:
                self.proc.wait(QMP_EXIT_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is not None:
            self._reap()
            return self._died(f"during QMP {command}")
        detail = getattr(exc, "error_msg", None) or str(exc) or type(exc).__name__
        return self.error(f"QMP {command} failed: {detail}")

    def hmp(self, command_line: str) -> str:
        return self.qmp("human-monitor-command", **{"command-line": command_line})

    def status(self) -> str:
        return self.qmp("query-status")["status"]

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        # Right after the migration says "completed" (its MIGRATION event or query-migrate),
        # QEMU may still be finishing it in its main loop and refuse `cont` with "Migration
        # is not finalized yet" (~1 in 10 saves after the event, here): retry that one
        # refusal, briefly.
        deadline = time.monotonic() + self.spec.timeout
        while True:
            try:
                self.qmp("cont")
                return
            except QemuError as exc:
                if "not finalized yet" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.0005)

    def save(self, path: str | os.PathLike, *, keep: bool = False, ram_to: str | os.PathLike | None = None) -> str:
        """QMP stop + migrate to file:PATH, waiting for completion.  The VM stays stopped
        (status 'postmigrate'); cont() resumes it.

        `ram_to`: guest RAM travels as a file instead of in the stream.  QEMU's
        x-ignore-shared capability leaves RAM blocks backed by a shared file out of the
        stream (RAM is this machine's memory-backend-file, share=on), and the RAM file is
        hard-linked to `ram_to` once the VM is stopped and saved; restore() continues it.
        A Linux guest's ~60 MB of RAM then costs a sparse file copy (~50 ms) instead of
        a ~0.3 s stream load, and the stream keeps everything else, the vCPU's XSAVE
        state included (docs/linux-guests.md, "RAM as a file")."""
        t0 = time.perf_counter()
        path = os.fspath(path)
        self.qmp("stop")
        if ram_to is not None:
            self.qmp("migrate-set-capabilities", capabilities=RAM_AS_FILE)
        self._listen_migration()
        self.qmp("migrate", uri=f"file:{path}")
        self._wait_migration(f"migrate to file:{path}", "not completed")
        if ram_to is not None:
            self._keep_ram(ram_to)
        if keep:
            self._keep.append(Path(path))
        self.timing.add("save", time.perf_counter() - t0)
        return path

    def _keep_ram(self, ram_to: str | os.PathLike) -> None:
        """The stopped VM's RAM file as `ram_to`: a hard link (free), or a sparse copy
        where `ram_to` is on another file system."""
        try:
            os.link(self.path("ram"), ram_to)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise self.error(f"keeping guest RAM as {ram_to}: {exc.strerror or exc}") from None
        try:
            fd = os.open(ram_to, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self.error(f"keeping guest RAM as {ram_to}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, os.fstat(self._ram_fd).st_size)
            copy_ram_file(self.path("ram"), fd, self.label)
        finally:
            os.close(fd)

    _migration_events = None  # the MIGRATION listener _listen_migration() armed for the next wait
    _events_enabled = False  # the 'events' migration capability is on in this QEMU

    def _listen_migration(self) -> None:
        """Before a migrate / migrate-incoming: have QEMU send MIGRATION events (capability
        'events', once per QEMU) and listen for them, so _wait_migration sleeps until the
        migration ends rather than polling query-migrate every 0.2-2 ms (each poll wakes
        QEMU's main loop, which competes with the migration thread for the CPU)."""
        if not self._events_enabled:
            self.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            self._events_enabled = True
        if self.qmp_client is None:
            return  # not connected: the migrate command that follows says so
        if self._migration_events is not None:  # armed for a migrate that then failed to start
            self.qmp_client.forget(self._migration_events)
        self._migration_events = self.qmp_client.listen("MIGRATION")

    def _wait_migration(self, what: str, not_done: str) -> None:
        """Wait for the MIGRATION event that ends it (when _listen_migration armed one):
        'completed' is the verdict; anything else (failed, cancelled, QEMU's exit, the
        deadline) goes on to the query-migrate poll, which gives the verdict and the
        message as before (failed/cancelled/timeout -> QemuError, QEMU's death -> its exit)."""
        deadline = time.monotonic() + self.spec.timeout
        listener, self._migration_events = self._migration_events, None
        if listener is not None:
            try:
                if self._await_migration_event(listener, deadline) == "completed":
                    return
            finally:
                try:
                    self.qmp_client.forget(listener)
                except Exception:
                    pass  # the connection is gone: the poll below reports why
        delay = POLL_MIN
        while True:
            info = self.qmp("query-migrate")
            state = info.get("status")
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                raise self.error(f"{what} {state}: {info.get('error-desc', 'no detail')}")
            if time.monotonic() > deadline:
                raise self.error(f"{what}: {not_done} within {self.spec.timeout:g} s "
                                 f"(migration status {state}, VM {self.status()})")
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX)

    def _await_migration_event(self, listener, deadline: float) -> str | None:
        """Until a MIGRATION event with a final status (returned), QEMU's exit or the
        deadline (None)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.qmp_client is None:
                return None
            # Without a pidfd nothing wakes us at QEMU's exit: look at it every 50 ms.
            step = remaining if self._pidfd is not None else min(remaining, 0.05)
            try:
                event = self.qmp_client.next_event(listener, step, self._pidfd)
            except QmpTimeout:
                if self.proc.poll() is not None:
                    return None
                continue
            except Exception:
                return None  # the connection failed: the poll reports it
            if event is None:
                return None
            status = event.get("data", {}).get("status")
            if status in MIGRATION_DONE:
                return status

    def wait_incoming(self, *, resume: bool = True) -> None:
        """After -incoming file:PATH: wait until the stream is loaded, then (resume) cont.

        Our streams come from a VM stopped with QMP `stop`, so the destination loads them
        into a paused VM (QEMU migrates the run state); a load error makes QEMU exit,
        which surfaces here as a QemuError with its stderr."""
        self._wait_migration(f"restoring {self.incoming}", "not loaded")
        if resume and self.status() != "running":
            self.cont()

    def migrate_incoming(self, path: str | os.PathLike, *, resume: bool = True) -> None:
        """For a machine started with defer=True (-incoming defer): load `path` now."""
        self.incoming = os.fspath(path)
        self._listen_migration()
        self.qmp("migrate-incoming", uri=f"file:{self.incoming}")
        self.wait_incoming(resume=resume)

    def pmemsave(self, gpa: int, size: int) -> bytes:
        """Guest-physical memory through QMP pmemsave (a file in the private directory)."""
        path = self.path(f"pmem-{gpa:x}-{size:x}.bin")
        self.qmp("pmemsave", val=gpa, size=size, filename=path)
        try:
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            os.unlink(path)

    # ---- guest memory (shared mapping) ---------------------------------------------------
    def _check_range(self, gpa: int, size: int) -> None:
        if self.memory is None or self.memory.closed:
            raise self.error("guest memory is not mapped (machine closed)")
        if gpa < 0 or size < 0 or gpa + size > len(self.memory):
            raise self.error(f"guest range {gpa:#x}+{size:#x} is outside RAM ({len(self.memory):#x} bytes)")

    def write(self, gpa: int, data: bytes) -> None:
        self._check_range(gpa, len(data))
        self.memory[gpa:gpa + len(data)] = bytes(data)

    def read(self, gpa: int, size: int) -> bytes:
        self._check_range(gpa, size)
        return self.memory[gpa:gpa + size]

    # ---- debugcon --------------------------------------------------------------------------
    def _drain(self) -> bool:
        """Read whatever debugcon has; False when the socket is closed."""
        return _recv_into(self._dbg, self.debug_output)

    def expect(self, char: bytes, *, since: int = 0, timeout: float | None = None) -> int:
        """Wait until `char` appears on debugcon at or after offset `since`; return its offset.
        QemuError when QEMU exits first or nothing comes within `timeout`."""
        timeout = self.spec.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        while True:
            at = self.debug_output.find(char, since)
            if at >= 0:
                self.timing.add("guest", time.perf_counter() - t0)
                return at
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"no {char.decode(errors='replace')!r} on debugcon within {timeout:g} s")
            if self._dbg is None:
                raise self.error("debugcon is not connected")
            try:
                self._wait_fds([self._dbg], remaining)
            except QemuError:
                self._drain()
                if self.debug_output.find(char, since) >= 0:
                    return self.debug_output.find(char, since)
                raise
            if not self._drain():
                self._dbg.close()
                self._dbg = None
                self.wait_exit(self.spec.timeout)
                raise self._died(f"while waiting for {char.decode(errors='replace')!r} on debugcon")

    # ---- serial console (spec.console) --------------------------------------------------
    def read_console(self) -> bytes:
        """Everything the guest wrote to its serial port so far."""
        if self._con is not None and not _recv_into(self._con, self.console_output):
            self._con.close()
            self._con = None
        return bytes(self.console_output)

    def send_console(self, data: bytes) -> None:
        """Type `data` into the guest's serial port."""
        if self._con is None:
            raise self.error("the serial console is not connected" if self.spec.console
                             else "no serial console (MachineSpec.console is off)")
        self._con.settimeout(self.spec.timeout)
        try:
            self._con.sendall(data)
        except OSError as exc:
            raise self.error(f"cannot write to the serial console: {exc.strerror or exc}") from None
        finally:
            self._con.setblocking(False)

    def wait_console(self, predicate, *, timeout: float | None = None, what: str = "console output"):
        """Wait until predicate(console bytes so far) is true; return its value.  QemuError
        (one line, naming `what`) when QEMU exits first or `timeout` passes."""
        timeout = self.spec.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.read_console())
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"no {what} on the serial console within {timeout:g} s")
            if self._con is None:
                if self.proc.poll() is None:
                    self.wait_exit(self.spec.timeout)
                raise self._died(f"while waiting for {what} on the serial console")
            try:
                self._wait_fds([self._con], remaining)
            except QemuError:
                value = predicate(self.read_console())  # written just before QEMU exited
                if value:
                    return value
                raise self._died(f"while waiting for {what} on the serial console") from None

    # ---- exit ---------------------------------------------------------------------------
    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit on its own (isa-debug-exit); its exit status."""
        if self.proc is None:
            raise self.error("not started")
        timeout = self.spec.timeout if timeout is None else timeout
        if self._pidfd is not None and self.proc.poll() is None:
            select.select([self._pidfd], [], [], timeout)  # wakes at the exit, not at a poll step
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"QEMU did not exit within {timeout:g} s") from None
        self._reap()
        return self.exit_code

    def _reap(self) -> None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = self.proc.wait()
        if self._dbg is not None:
            self._drain()
        if self._con is not None:
            self.read_console()

    def stderr_tail(self, lines: int = 3, limit: int = 300) -> str:
        try:
            with open(self.path("qemu.stderr"), "rb") as fh:
                text = fh.read()[-8192:].decode(errors="replace")
        except OSError:
            return ""
        useful = [ln.strip() for ln in text.splitlines() if ln.strip()]
        tail = " | ".join(useful[-lines:])
        return tail if len(tail) <= limit else "..." + tail[-limit:]

    def _died(self, when: str = "") -> QemuError:
        code = self.exit_code if self.exit_code is not None else self.proc.poll()
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code} ({describe_exit(code)})"
        where = f" {when}" if when else ""
        return self.error(f"QEMU {how}{where}", stopped=True)

    def error(self, what: str, *, stopped: bool = False) -> QemuError:
        """A one-line QemuError with the debugcon output so far and QEMU's stderr tail."""
        parts = [f"{self.label}: {what}"]
        if self.debug_output:
            parts.append(f"debugcon {bytes(self.debug_output[-24:]).decode(errors='replace')!r}")
        tail = self.stderr_tail()
        if tail:
            parts.append(f"stderr: {tail}")
        elif stopped:
            parts.append("no stderr")
        return QemuError("; ".join(parts))

    # ---- artifacts and cleanup ----------------------------------------------------------
    def keep_artifacts(self, directory: str | os.PathLike) -> None:
        """On close(), copy the command line, QEMU's stderr, the debugcon log and the
        migration files saved with keep=True into `directory`."""
        self._artifacts = Path(directory)

    def keep_file(self, path: str | os.PathLike) -> None:
        self._keep.append(Path(path))

    def _save_artifacts(self) -> None:
        if self._artifacts is None:
            return
        try:
            self._artifacts.mkdir(parents=True, exist_ok=True)
            prefix = f"{self.label}-{self.pid or 0}-"
            (self._artifacts / f"{prefix}debugcon.log").write_bytes(bytes(self.debug_output))
            if self.spec.console:
                (self._artifacts / f"{prefix}console.log").write_bytes(bytes(self.console_output))
            for name in ("qemu.stderr", "cmdline.json"):
                if os.path.exists(self.path(name)):
                    shutil.copyfile(self.path(name), self._artifacts / f"{prefix}{name}")
            for path in self._keep:
                if path.exists():
                    shutil.copyfile(path, self._artifacts / f"{prefix}{path.name}")
        except OSError:
            pass  # artifacts are best effort; cleanup must still happen

    def close(self) -> None:
        """Kill and reap QEMU, close QMP and the sockets, remove the private directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.exit_code = process.stop(self.proc, exit_code=self.exit_code)
            process.close_quietly(self.qmp_client)
            self.qmp_client = None
            process.close_quietly(self._dbg, self._con, self._qmp_sock, *self._listeners.values(), errors=(OSError,))
            self._dbg = self._con = self._qmp_sock = None
            self._listeners.clear()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            if self._stderr_file is not None:
                self._stderr_file.close()
            self._save_artifacts()
        finally:
            process.close_quietly(self.memory, errors=(BufferError,))
            if self._ram_fd is not None:
                os.close(self._ram_fd)
                self._ram_fd = None
            process.remove_tree(self.workdir)
            _LIVE.discard(self)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.exit_code}"
        return f"<Machine {self.label} pid {self.pid} {state} {self.workdir}>"


def _recv_into(sock: socket.socket, buf: bytearray) -> bool:
    """Append whatever a non-blocking socket has to `buf`; False when it is closed."""
    while True:
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        buf += chunk


def describe_exit(code: int | None) -> str:
    """What a QEMU exit status means for our guests."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    if code == 0:
        return "the guest reset or triple-faulted (-no-reboot), or QEMU quit"
    if code == 1:
        return "QEMU error, or isa-debug-exit status 0"
    if code & 1:
        return f"isa-debug-exit status {code >> 1}"
    return "QEMU error"

