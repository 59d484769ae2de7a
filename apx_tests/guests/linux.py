"""Linux guests: a real kernel, a generated initramfs, a user program holding the registers.

- Kernel: ``linux_kernel.find_kernel()`` (an explicit path, or the Debian cloud kernel,
  cached and fetched when missing).
- Programs: ``linux_programs.build_init()`` and ``build_holder()`` (static, cached).
- ``initramfs.build_initramfs()``: a newc cpio archive written in pure Python.
- Here: ``guest_files()`` (the standard /init + holder), ``kernel_cmdline()``,
  ``linux_guest()`` -> ``LinuxGuest``: the paths and QEMU arguments (``-kernel``,
  ``-initrd``, ``-append``); ``parse_console()`` reads the serial log (ready lines,
  KTAP results); ``python -m apx_tests.guests.linux`` (kernel, initramfs, cmdline).

Backend-neutral: nothing here starts QEMU.  See docs/linux-guests.md.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .build import GuestBuildError
from .initramfs import Entry, File, _as_entry, build_initramfs
from .linux_kernel import KernelUnavailable, find_kernel, pvh_kernel
from .linux_programs import HOLDER, STAGES, build_holder, build_init


# --- constants shared with guests/linux/*.c ----------------------------------------------

DEFAULT_RUN = ("xmm", "ymm", "x87", "ctx-ymm")  # init.c: DEFAULT_RUN
COMMAND_WORD = "apx-run"  # init.c: the console command a waiting /init (apx.wait=console) takes
WAITING_LINE = "# apx-init: waiting for apx-run"  # init.c: printed when it starts to wait
COMMAND_RE = re.compile(r"^# apx-init: command (?P<number>\d+) run=(?P<run>\S+) load=(?P<load>-?\d+) "
                        r"expect=(?P<expect>-?\d+)")  # init.c: the command it took
BUSY_PREFIX = "# apx-init: busy"  # init.c: an apx-run line while a command runs (a used state)
RELEASE_LINE = "apx-release"  # init.c: sent on the console, ends the spin (apx.release=console)
DONE_PREFIX = "# apx-init: done"  # the last line /init prints before powering off
EXIT_STATUS_PASS, EXIT_STATUS_FAIL = 1, 2  # apx.exit=PORT values (QEMU exits 3 / 5)

# What QEMU needs around the kernel; measured choices, see docs/linux-guests.md.
MACHINE_ARGS = ("-machine", "microvm", "-bios", "qboot.rom")  # qboot boots a bzImage directly
MEMORY = "256M"

READY_RE = re.compile(r"apx-holder: ready bank=(?P<bank>\w+) pid=(?P<pid>\d+)(?P<rest>[^\r\n]*)")
_KTAP_RESULT = re.compile(r"^(?P<not>not )?ok (?P<number>\d+) (?P<name>\S+)(?: # (?P<directive>.*))?$")
_KTAP_PLAN = re.compile(r"^1\.\.(\d+)$")
_STARTED = re.compile(r"^# apx-init: started uptime=(?P<uptime>[\d.]+)")


# --- the standard guest's files ----------------------------------------------------------


def guest_files(*, extra_holders: Mapping[str, os.PathLike] | None = None,
                banks: Iterable[str] | None = None) -> dict[str, Entry]:
    """The standard guest: /init and /bin/apx-holder, plus `extra_holders`
    ({program name: built binary}, run with apx.run items BANK@PROGRAM)."""
    programs = {"init": build_init(), f"bin/{HOLDER}": build_holder(banks)}
    for name, path in (extra_holders or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"holder program name {name!r}: use letters, digits, '_', '.', '-'")
        programs[f"bin/{name}"] = Path(path)
    # Mode 0755 whatever the cached file's mode: the kernel runs /init only if executable.
    return {where: File(_as_entry(path, where).data, 0o755) for where, path in programs.items()}


# --- the command line and what QEMU gets -------------------------------------------------


_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl $32,%rdx; or %rdx,%rax; ret


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz (TCG guests read the host TSC), measured against
    CLOCK_MONOTONIC over 20 ms; /proc/cpuinfo's "cpu MHz" if it cannot be measured;
    None when neither works."""
    try:
        import ctypes
        import ctypes.util
        import mmap

        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_RDTSC_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        t0, c0 = time.monotonic_ns(), rdtsc()
        while time.monotonic_ns() - t0 < 20_000_000:
            pass
        t1, c1 = time.monotonic_ns(), rdtsc()
        khz = (c1 - c0) * 1_000_000 // (t1 - t0)
        if khz > 0:
            return int(khz)
    except Exception:  # no W+X mapping (hardened hosts), not x86: fall back
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def base_kernel_words(accel: str, tsc_khz: int | None = None) -> list[str]:
    """The -append words every guest kernel of ours starts with (these Linux guests and the
    kernel under test): serial console, quiet, reboot on panic, and

    - cryptomgr.notests: the crypto self-tests are ~1 s of a ~3 s TCG boot and test nothing
      of ours (measured: /init at uptime 2.0-2.3 s instead of 3.0-3.2 s);
    - under TCG, tsc_early_khz= (the host's TSC rate): without it the kernel's PIT
      calibration of the TSC fails now and then on a loaded host and the boot hangs."""
    words = ["console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests"]
    if accel == "tcg":
        khz = tsc_khz or host_tsc_khz()
        if khz:
            words.append(f"tsc_early_khz={khz}")
    return words


