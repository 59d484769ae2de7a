"""The shared Linux boot: `ReadyGuest`, one boot of the Linux guest to /init's waiting
state (apx.wait=console), saved once to a read-only file that every
``linux_session.LinuxHolderRun(ready=...)`` restores instead of booting.
docs/linux-guests.md ("The shared boot").
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from .. import process
from ..guests import linux
from .errors import QemuError
from .linux_accel import LINUX_MACHINE, LINUX_MEMORY_MIB, QEMU_TIMEOUT
from .linux_session import SAVE_BANDWIDTH, TIMEOUT, LinuxSessionError, PrivateFiles, _tail
from .machine import Machine
from .spec import MachineSpec, _private_tmp_root, temp_prefix


class ReadyGuest(PrivateFiles, process.Closing):
    """The guest booted once to /init's waiting state (apx.wait=console) and saved to a
    file: the 'ready' snapshot every ``LinuxHolderRun(ready=...)`` restores in a fresh
    QEMU instead of booting (what Firecracker's snapshot restore does).

        with ReadyGuest(accel="tcg", qemu=q, kernel=k) as ready:
            ready.boot()                 # once: QEMU boots, /init prints "waiting for
                                         # apx-run", migrate to file, kill that QEMU
            with LinuxHolderRun("ymm", ready=ready, ...) as run:
                run.boot()               # restore the ready file, send "apx-run ymm load=1
                ...                      # expect=1", wait for the holder's ready line

    The file is only ever read: each run restores it into its own QEMU, so nothing one
    case does reaches the next.  The guest checks it too: it numbers the commands it
    takes, and a run insists on "command 1" (a restore of a used state says "busy" or a
    higher number, and the run fails).  One item per command, as one item per boot before.
    """

    def __init__(self, *, accel: str = "tcg", qemu: str | None = None, kernel: str | os.PathLike | None = None,
                 cpu: str | None = None, timeout: float = TIMEOUT, artifacts: str | os.PathLike | None = None):
        self.accel = accel
        self.qemu = qemu
        self.kernel = kernel
        self.cpu = cpu
        self.timeout = timeout
        self.artifacts = artifacts
        self.label = f"linux-{accel} ready"
        self.seconds: dict[str, float] = {}
        self.guest: linux.LinuxGuest | None = None
        self.spec: MachineSpec | None = None
        self.path: Path | None = None  # the ready snapshot, once booted (no RAM: x-ignore-shared)
        self.console = ""
        self.pids: list[int] = []
        self.machine_dirs: list[str] = []
        self._closed = False
        self._thread: threading.Thread | None = None  # start(): boot() running in the background
        self._thread_error: BaseException | None = None
        self._boot_lock = threading.Lock()
        self._booting = None  # the boot's Machine while it runs (close() ends it)
        self.workdir = Path(tempfile.mkdtemp(prefix=temp_prefix() + "linux-ready-", dir=_private_tmp_root()))
        self.ram = self.workdir / "ready.ram"  # its guest RAM (Machine.save(ram_to=)), once booted

    def matches(self, *, accel: str, qemu, kernel, cpu) -> bool:
        return (accel, qemu, kernel, cpu) == (self.accel, self.qemu, self.kernel, self.cpu)

    def start(self) -> None:
        """Begin boot() in a background thread, so the boot (a TCG guest's ~3 s of one core)
        runs while other tests do; boot() then waits for it and raises what it raised.
        The thread starts and ends the boot's QEMU itself (a QEMU's parent-death signal
        follows the thread that spawned it)."""
        if self.path is not None or self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._boot_in_background, name=f"{self.label} boot", daemon=True)
        self._thread.start()

    def _boot_in_background(self) -> None:
        try:
            self._boot()
        except BaseException as exc:  # handed to the boot() that waits for it
            self._thread_error = exc

    def boot(self) -> Path:
        """Boot to the waiting line and save (once; later calls return the file).  Runs
        started side by side (test_linux_restore's two) may ask at once: one boots or
        waits for the background boot, the other waits for it."""
        with self._boot_lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                thread.join()
                error, self._thread_error = self._thread_error, None
                if error is not None:
                    raise error
            return self._boot()

    def _boot(self) -> Path:
        if self.path is not None:
            return self.path
        if self._closed:
            raise LinuxSessionError(f"{self.label}: closed")
        self.guest = linux.linux_guest(self.workdir, [], kernel=self.kernel, release="console", wait=True,
                                       exit_port=0xF4, accel=self.accel)
        try:
            self.spec = MachineSpec.create(accel=self.accel, kernel=self.guest.kernel, qemu=self.qemu,
                                           cpu=self.cpu, memory_mib=LINUX_MEMORY_MIB, machine=LINUX_MACHINE,
                                           console=True, timeout=QEMU_TIMEOUT,
                                           extra=("-initrd", str(self.guest.initramfs), "-append", self.guest.cmdline))
        except QemuError as exc:
            raise LinuxSessionError(f"{self.label} boot: {exc}") from None
        t0 = time.perf_counter()
        machine = None
        try:
            try:
                machine = self._booting = Machine(self.spec, label=f"qemu-{self.accel} ready boot",
                                                  artifacts=self.artifacts)
                if self._closed:  # closed while this QEMU started (a background boot)
                    raise QemuError(f"{self.label}: closed")
                self.pids.append(machine.pid)
                self.machine_dirs.append(machine.workdir)
                machine.wait_console(lambda out: linux.WAITING_LINE in linux.parse_console(out).lines or None,
                                     timeout=self.timeout, what=f"/init's {linux.WAITING_LINE!r}")
            except QemuError as exc:
                tail = "" if machine is None else f"; console: {_tail(machine.read_console().decode(errors='replace'))!r}"
                raise LinuxSessionError(f"{self.label} boot: {exc}{tail}") from None
            self.seconds["boot_to_waiting"] = time.perf_counter() - t0
            path = self.workdir / "ready.mig"
            t1 = time.perf_counter()
            try:
                machine.qmp("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
                machine.save(path, ram_to=self.ram)
            except QemuError as exc:
                raise LinuxSessionError(f"{self.label} snapshot: {exc}") from None
            self.seconds["save"] = time.perf_counter() - t1
            self.console = machine.read_console().decode(errors="replace")
        finally:
            self._booting = None
            if machine is not None:
                machine.close()
        os.chmod(path, 0o400)  # read by every run, written by none
        os.chmod(self.ram, 0o400)
        self.path = path
        return path

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            # A background boot: kill its QEMU (the thread sees it die, closes the machine
            # and ends; closing the Machine from here would race the thread's own close).
            booting = self._booting
            if booting is not None and booting.proc is not None:
                try:
                    booting.proc.kill()
                except OSError:
                    pass
            thread.join(self.timeout + QEMU_TIMEOUT)
        self.path = None
        process.remove_tree(self.workdir)
