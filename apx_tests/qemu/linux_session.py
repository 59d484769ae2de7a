"""A Linux guest in QEMU holding one register bank: snapshot it mid-spin, restore it in a
fresh QEMU, and let the guest itself say whether its registers survived.

    with LinuxHolderRun("ymm", expect=1) as run:
        run.boot()                       # QEMU (TCG) boots the Debian kernel; the holder loads
                                         # pattern(1) and prints its ready line
        snap = run.snapshot()            # stop inside the holder's spin loop (CPL3, RIP in
                                         # spin=), migrate to file, read the registers from the
                                         # stream and from HMP, kill that QEMU
        snap.check()                     # both observers == BANKS[bank].pattern(1)
        result = run.restore()           # a FRESH QEMU: -incoming file:SNAP, cont, release the
        result.check_ok()                # holder on the console, read its KTAP verdict
        run.restore(run.flipped("ymm13", 21)).result.reason   # "ymm ymm13 byte 21: want ..."

    with LinuxHolderRun("ymm", expect=2) as run:     # the edit path
        run.boot(); run.snapshot().check()
        run.restore(run.edited(2)).check_ok()        # the stream rewritten to pattern(2)

    with LinuxHolderRun("ymm", ctx=True) as run:     # two holders (pattern 1 and 2) on one
        run.boot(); run.snapshot()                   # vCPU, yielding to each other
        run.restore().check_ok()

The guest (apx_tests.guests.linux, docs/linux-guests.md) runs one item, `BANK` or
`ctx-BANK`, with ``apx.release=console``: the holder spins until the line ``apx-release``
arrives on the serial console, so the snapshot can be taken at leisure and the release
goes to the restored QEMU.  QEMU is a `Machine` (machine.py) with ``-machine microvm``
(default devices: the kernel wants its serial port, PIT and RTC), 256 MiB, the serial
console on a socket this process listens on, ``-kernel/-initrd/-append`` as `LinuxGuest`
gives them.  Which accelerator boots the guest, and which banks each accelerator can hold,
are per-host facts (linux_accel.py: `choose_accel()`, `unavailable_reason()`).

Everything one run creates lives in one private directory (``apx-qemu-<pid>-linux-*``,
on /dev/shm) plus the machines' own directories; ``close()`` kills and reaps every QEMU
and removes them all.  Errors are `LinuxSessionError`, one line naming the phase
(``linux-tcg ymm boot: ...``); a missing kernel stays `KernelUnavailable`.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import process
from ..backend import BackendError
from ..guests import linux, linux_programs
from ..xsave import BANKS
from ..xsave.diff import Difference, diff_registers
from .errors import QemuError
from .linux_accel import LINUX_MACHINE, LINUX_MEMORY_MIB, QEMU_TIMEOUT, unavailable_reason  # looked up here by LinuxHolderRun
from .machine import Machine, describe_exit
from .spec import MachineSpec, _private_tmp_root, temp_prefix

TIMEOUT = 60.0  # seconds for a boot to the ready line / a result after the release
STOP_TRIES = 50  # stop, look, cont: at most this many times until the vCPU is in the spin loop
CTX_SETTLE = 0.1  # seconds the ctx pair runs (and switches) before the snapshot and after the restore
SAVE_BANDWIDTH = 16 << 30  # migrate-set-parameters max-bandwidth: QEMU's default 128 MiB/s
# made a Linux guest's ~60 MB stream take 0.6 s instead of 0.25 s (RAM now travels as a file,
# Machine.save(ram_to=), but a save without it must not crawl either)

# Which byte the self-test flips, per bank (a register in the middle, a byte of its upper part).
FLIP = {"xmm": ("xmm13", 5), "ymm": ("ymm13", 21), "x87": ("st5", 3)}


class LinuxSessionError(BackendError):
    """A phase of a Linux guest run failed; str() is one line naming the phase."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def item_name(bank: str, ctx: bool = False) -> str:
    """The KTAP name /init gives the item: holder-BANK or ctxswitch-BANK."""
    return f"{'ctxswitch' if ctx else 'holder'}-{bank}"


def flip_target(bank: str) -> tuple[str, int]:
    """(register, byte) the self-test flips for `bank`."""
    if bank in FLIP:
        return FLIP[bank]
    reg = BANKS[bank].registers[min(13, len(BANKS[bank].registers) - 1)]
    return reg.name, min(21, reg.width - 1)