def kernel_cmdline(run: Iterable[str] = DEFAULT_RUN, *, load: int = 1, expect: int | None = None,
                   spin_ms: int | None = None, release: str = "deadline", cpu: int | None = None,
                   exit_port: int | None = None, timeout_ms: int | None = None, accel: str = "tcg",
                   tsc_khz: int | None = None, wait: bool = False, extra: Iterable[str] = ()) -> str:
    """The -append string: serial console, quiet, and the apx.* settings /init reads.

    Under TCG it adds tsc_early_khz= (the host's TSC rate): without it the kernel's
    PIT calibration of the TSC fails now and then on a loaded host and the boot hangs.
    With `wait` /init waits for a `command_line()` on the console instead of running
    `run` (apx.wait=console: the shared boot, docs/linux-guests.md).
    """
    items = _checked_run(run, load, expect)
    if release not in ("deadline", "console"):
        raise ValueError(f"release {release!r}: 'deadline' or 'console'")
    words = base_kernel_words(accel, tsc_khz)
    words.append(f"apx.run={','.join(items)}")
    words.append(f"apx.load={load}")
    for key, value in (("expect", expect), ("spin_ms", spin_ms), ("cpu", cpu), ("timeout_ms", timeout_ms)):
        if value is not None:
            words.append(f"apx.{key}={value}")
    if release == "console":
        words.append("apx.release=console")
    if wait:
        words.append("apx.wait=console")
    if exit_port is not None:
        words.append(f"apx.exit={exit_port:#x}")
    words += list(extra)
    return " ".join(words)


def _checked_run(run: Iterable[str], load: int | None, expect: int | None) -> list[str]:
    """The run items and stages /init accepts (kernel command line or console command)."""
    items = list(run)
    for item in items:
        if not re.fullmatch(r"(ctx-)?\w+(@[A-Za-z0-9_.-]+)?", item):
            raise ValueError(f"apx.run item {item!r}: want [ctx-]BANK[@PROGRAM]")
    for what, stage in (("load", load), ("expect", expect)):
        if stage is not None and not 0 <= stage < STAGES:
            raise ValueError(f"{what} stage {stage}: the holder has stages 0..{STAGES - 1}")
    return items


def command_line(run: Iterable[str], *, load: int = 1, expect: int | None = None) -> str:
    """The console line a waiting /init (apx.wait=console) takes in place of
    apx.run/apx.load/apx.expect: ``apx-run ITEM,... load=S [expect=S]``."""
    items = _checked_run(run, load, expect)
    return f"{COMMAND_WORD} {','.join(items)} load={load}" + ("" if expect is None else f" expect={expect}")


