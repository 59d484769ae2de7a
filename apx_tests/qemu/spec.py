"""Which QEMU to start and how: finding the binary and its qboot.rom, whether /dev/kvm is
usable, facts of a binary measured once by a short run (``kvm_cpu_model``), the private
temporary directories of this process, and ``MachineSpec`` (the command line).

What each QEMU gets (docs/qemu.md):
  -machine microvm -bios qboot.rom -nodefaults -no-user-config -display none -no-reboot -S
  -accel kvm -cpu host (host,-arch-capabilities where -cpu host aborts: kvm_cpu_model) | -accel tcg -cpu max
  guest RAM: a memory-backend-file (share=on) in the machine's private directory, which
    the Python process also maps: mailbox reads and writes cost no QEMU round trip at all
  isa-debugcon (0xE9) on a chardev socket the Python process listens on; isa-debug-exit (0xF4)
  QMP on a chardev socket the Python process listens on (client mode: no connect race)
  gdbstub: -gdb unix:DIR/gdb.sock,server=on,wait=off (for the gdb observer)
  -incoming file:PATH or defer for restores

Every QEMU started here (short runs and ``machine.Machine``'s) gets PR_SET_PDEATHSIG
(``_die_with_parent``, or util-linux ``setpriv --pdeathsig`` for machines:
``die_with_parent_prefix``), so even a killed Python does not leave it running.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import QemuUnavailable

QEMU_BINARY = "qemu-system-x86_64"
QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/seabios/qboot.rom")
# The payload guests' RAM: what the KVM micro-VMM gives the same guest (kvm/vmm.py
# MEMORY_SIZE; the mailbox sits at 2 MiB).  Every migration walks all of it -- each page
# faulted in on a QEMU's first save or load, one record per page in every stream -- so
# 16 MiB cost a fresh_vm case tens of ms more than 4 MiB, for RAM the guest never uses.
DEFAULT_MEMORY_MIB = 4
DEFAULT_TIMEOUT = 10.0
TEMP_PREFIX = "apx-qemu-"  # + pid + "-": a process finds (and a test counts) only its own directories
MICROVM_MACHINE = "microvm,pit=off,pic=off,rtc=off,isa-serial=off,acpi=off"  # the payload guests' machine
KVM_CPU_HOST = "host"
# Where a start under -cpu host aborts on "failed to set MSR 0x10a" (kvm_cpu_model decides,
# per binary): QEMU 10 on a nested paravirtual KVM; docs/qemu.md.
KVM_CPU_NO_ARCH_CAPABILITIES = "host,-arch-capabilities"
MSR_ARCH_CAPABILITIES_ABORT = "failed to set MSR 0x10a"
TCG_CPU = "max"
SHORT_RUN_TIMEOUT = 30.0  # seconds for one short QEMU run (--version, a start to check a -cpu)


# --- finding things -------------------------------------------------------------------

def find_qemu(explicit: str | None = None) -> str:
    """The qemu-system-x86_64 to use: `explicit`, the first of $APX_QEMU, or PATH.  QemuUnavailable
    (one line) when there is none or it is not executable."""
    # $APX_QEMU may list several QEMUs (os.pathsep-separated): the first is the primary one.
    candidate = explicit or (os.environ.get("APX_QEMU") or "").split(os.pathsep)[0] or QEMU_BINARY
    path = candidate if os.sep in candidate else shutil.which(candidate)
    if path is None:
        raise QemuUnavailable(f"{candidate}: not found in PATH (install qemu-system-x86, or pass --apx-qemu)")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise QemuUnavailable(f"{path}: not an executable file")
    return path


def find_qboot(qemu: str) -> str:
    """qboot.rom of this QEMU: PREFIX/share/qemu (an installed tree, or ci/bootstrap's side
    QEMU, whose share/ is its root filesystem's), the build tree's pc-bios/ (a self-built
    QEMU run from its build directory), else the Debian locations."""
    binary = Path(qemu).resolve()
    prefix = binary.parent.parent
    candidates = (prefix / "share" / "qemu" / "qboot.rom", binary.parent / "pc-bios" / "qboot.rom",
                  *map(Path, QBOOT_CANDIDATES))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise QemuUnavailable(f"qboot.rom not found (looked in {prefix / 'share/qemu'}, {binary.parent / 'pc-bios'} "
                          f"and {', '.join(QBOOT_CANDIDATES)}); the microvm machine needs it")


def kvm_usable(path: str = "/dev/kvm") -> str | None:
    """None if /dev/kvm opens read-write, else why not (one line)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    os.close(fd)
    return None


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


@functools.lru_cache(maxsize=None)
def die_with_parent_prefix() -> tuple[str, ...]:
    """An argv prefix giving the command PR_SET_PDEATHSIG without a preexec_fn: util-linux
    `setpriv --pdeathsig KILL --` sets it and execs the command (same pid).  Any preexec_fn
    makes subprocess fork() the whole Python process instead of vfork(): ~6 ms a QEMU on a
    nested 2-core host, against ~1 ms for the extra exec.  () when setpriv is missing or
    does not know --pdeathsig (util-linux < 2.33): callers then use _die_with_parent."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else ()


# --- short runs: facts of a binary, measured once -----------------------------------------

def stat_key(path: str) -> tuple[str, int, int]:
    """(path, mtime, size): what a per-binary memo is keyed by (a rebuilt QEMU is new)."""
    try:
        st = os.stat(path)
    except OSError:
        return path, 0, 0
    return path, st.st_mtime_ns, st.st_size


def run_short(argv: list[str], stdin: str | None = None,
              timeout: float = SHORT_RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a QEMU that ends by itself (or on QMP `quit` from stdin); subprocess.run kills
    and reaps it on a timeout, so nothing is left."""
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          env={**os.environ, "LC_ALL": "C"}, preexec_fn=_die_with_parent)