def _tail(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else "empty"
    return last if len(last) <= limit else last[:limit] + "..."


# --- what a run produces ------------------------------------------------------------------------


@dataclass(frozen=True)
class StopPoint:
    """Where the vCPU was when the snapshot was taken."""

    rip: int
    cpl: int
    spin: tuple[int, int]
    tries: int  # stops it took to land inside the spin loop (1 = the first)
    hmp_text: str = field(repr=False)

    @property
    def in_spin(self) -> bool:
        return self.cpl == 3 and self.spin[0] <= self.rip < self.spin[1]


@dataclass
class Snapshot:
    """The saved stream and what the two observers read from it (stopped VM)."""

    path: Path
    bank: str
    stages: tuple[int, ...]  # the patterns the holder(s) loaded: (load,) or (load, load+1) for ctx
    stop: StopPoint
    observed: dict[str, dict[str, bytes]]  # "migration" / "hmp" -> {register: bytes}
    stream_rip: int
    label: str

    def differences(self, stage: int) -> dict[str, list[Difference]]:
        """Per observer, how its registers differ from BANKS[bank].pattern(stage)."""
        pattern = BANKS[self.bank].pattern(stage)
        return {name: diff_registers(pattern, regs) for name, regs in self.observed.items()}

    def matching_stage(self) -> int | None:
        """The loaded stage both observers agree with (for a ctx pair: whichever holder
        the vCPU was running), or None."""
        for stage in self.stages:
            if not any(self.differences(stage).values()):
                return stage
        return None

    def problems(self) -> list[str]:
        """One-line descriptions of everything wrong with the snapshot (empty: all good)."""
        out = []
        if not self.stop.in_spin:
            out.append(f"vCPU not in the holder's spin loop (CPL={self.stop.cpl} RIP={self.stop.rip:#x}, "
                       f"spin={self.stop.spin[0]:#x}-{self.stop.spin[1]:#x})")
        if self.stream_rip != self.stop.rip:
            out.append(f"migration stream RIP {self.stream_rip:#x} != HMP RIP {self.stop.rip:#x}")
        if self.matching_stage() is None:
            # Name the differences against the closest pattern.
            best = min(self.stages, key=lambda s: sum(len(d) for d in self.differences(s).values()))
            for observer, diffs in self.differences(best).items():
                if diffs:
                    shown = "; ".join(str(d) for d in diffs[:3])
                    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
                    out.append(f"{observer}: not pattern({best}): {shown}{more}")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise LinuxSessionError(f"{self.label} snapshot: {' | '.join(problems)}")


@dataclass
class RestoreResult:
    """What the holder said after a restore in a fresh QEMU."""

    item: str
    result: linux.KtapResult
    report: linux.ConsoleReport  # the restored QEMU's console only
    console: str
    exit_code: int | None
    stream: Path
    seconds: dict[str, float]
    label: str

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.result.skipped

    @property
    def holder_lines(self) -> list[str]:
        """The per-holder lines (`# holder-ymm: holder pid 79 load=1: ok spins=...`)."""
        return [ln.strip() for ln in self.report.lines if ln.strip().startswith(f"# {self.item}: ")]

    def check_ok(self) -> "RestoreResult":
        if not self.ok:
            what = "skipped" if self.result.skipped else "not ok"
            raise LinuxSessionError(f"{self.label} result: {self.item} {what}: {self.result.directive}")
        return self


# --- the shared boot ----------------------------------------------------------------------------


# --- the run ------------------------------------------------------------------------------------


class PrivateFiles:
    """A Linux run's own 0700 directory (`workdir`) and those of the QEMUs it started
    (`machine_dirs`): `temp_paths` lists them all, gone after close()."""

    workdir: Path
    machine_dirs: list[str]

    @property
    def temp_paths(self) -> list[str]:
        return [str(self.workdir), *self.machine_dirs]


class LinuxHolderRun(PrivateFiles, process.Closing):
    """One Linux guest holding `bank` (or, with `ctx`, two holders of it on one vCPU),
    booted once, snapshotted once, restored as often as asked (each time in a new QEMU)."""

    def __init__(self, bank: str, *, ctx: bool = False, load: int = 1, expect: int | None = None,
                 accel: str = "tcg", qemu: str | None = None, kernel: str | os.PathLike | None = None,
                 timeout: float = TIMEOUT, artifacts: str | os.PathLike | None = None,
                 ctx_settle: float = CTX_SETTLE, cpu: str | None = None, ready=None):
        if bank not in BANKS:
            raise ValueError(f"no bank {bank!r} (have {', '.join(BANKS)})")
        if ctx and expect is not None:
            raise ValueError("a ctx pair checks the stages it loaded; expect= is for single holders")
        self.bank = bank
        self.ctx = ctx
        self.load = load
        self.expect = load if expect is None else expect
        self.accel = accel
        self.cpu = cpu  # -cpu (a CPU profile's, apx_tests.profiles); None: the accelerator's default
        self.qemu = qemu
        self.kernel = kernel
        self.timeout = timeout
        self.artifacts = artifacts
        self.ctx_settle = ctx_settle
        self.ready_guest = ready  # a linux_ready.ReadyGuest (the shared boot): boot() restores its snapshot instead of booting
        self.item = item_name(bank, ctx)
        self.label = f"linux-{accel} {bank}{' ctx' if ctx else ''}"
        self.seconds: dict[str, float] = {}  # phase -> seconds (boot, stop, save, observe, ...)
        self.pids: list[int] = []  # every QEMU this run started
        self.machine_dirs: list[str] = []  # their private directories
        self.guest: linux.LinuxGuest | None = None
        self.spec: MachineSpec | None = None
        self.machine: Machine | None = None  # the booted QEMU (until the snapshot kills it)
        self.ready: list[linux.Ready] = []
        self.boot_console = ""
        self.snap: Snapshot | None = None
        self._restores = 0
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=temp_prefix() + "linux-", dir=_private_tmp_root()))
        self.snap_ram = self.workdir / "snapshot.ram"  # the snapshot's guest RAM (Machine.save(ram_to=))

    # ---- helpers --------------------------------------------------------------------------------
    def _error(self, phase: str, detail: str, machine: Machine | None = None) -> LinuxSessionError:
        text = f"{self.label} {phase}: {detail}"
        if machine is not None:
            text += f"; console: {_tail(machine.read_console().decode(errors='replace'))!r}"
        return LinuxSessionError(text)

    def _timed(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def _start(self, incoming: str | None = None, label: str = "", ram: str | os.PathLike | None = None) -> Machine:
        """A booting QEMU, or (`incoming`) one continuing that stream with guest RAM `ram`."""
        if incoming is None:
            machine = Machine(self.spec, label=label or self.label, artifacts=self.artifacts)
        else:
            machine = Machine.restore(self.spec, incoming, ram, label=label or self.label, artifacts=self.artifacts)
        self.pids.append(machine.pid)
        self.machine_dirs.append(machine.workdir)
        return machine

    # ---- boot -----------------------------------------------------------------------------------
    def boot(self) -> list[linux.Ready]:
        """Build the guest, start QEMU, wait for the holder's ready line(s)."""
        reason = unavailable_reason(self.bank, self.accel, qemu=self.qemu, kernel=self.kernel)
        if reason:
            raise LinuxSessionError(f"{self.label}: {reason}")
        if self.machine is not None or self.snap is not None:
            raise LinuxSessionError(f"{self.label} boot: already booted")
        if self.ready_guest is not None:
            return self._boot_from_ready()
        # KernelUnavailable and GuestBuildError pass through: they are one line already.
        self.guest = linux.linux_guest(self.workdir, [("ctx-" if self.ctx else "") + self.bank],
                                       kernel=self.kernel, load=self.load,
                                       expect=None if self.ctx else self.expect,
                                       release="console", exit_port=0xF4, accel=self.accel)
        try:
            self.spec = MachineSpec.create(accel=self.accel, kernel=self.guest.kernel, qemu=self.qemu,
                                           cpu=self.cpu, memory_mib=LINUX_MEMORY_MIB, machine=LINUX_MACHINE, console=True,
                                           timeout=QEMU_TIMEOUT,
                                           extra=("-initrd", str(self.guest.initramfs), "-append", self.guest.cmdline))
        except QemuError as exc:
            raise self._error("boot", str(exc)) from None
        want = 2 if self.ctx else 1
        t0 = time.perf_counter()
        try:
            self.machine = self._start(label=f"qemu-{self.accel} boot")
        except QemuError as exc:
            raise self._error("boot", str(exc)) from None
        try:
            self.ready = self.machine.wait_console(
                lambda out: (lambda r: r.ready if len(r.ready) >= want else None)(linux.parse_console(out)),
                timeout=self.timeout, what="holder ready line" + ("s (2)" if want > 1 else ""))
        except QemuError as exc:
            said = linux.parse_console(self.machine.read_console()).result(self.item)
            guest = f" (the guest: {'ok' if said.ok else 'not ok'} {self.item} # {said.directive})" if said else ""
            raise self._error("boot", f"holder never ready{guest}: {exc}", self.machine) from None
        self._timed("boot_to_ready", time.perf_counter() - t0)
        report = linux.parse_console(self.machine.read_console())
        early = report.result(self.item)
        if early is not None:  # e.g. skipped by the guest, or failed before loading
            raise self._error("boot", f"{self.item} ended before the snapshot: "
                              f"{'ok' if early.ok else 'not ok'} {early.directive}".strip(), self.machine)
        if self.ctx and self.ctx_settle:
            time.sleep(self.ctx_settle)  # let the pair switch many times before the snapshot
        return self.ready

    def _boot_from_ready(self) -> list[linux.Ready]:
        """The shared boot: a fresh QEMU restores the ready snapshot, /init gets this run's
        item as a console command (``apx-run``) and must say it is its first command."""
        ready = self.ready_guest
        if not ready.matches(accel=self.accel, qemu=self.qemu, kernel=self.kernel, cpu=self.cpu):
            raise LinuxSessionError(f"{self.label} boot: the ready guest is for another QEMU/kernel/accel/-cpu")
        path = ready.boot()
        self.guest, self.spec = ready.guest, ready.spec
        command = linux.command_line([("ctx-" if self.ctx else "") + self.bank], load=self.load,
                                     expect=None if self.ctx else self.expect)
        want = 2 if self.ctx else 1
        t0 = time.perf_counter()
        try:
            self.machine = self._start(incoming=os.fspath(path), label=f"qemu-{self.accel} ready restore",
                                       ram=ready.ram)
        except QemuError as exc:
            raise self._error("boot", f"{exc} (restoring the ready snapshot)") from None
        self._timed("ready_restore", time.perf_counter() - t0)

        def answered(out):
            report = linux.parse_console(out)
            if any(ln.strip().startswith(linux.BUSY_PREFIX) for ln in report.lines):
                return report
            if report.result(self.item) is not None or len(report.ready) >= want:
                return report
            return None

        try:
            self.machine.send_console(command.encode() + b"\n")
            report = self.machine.wait_console(answered, timeout=self.timeout,
                                               what="holder ready line" + ("s (2)" if want > 1 else ""))
        except QemuError as exc:
            raise self._error("boot", f"holder never ready after {command!r}: {exc}", self.machine) from None
        self._timed("boot_to_ready", time.perf_counter() - t0)
        self._check_first_command(report, command)
        self.ready = report.ready
        early = report.result(self.item)
        if early is not None:
            raise self._error("boot", f"{self.item} ended before the snapshot: "
                              f"{'ok' if early.ok else 'not ok'} {early.directive}".strip(), self.machine)
        if self.ctx and self.ctx_settle:
            time.sleep(self.ctx_settle)
        return self.ready

    def _check_first_command(self, report: linux.ConsoleReport, command: str) -> None:
        """The restored guest must be the ready state: its first command is this run's, and
        nothing of an earlier run (ready lines, results) is on its console before it."""
        busy = [ln.strip() for ln in report.lines if ln.strip().startswith(linux.BUSY_PREFIX)]
        taken = [(i, m) for i, ln in enumerate(report.lines) if (m := linux.COMMAND_RE.match(ln.strip()))]
        problem = None
        if busy:
            problem = f"the guest was already running a command ({busy[0]!r})"
        elif not taken:
            problem = "the guest never took the command"
        else:
            index, m = taken[0]
            if len(taken) > 1 or m["number"] != "1":
                problem = f"the guest had taken {int(m['number']) - 1} command(s) before this one"
            elif m["run"] != command.split()[1] or m["load"] != str(self.load) or \
                    m["expect"] != str(-1 if self.ctx else self.expect):
                problem = f"the guest took {report.lines[index].strip()!r}, not {command!r}"
            elif any(r.line < index for r in report.ready) or any(r.name != self.item for r in report.results):
                problem = "holder output before the command"
        if problem:
            raise self._error("boot", f"not the ready state: {problem}", self.machine)

    # ---- snapshot -------------------------------------------------------------------------------
    def _stop_in_spin(self) -> StopPoint:
        spin = self.ready[0].spin_range
        if spin is None:
            raise self._error("stop", f"the ready line has no spin= range: {self.ready[0]}")
        m = self.machine
        point = None
        for tries in range(1, STOP_TRIES + 1):
            m.stop()
            text = m.hmp("info registers")
            rip_m, cpl_m = re.search(r"RIP=([0-9a-fA-F]+)", text), re.search(r"CPL=(\d)", text)
            if not rip_m or not cpl_m:
                raise self._error("stop", f"HMP info registers has no RIP=/CPL=: {_tail(text)!r}")
            point = StopPoint(int(rip_m.group(1), 16), int(cpl_m.group(1)), spin, tries, text)
            if point.in_spin:
                return point
            m.cont()
            time.sleep(0.001 * (1 + tries % 7))  # vary where the next stop lands
        raise self._error("stop", f"the vCPU was never inside the holder's spin loop in {STOP_TRIES} stops "
                          f"(last CPL={point.cpl} RIP={point.rip:#x}, spin={spin[0]:#x}-{spin[1]:#x})", m)

    def snapshot(self) -> Snapshot:
        """Stop inside the spin loop, read HMP, migrate to file, read the stream; then kill
        the booted QEMU.  The snapshot is checked with Snapshot.check()."""
        from .hmp import HmpParseError, parse_info_registers
        from .migration.stream import MigrationStream, MigrationStreamError

        if self.machine is None:
            raise LinuxSessionError(f"{self.label} snapshot: not booted")
        m = self.machine
        names = list(BANKS[self.bank].names)
        t0 = time.perf_counter()
        try:
            stop = self._stop_in_spin()
        except QemuError as exc:
            raise self._error("stop", str(exc), m) from None
        self._timed("stop", time.perf_counter() - t0)
        self.seconds["stop_tries"] = stop.tries
        try:
            hmp_all = parse_info_registers(stop.hmp_text)
        except HmpParseError as exc:
            raise self._error("observe", str(exc)) from None
        path = self.workdir / "snapshot.mig"
        t1 = time.perf_counter()
        try:
            m.qmp("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
            m.save(path, ram_to=self.snap_ram)
        except QemuError as exc:
            raise self._error("snapshot", str(exc), m) from None
        self._timed("snapshot", time.perf_counter() - t1)
        self.boot_console = m.read_console().decode(errors="replace")
        t2 = time.perf_counter()
        try:
            cpu = MigrationStream.open(path).cpu_state(0, accelerator=self.accel)
            stream_regs = {n: cpu.register(n) for n in names}
            stream_rip = cpu.gprs.get("rip", -1)
        except MigrationStreamError as exc:
            raise self._error("observe", f"migration stream: {exc}") from None
        self._timed("observe", time.perf_counter() - t2)
        hmp_regs = {n: hmp_all[n] for n in names if n in hmp_all}
        missing = [n for n in names if n not in hmp_all]
        if missing:
            raise self._error("observe", f"HMP info registers lacks {', '.join(missing[:4])}"
                              f"{'...' if len(missing) > 4 else ''} (bank {self.bank})")
        self.kill_boot()
        stages = (self.load, self.load % (linux_programs.STAGES - 1) + 1) if self.ctx else (self.load,)
        self.snap = Snapshot(path, self.bank, stages, stop, {"migration": stream_regs, "hmp": hmp_regs},
                             stream_rip, self.label)
        return self.snap

    def kill_boot(self) -> None:
        """Kill and reap the booted QEMU (the snapshot is all that is left of it)."""
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    # ---- edited streams ---------------------------------------------------------------------------
    def _snapshot_stream(self):
        from .migration.stream import MigrationStream

        if self.snap is None:
            raise LinuxSessionError(f"{self.label} patch: no snapshot yet")
        return MigrationStream.open(self.snap.path)

    def edited(self, stage_or_values: int | Mapping[str, bytes], name: str = "edited") -> Path:
        """A copy of the snapshot whose bank registers hold BANKS[bank].pattern(stage)
        (or the given {register: bytes}); XSTATE_BV gets the bank's bits."""
        from .migration.stream import MigrationStreamError

        values = (BANKS[self.bank].pattern(stage_or_values) if isinstance(stage_or_values, int)
                  else dict(stage_or_values))
        out = self.workdir / f"{name}.mig"
        t0 = time.perf_counter()
        try:
            stream = self._snapshot_stream()
            edits: dict = {}
            for reg, value in values.items():
                edits.update(stream.register_edits(reg, value))  # = with_register, one copy for all
            stream.patch(out, edits)
        except (MigrationStreamError, ValueError) as exc:
            raise LinuxSessionError(f"{self.label} patch: {exc}") from None
        self._timed("patch", time.perf_counter() - t0)
        return out

    def flipped(self, register: str, byte: int, name: str = "flipped") -> Path:
        """A copy of the snapshot with one byte of `register` inverted (MigrationStream.with_register)."""
        from .migration.stream import MigrationStreamError

        out = self.workdir / f"{name}.mig"
        t0 = time.perf_counter()
        try:
            stream = self._snapshot_stream()
            value = bytearray(stream.cpu_state(0, accelerator=self.accel).register(register))
            if not 0 <= byte < len(value):
                raise ValueError(f"{register} has bytes 0..{len(value) - 1}, not {byte}")
            value[byte] ^= 0xFF
            stream.with_register(out, register, bytes(value))
        except (MigrationStreamError, ValueError) as exc:
            raise LinuxSessionError(f"{self.label} patch: {exc}") from None
        self._timed("patch", time.perf_counter() - t0)
        return out

    # ---- restore ----------------------------------------------------------------------------------
    def restore(self, stream: str | os.PathLike | None = None, *, keep: bool = False) -> RestoreResult:
        """A fresh QEMU restores `stream` (default: the snapshot) and runs; the holder is
        released on the console; its KTAP result is read; QEMU exits (isa-debug-exit) and
        is reaped.  A patched `stream` is deleted afterwards unless `keep`."""
        if self.snap is None:
            raise LinuxSessionError(f"{self.label} restore: no snapshot yet")
        if self.machine is not None:
            raise LinuxSessionError(f"{self.label} restore: the booted QEMU still runs (kill_boot first)")
        path = Path(stream) if stream is not None else self.snap.path
        self._restores += 1
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        machine = None
        try:
            try:
                machine = self._start(incoming=os.fspath(path), label=f"qemu-{self.accel} restore{self._restores}",
                                      ram=self.snap_ram)
            except QemuError as exc:
                raise self._error("restore", f"{exc} (restoring {path.name})") from None
            seconds["restore"] = time.perf_counter() - t0
            if self.ctx and self.ctx_settle:
                time.sleep(self.ctx_settle)  # the pair switches many times after the restore too
            t1 = time.perf_counter()
            try:
                machine.send_console(linux.RELEASE_LINE.encode() + b"\n")
                result = machine.wait_console(lambda out: linux.parse_console(out).result(self.item),
                                              timeout=self.timeout, what=f"KTAP result for {self.item}")
            except QemuError as exc:
                raise self._error("result", f"console result missing: {exc}", machine) from None
            seconds["release_to_result"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            try:
                code = machine.wait_exit(QEMU_TIMEOUT)
            except QemuError as exc:
                raise self._error("power-off", str(exc), machine) from None
            seconds["result_to_exit"] = time.perf_counter() - t2
            console = machine.read_console().decode(errors="replace")
        finally:
            if machine is not None:
                machine.close()
            if stream is not None and not keep and path != self.snap.path:
                try:
                    path.unlink()
                except OSError:
                    pass
        for phase, value in seconds.items():
            self._timed(phase, value)
        want = (linux.EXIT_STATUS_PASS if result.ok else linux.EXIT_STATUS_FAIL) << 1 | 1
        if code != want:
            raise self._error("power-off", f"QEMU {describe_exit(code)} after {self.item} "
                              f"{'ok' if result.ok else 'not ok'} (want isa-debug-exit status {want >> 1})")
        return RestoreResult(self.item, result, linux.parse_console(console), console, code, path, seconds,
                             self.label)

    # ---- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.kill_boot()
        finally:
            process.remove_tree(self.workdir)