@dataclass(frozen=True)
class LinuxGuest:
    """A bootable guest: what to hand QEMU. Nothing here runs QEMU."""

    kernel: Path
    initramfs: Path
    cmdline: str

    def boot_args(self) -> list[str]:
        """-kernel, -initrd, -append."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", self.cmdline]

    def qemu_args(self, accel: str = "tcg", *, machine: Iterable[str] = MACHINE_ARGS, smp: int = 1) -> list[str]:
        """Everything but the console and monitor: machine, CPU, memory, no devices, boot.

        Add e.g. ``-serial file:LOG`` (or ``-serial stdio`` / a socket chardev when the
        console must take input) and ``-qmp ...``."""
        cpu = "max" if accel == "tcg" else "host"
        return [*machine, "-accel", accel, "-cpu", cpu, "-m", MEMORY, "-smp", str(smp),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", *self.boot_args()]


def linux_guest(workdir: str | os.PathLike, run: Iterable[str] = DEFAULT_RUN, *,
                kernel: str | os.PathLike | None = None, pvh: bool = True, compress: bool = False,
                extra_holders: Mapping[str, os.PathLike] | None = None, **cmdline) -> LinuxGuest:
    """Build (or reuse cached) programs, write `workdir`/initramfs.cpio, find the kernel.

    `kernel` as for find_kernel(); with `pvh` its PVH vmlinux when one can be had
    (pvh_kernel()), else the bzImage. `cmdline` keywords go to kernel_cmdline()."""
    kernel_path = find_kernel(kernel)
    if pvh:
        kernel_path = pvh_kernel(kernel_path) or kernel_path
    out = Path(workdir) / ("initramfs.cpio.gz" if compress else "initramfs.cpio")
    build_initramfs(guest_files(extra_holders=extra_holders), out, compress=compress)
    return LinuxGuest(kernel_path, out, kernel_cmdline(run, **cmdline))


# --- reading the console -----------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """`apx-holder: ready bank=B pid=N key=value...`: the bank is loaded and spinning."""

    bank: str
    pid: int
    fields: dict[str, str]
    line: int  # index in the console's lines

    @property
    def spin_range(self) -> tuple[int, int] | None:
        """[start, end) of the holder's spin loop: a vCPU at CPL3 with RIP in it runs the
        holder with its bank in the registers."""
        start, sep, end = self.fields.get("spin", "").partition("-")
        try:
            return (int(start, 16), int(end, 16)) if sep else None
        except ValueError:
            return None


@dataclass(frozen=True)
class KtapResult:
    number: int
    ok: bool
    name: str
    directive: str  # text after " # ": "SKIP reason" or a failure reason, or ""

    @property
    def skipped(self) -> bool:
        return self.ok and self.directive.upper().startswith("SKIP")

    @property
    def reason(self) -> str:
        return self.directive[4:].strip() if self.skipped else self.directive


@dataclass
class ConsoleReport:
    ktap_version: int | None = None
    plan: int | None = None
    results: list[KtapResult] = field(default_factory=list)
    ready: list[Ready] = field(default_factory=list)
    started_uptime: float | None = None  # guest seconds since boot when /init started
    done: bool = False  # /init printed its last line
    lines: list[str] = field(default_factory=list)

    def result(self, name: str) -> KtapResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def complete(self) -> bool:
        """All planned results are there and /init finished."""
        return self.done and self.plan is not None and len(self.results) == self.plan

    @property
    def failures(self) -> list[KtapResult]:
        return [r for r in self.results if not r.ok]


def parse_console(text: str | bytes) -> ConsoleReport:
    """Ready lines and KTAP results from a serial console log (kernel lines ignored).

    Only complete lines count: a log read while the guest writes may end in half a
    line, which is left for the next read."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    report = ConsoleReport()
    report.lines = [line.rstrip("\r") for line in text.split("\n")[:-1]]
    for index, line in enumerate(report.lines):
        stripped = line.strip()
        if stripped.startswith("KTAP version "):
            try:
                report.ktap_version = int(stripped.split()[2])
            except (IndexError, ValueError):
                pass
        elif m := _KTAP_PLAN.match(stripped):
            report.plan = int(m.group(1))
        elif m := _KTAP_RESULT.match(stripped):
            report.results.append(KtapResult(int(m["number"]), not m["not"], m["name"], (m["directive"] or "").strip()))
        elif m := READY_RE.search(line):
            fields = dict(kv.split("=", 1) for kv in m["rest"].split() if "=" in kv)
            report.ready.append(Ready(m["bank"], int(m["pid"]), fields, index))
        elif m := _STARTED.match(stripped):
            report.started_uptime = float(m["uptime"])
        elif stripped.startswith(DONE_PREFIX):
            report.done = True
    return report


# --- command line: python -m apx_tests.guests.linux --------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m apx_tests.guests.linux",
                                     description="Linux guest kernel and initramfs for apx_tests")
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel", help="print the kernel path (fetching it into the cache if none is cached)")
    k.add_argument("--no-fetch", action="store_true", help="fail instead of downloading")
    i = sub.add_parser("initramfs", help="build the standard initramfs")
    i.add_argument("out")
    i.add_argument("--gzip", action="store_true")
    c = sub.add_parser("cmdline", help="print a kernel command line")
    c.add_argument("--run", default=",".join(DEFAULT_RUN))
    c.add_argument("--spin-ms", type=int)
    c.add_argument("--release", choices=("deadline", "console"), default="deadline")
    args = parser.parse_args(argv)
    try:
        if args.command == "kernel":
            print(find_kernel(fetch=not args.no_fetch))
        elif args.command == "initramfs":
            print(build_initramfs(guest_files(), args.out, compress=args.gzip))
        else:
            print(kernel_cmdline(args.run.split(","), spin_ms=args.spin_ms, release=args.release))
    except (KernelUnavailable, GuestBuildError, ValueError) as exc:
        print(f"apx_tests: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