def probe_argv(qemu: str, accel: str, cpu: str) -> list[str]:
    """A QEMU that builds the machine and its vCPU, then waits (-S) for QMP on stdin:
    nothing runs in the guest, no socket or file is made."""
    return [qemu, "-machine", MICROVM_MACHINE, "-bios", find_qboot(qemu), "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-m", "16M", "-accel", accel, "-cpu", cpu, "-qmp", "stdio"]


QMP_QUIT = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


@dataclass(frozen=True)
class KvmCpu:
    cpu: str   # the -cpu model for KVM guests of one QEMU binary
    why: str   # what the start under -cpu host showed (one line)


def _line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@functools.lru_cache(maxsize=16)
def _kvm_cpu(path: str, _mtime: int, _size: int) -> KvmCpu:
    why = kvm_usable()
    if why is not None:
        return KvmCpu(KVM_CPU_HOST, f"not measured: {why}")
    try:
        proc = run_short(probe_argv(path, "kvm", KVM_CPU_HOST), stdin=QMP_QUIT)
    except subprocess.TimeoutExpired:
        return KvmCpu(KVM_CPU_HOST, f"-cpu host: no answer within {SHORT_RUN_TIMEOUT:g} s (kept)")
    except (OSError, QemuUnavailable) as exc:
        return KvmCpu(KVM_CPU_HOST, f"-cpu host: not measured: {getattr(exc, 'strerror', None) or exc}")
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    abort = next((ln for ln in lines if MSR_ARCH_CAPABILITIES_ABORT in ln), None)
    if abort is not None:
        # This host's KVM refuses QEMU's write of IA32_ARCH_CAPABILITIES (QEMU 10 on the
        # nested paravirtual KVM here): an assertion aborts QEMU at its first vCPU reset,
        # before any QMP command.  The MSR has nothing to do with register state, so the
        # guests of this binary go without it.
        return KvmCpu(KVM_CPU_NO_ARCH_CAPABILITIES, f"-cpu host aborts ({_line(abort)})")
    if proc.returncode == 0:
        return KvmCpu(KVM_CPU_HOST, "-cpu host starts")
    # Another failure: keep -cpu host, so the cases show QEMU's own error.
    return KvmCpu(KVM_CPU_HOST, f"-cpu host: exit {proc.returncode}"
                                + (f": {_line(lines[-1])}" if lines else "") + " (kept)")


def kvm_cpu_model(qemu: str) -> KvmCpu:
    """The -cpu of KVM guests of `qemu`: `host`, or `host,-arch-capabilities` where a start
    under -cpu host aborts with "failed to set MSR 0x10a"; measured once per binary
    (path, size, mtime) and process, by one QEMU start (~0.1 s) that leaves nothing."""
    return _kvm_cpu(*stat_key(find_qemu(qemu)))


def temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def our_temp_dirs() -> list[str]:
    """Private directories of this process's machines and snapshots that still exist."""
    found = []
    for root in {_private_tmp_root() or tempfile.gettempdir(), tempfile.gettempdir()}:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        found += [os.path.join(root, n) for n in names if n.startswith(temp_prefix())]
    return sorted(found)


def sweep_stale_dirs() -> list[str]:
    """Remove private directories left by processes of ours that no longer exist (a
    SIGKILLed or SIGTERMed test run cannot clean up; PR_SET_PDEATHSIG already ended its
    QEMUs).  Done once per process, before the first machine starts."""
    removed = []
    for root in {_private_tmp_root() or tempfile.gettempdir(), tempfile.gettempdir()}:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            parts = name[len(TEMP_PREFIX):].split("-", 1) if name.startswith(TEMP_PREFIX) else []
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) == os.getpid():
                continue
            try:
                os.kill(int(parts[0]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # someone else's live process
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _private_tmp_root() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


# --- the machine's configuration ----------------------------------------------------------

@dataclass(frozen=True)
class MachineSpec:
    """Everything that must be identical between a machine and the ones restoring its
    streams (QEMU refuses a stream from a different machine configuration)."""

    qemu: str
    accel: str
    cpu: str
    kernel: str
    bios: str
    memory_mib: int = DEFAULT_MEMORY_MIB
    extra: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    machine: str = MICROVM_MACHINE  # the -machine value; ",memory-backend=ram" is appended
    console: bool = False  # the serial port (ttyS0) on a chardev socket this process listens on
    # Guest RAM populated by QEMU while it starts (prealloc=on), not a page at a time when
    # first touched.  A QEMU's first migration (save or load) reads every page of guest RAM,
    # and each first touch of a tmpfs page is a page fault that allocates it (~5 us each on
    # a nested host: ~25 ms for 16 MiB).  Not part of the stream: a restoring machine may
    # differ from the saving one here.
    prealloc: bool = False

    @classmethod
    def create(cls, *, accel: str, kernel: str | os.PathLike, qemu: str | None = None, cpu: str | None = None,
               memory_mib: int = DEFAULT_MEMORY_MIB, extra: Iterable[str] = (),
               timeout: float = DEFAULT_TIMEOUT, machine: str = MICROVM_MACHINE,
               console: bool = False, prealloc: bool = False) -> "MachineSpec":
        if accel not in ("kvm", "tcg"):
            raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}")
        path = find_qemu(qemu)
        if accel == "kvm":
            why = kvm_usable()
            if why:
                raise QemuUnavailable(f"-accel kvm: {why}")
        if cpu is None:
            cpu = kvm_cpu_model(path).cpu if accel == "kvm" else TCG_CPU
        return cls(path, accel, cpu, os.fspath(kernel),
                   find_qboot(path), memory_mib, tuple(extra), timeout, machine, console, prealloc)

    @property
    def name(self) -> str:
        return f"qemu-{self.accel}"

    def argv(self, workdir: str, incoming: str | None) -> list[str]:
        d = workdir
        mem = f"{self.memory_mib}M"
        argv = [
            self.qemu,
            "-machine", f"{self.machine},memory-backend=ram",
            "-bios", self.bios,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
            "-accel", self.accel, "-cpu", self.cpu, "-smp", "1", "-m", mem,
            "-object", f"memory-backend-file,id=ram,size={mem},mem-path={d}/ram,share=on"
                      + (",prealloc=on" if self.prealloc else ""),
            "-chardev", f"socket,id=dbg,path={d}/dbg.sock",
            "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-chardev", f"socket,id=qmp,path={d}/qmp.sock",
            "-mon", "chardev=qmp,mode=control",
            "-gdb", f"unix:{d}/gdb.sock,server=on,wait=off",
            "-kernel", self.kernel,
        ]
        if self.console:
            argv += ["-chardev", f"socket,id=con,path={d}/con.sock", "-serial", "chardev:con"]
        argv += self.extra
        if incoming:
            argv += ["-incoming", incoming]
        return argv
