"""One QEMU binary with one accelerator, as the QEMU backend uses it: ``QemuHost`` finds the
binary once and probes it lazily (version, ``-cpu help`` flags, APX facts and reasons, the
-cpu of the chosen CPU profile, the XSAVE layout the boot stub reads in a probe guest),
owns the snapshot directory and the standby QEMUs not used yet, and times the phases of its sessions (``PhaseClock``).
``FEATURES`` are the scenario features of QEMU sessions per accelerator.  Shared by every
``backend.QemuSession`` of one backend; see docs/qemu.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from functools import cached_property

from .. import profiles
from ..backend import BackendError
from ..guests import boot, protocol
from ..profiles import DEFAULT_PROFILE, PROFILES, CpuProfile
from ..xsave import Layout
from .binaries import ApxFacts, apx_probes, apx_reason, sibling_gdb
from .errors import QemuError, QemuUnavailable
from .machine import Machine
from .spec import TCG_CPU, MachineSpec, _private_tmp_root, find_qemu, kvm_cpu_model, kvm_usable, temp_prefix

VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")

# Features of QEMU sessions (scenario requirements: apx_tests.scenarios.catalog).
# "fresh_vm": restore into a new QEMU process.  "xstate_bv_init": an import whose
# XSTATE_BV leaves a component clear really loads its init state (KVM_SET_XSAVE does;
# TCG keeps QEMU's register copies and ignores env.xstate_bv -- see docs/qemu.md).
FEATURES = {
    "kvm": frozenset({"fresh_vm", "xstate_bv_init", "debugger_write", "gpr_views"}),
    "tcg": frozenset({"fresh_vm", "debugger_write", "gpr_views"}),
}


class PhaseClock:
    """Seconds spent per phase (boot, save, parse, restore, guest, ...), summed."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def reset(self) -> None:
        self.phases.clear()
        self.counts.clear()

    def timed(self, name: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.add(name, time.perf_counter() - self.t0)
        return _Timer()


# Hosts holding a kept gdb (QemuHost.gdb_session), for kept_gdb_pids().
_KEEPING: "weakref.WeakSet[QemuHost]" = weakref.WeakSet()


def kept_gdb_pids() -> set[int]:
    """The gdb processes live QEMU hosts keep detached between views, on purpose: each
    host keeps at most one and QemuHost.close() ends it.  Leak checks exclude these."""
    return {host._spare_gdb.pid for host in list(_KEEPING)
            if host._spare_gdb is not None and host._spare_gdb.pid is not None}


class QemuHost:
    """One QEMU binary with one accelerator: found once, probed lazily, shared by sessions.

    `tag` is what the binary's case ids carry when several QEMUs run side by side ("11":
    `qemu11-kvm-...`; "" for the only one); `kvm_host` stands in for /dev/kvm's facts (a
    RecordedKvmHost) when the APX reason is asked about another host.

    `close()` removes the snapshot directory and kills any machine still open."""

    def __init__(self, accel: str, qemu: str | None = None, *, cpu: str | None = None,
                 timeout: float = 10.0, profile: CpuProfile = PROFILES[DEFAULT_PROFILE],
                 tag: str = "", kvm_host=None):
        if accel not in FEATURES:
            raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}")
        self.accel = accel
        self.tag = tag
        self.label = f"qemu{tag}-{accel}"
        self.qemu = find_qemu(qemu)  # QemuUnavailable (an OSError) when missing
        if accel == "kvm":
            why = kvm_usable()
            if why:
                raise QemuUnavailable(f"{self.label}: -accel kvm needs /dev/kvm: {why}")
        if kvm_host is not None:
            self.__dict__["kvm_host"] = kvm_host
        self.gdb = sibling_gdb(self.qemu)
        self.cpu = cpu
        self.profile = profile
        self.timeout = timeout
        self.clock = PhaseClock()
        self.artifacts: str | None = None
        self._snapdir: str | None = None
        self._sessions: "weakref.WeakSet[QemuSession]" = weakref.WeakSet()
        # Standby QEMUs of its sessions and snapshots not used yet (backend.QemuSession.boot);
        # `handed`: those a snapshot holds, closed when the Run that made them ends.
        self.standbys: "weakref.WeakSet[Machine]" = weakref.WeakSet()
        self.handed: "weakref.WeakSet[Machine]" = weakref.WeakSet()
        self._probe_error: str | None = None
        self._guest: boot.BootInfo | None = None
        self._specs: dict[str, MachineSpec] = {}
        self._spare_gdb = None  # a detached gdb.GdbSession kept for the next gdbstub view
        # spare_boots: after each boot, start the next one's QEMU (paused by -S, nothing run
        # yet) so the next boot of the same guest only connects (boot_machine).  Off by
        # default: a caller that counts QEMU processes would see one more.
        self.spare_boots = False
        self._spare_boot: tuple[tuple, Machine] | None = None

    # ---- facts about this QEMU ------------------------------------------------------------
    def _run(self, *args: str) -> str:
        try:
            out = subprocess.run([self.qemu, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise QemuUnavailable(f"{self.qemu} {' '.join(args)}: {exc}") from None
        return out.stdout + out.stderr

    @cached_property
    def version(self) -> tuple[int, int, int]:
        m = VERSION_RE.search(self._run("--version"))
        if not m:
            raise QemuUnavailable(f"{self.qemu} --version: no 'QEMU emulator version' line")
        return tuple(int(g or 0) for g in m.groups())

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @cached_property
    def cpu_flags(self) -> frozenset[str]:
        """The CPUID flag names `-cpu help` lists ("Recognized CPUID flags:")."""
        text = self._run("-cpu", "help")
        _, found, flags = text.partition("Recognized CPUID flags:")
        return frozenset(flags.split()) if found else frozenset()

    @property
    def apxf(self) -> bool:
        """`-cpu help` lists the apxf flag (QEMU >= 11)."""
        return "apxf" in self.cpu_flags

    @cached_property
    def base_cpu(self) -> str:
        """The accelerator's CPU model before any profile: `max` under TCG; under KVM
        `host`, or `host,-arch-capabilities` where this binary's -cpu host aborts here
        (kvm_cpu_model: measured once per binary)."""
        return kvm_cpu_model(self.qemu).cpu if self.accel == "kvm" else TCG_CPU

    @cached_property
    def apx_facts(self) -> ApxFacts:
        """What decides whether this QEMU gives its guest APX here: its version and apxf,
        KVM's facts, and (QEMU >= 11) what it did with -cpu MODEL,+apxf (one or two short
        starts, remembered per binary)."""
        kvm = self.kvm_host if self.accel == "kvm" else None
        probes = apx_probes(self.qemu, self.accel, self.base_cpu) if self.apxf and self._probe_apxf(kvm) else ()
        host_cpu = host_apx = None
        if kvm is not None and self._probe_apxf(kvm):  # this machine's KVM: name its CPU
            host_cpu, host_apx = _host_cpu_apx()
        return ApxFacts(self.version_text, self.apxf, self.accel, kvm, probes,
                        host_cpu=host_cpu, host_cpu_apx=host_apx)

    def _probe_apxf(self, kvm) -> bool:
        # A recorded host (another machine's KVM) is not this one: QEMU's answer here says
        # nothing about it.
        from ..kvm.backend import RecordedKvmHost
        return not isinstance(kvm, RecordedKvmHost)

    def apx_unavailable(self) -> str | None:
        """Why this QEMU cannot give its guest APX under this accelerator here (the
        missing piece by name: host KVM, QEMU version, TCG, MPX conflict), or None."""
        return apx_reason(self.apx_facts)

    @cached_property
    def kvm_host(self):
        from ..kvm.backend import KvmHost
        return KvmHost()

    def spec(self, kernel: str) -> MachineSpec:
        if kernel not in self._specs:
            self._specs[kernel] = MachineSpec.create(accel=self.accel, kernel=kernel, qemu=self.qemu,
                                                     cpu=self.spec_cpu, timeout=self.timeout)
        return self._specs[kernel]

    @property
    def guest(self) -> boot.BootInfo:
        """What the boot stub finds in this QEMU's guest CPU (the XCR0 it enabled, CPUID
        leaf 0xD): one probe boot per host (~50 ms), remembered, failure included."""
        if self._guest is None and self._probe_error is None:
            try:
                self._guest = self._probe_guest()
            except (QemuError, BackendError) as exc:
                self._probe_error = str(exc)
        if self._probe_error is not None:
            raise QemuError(f"probe boot: {self._probe_error}")
        return self._guest

    def _probe_guest(self) -> boot.BootInfo:
        from ..guests.build import GuestBuildError, build_payload
        try:
            image = boot.build_boot_image(build_payload("xmm").code)
        except GuestBuildError as exc:
            raise BackendError(str(exc)) from None
        stub = image.stub
        mailbox = boot.mailbox_bytes(protocol.bank_bytes("xmm"))
        with Machine(self.spec(str(image.path)), preload={boot.DEFAULT_MAILBOX_GPA: mailbox},
                     label=f"{self.label} probe") as m:
            try:
                m.expect(b"0")
            except QemuError as exc:
                raise QemuError(f"{exc}{_boot_failure_hint(m)}") from None
            return boot.read_bootinfo(stub, m.read(stub["BOOTINFO_ADDR"], boot.bootinfo_size(stub)))

    @cached_property
    def layout(self) -> Layout:
        return self.guest.layout(f"QEMU {self.accel} -cpu {self.spec_cpu} guest CPUID leaf 0xD")

    @cached_property
    def spec_cpu(self) -> str:
        """`--apx-qemu-cpu`-style override, else the accelerator's model limited by the profile."""
        if self.cpu:
            return self.cpu
        base = self.base_cpu
        return profiles.qemu_cpu(base, self.profile, self.cpu_flags) if self.profile.restricts else base

    @property
    def cpu_text(self) -> str:
        """`-cpu` for messages: a profile's long feature list shortened to a count."""
        if not self.profile.restricts or self.cpu:
            return self.spec_cpu
        # The base model as the host run names it, so a reason the host run gives reads the
        # same under a profile, and the profile's own name (what tells the two runs apart).
        base, spec = self.base_cpu, self.spec_cpu
        extra = spec[len(base):] if spec.startswith(base) else spec.partition(",")[2]
        removed = len([f for f in extra.split(",") if f.startswith("-")])
        return f"{base} under CPU profile {self.profile.name} (--apx-cpu), minus {removed} more features"

    def profile_unavailable(self) -> str | None:
        """Why this QEMU cannot provide the CPU profile, or None: the guest cannot enable
        what the profile needs, or still enables what it excludes (measured on kvm_pvm:
        its guests see the host's CPUID whatever QEMU sets, so `-avx` changes nothing)."""
        if not self.profile.restricts:
            return None
        try:
            guest = self.guest
        except QemuError:
            return None  # the boot problem is every case's failure, not a reason to skip
        where = f"QEMU {self.version_text} {self.accel} -cpu {self.cpu_text}"
        extra = self.profile.excluded(guest.xcr0)
        if extra:
            return (f"{self.profile.describe()} not applied: under {where} the guest still enables XCR0 "
                    f"{guest.xcr0:#x} ({profiles.bits_text(extra)}): this host's KVM ignores the CPUID QEMU sets")
        return profiles.unavailable(self.profile, guest.xcr0, where)

    # ---- snapshots --------------------------------------------------------------------------
    def snapshot_path(self) -> str:
        if self._snapdir is None or not os.path.isdir(self._snapdir):
            self._snapdir = tempfile.mkdtemp(prefix=temp_prefix() + "snap-", dir=_private_tmp_root())
        fd, path = tempfile.mkstemp(dir=self._snapdir, prefix="snapshot-", suffix=".mig")
        os.close(fd)
        return path

    # ---- boots ------------------------------------------------------------------------------
    def boot_machine(self, spec: MachineSpec, preload: dict[int, bytes], label: str) -> Machine:
        """A QEMU booting `spec` with `preload` in guest RAM, connected and running.

        With `spare_boots`, the QEMU the previous boot started for this (spec, preload) is
        used when there is one: spawned with -S, its start-up (~20 ms of each boot here)
        overlapped the previous case, and no guest instruction has run in it, so it is as
        fresh as a new one.  A spare for another guest is closed unused.  Then the spare for
        the next boot is spawned, not waited for."""
        key = (spec, tuple(sorted(preload.items())))
        spare, self._spare_boot = self._spare_boot, None
        machine = None
        if spare is not None:
            if spare[0] == key:
                machine = spare[1].adopt(label, self.artifacts)
                try:
                    machine.connect()
                except QemuError:
                    # Gone while it waited (killed from outside, say): connect() closed it.
                    # A fresh QEMU decides; a QEMU that cannot boot this guest fails there.
                    machine = None
            else:
                spare[1].close()
        if machine is None:
            machine = Machine(spec, preload=preload, label=label, artifacts=self.artifacts)
        if self.spare_boots:
            try:
                self._spare_boot = (key, Machine(spec, preload=preload, label=f"{label} (spare)", connect=False))
            except (QemuError, OSError):
                pass  # only a head start: the next boot starts its own QEMU (and reports why not)
        return machine

    def drop_spare_boot(self) -> None:
        """No boot follows soon (the run moves to another backend): end the spare QEMU."""
        spare, self._spare_boot = self._spare_boot, None
        if spare is not None:
            spare[1].close()

    # ---- gdb --------------------------------------------------------------------------------
    def gdb_session(self, socket_path: str, transcript_path: str | None = None):
        """A gdb.GdbSession for the gdbstub at `socket_path`, not yet attached: the gdb
        kept from the last view (retargeted: ~6 ms to attach) or a new one (~0.3 s)."""
        from .gdb import GdbSession

        spare, self._spare_gdb = self._spare_gdb, None
        if spare is not None:
            if spare.reusable:
                return spare.retarget(socket_path, transcript_path=transcript_path)
            spare.close()
        return GdbSession(socket_path, gdb=self.gdb, timeout=self.timeout, transcript_path=transcript_path)

    def release_gdb(self, gdb) -> None:
        """A view is done with `gdb`: keep it if it detached cleanly (its transcript saved
        now, as close() would), else close it (kill gdb); close() ends the kept one."""
        if gdb.reusable and self._spare_gdb is None:
            if gdb.transcript_path is not None:
                gdb.save_transcript(gdb.transcript_path)
                gdb.transcript_path = None  # saved: its close() (later, elsewhere) must not write it again
            self._spare_gdb = gdb
            _KEEPING.add(self)
        else:
            gdb.close()

    def close(self) -> None:
        self.drop_spare_boot()
        spare, self._spare_gdb = self._spare_gdb, None
        _KEEPING.discard(self)
        if spare is not None:
            spare.close()
        for session in list(self._sessions):
            session.close()
        for machine in list(self.standbys):
            machine.close()
        if "kvm_host" in self.__dict__:
            self.kvm_host.close()
            del self.__dict__["kvm_host"]
        if self._snapdir is not None:
            shutil.rmtree(self._snapdir, ignore_errors=True)
            self._snapdir = None


def _host_cpu_apx() -> tuple[str | None, bool | None]:
    """This machine's CPU name and its own APX_F bit (None when CPUID cannot be read)."""
    from .. import hostcpu
    name = hostcpu.cpuinfo_first().get("model name")
    try:
        leaf7 = hostcpu.cpuid(0, 0)[0] >= 7 and hostcpu.cpuid(7, 0)[0] >= 1
        return name, bool(leaf7 and hostcpu.cpuid(7, 1)[3] >> 21 & 1)
    except (hostcpu.HostCpuError, OSError, ValueError):
        return name, None


def _boot_failure_hint(machine: Machine) -> str:
    code = machine.exit_code
    if code is not None and code > 0 and code & 1:
        why = boot.describe_boot_failure(code >> 1)
        if why:
            return f" (boot stub: {why})"
    if code == 0:
        return " (exit 0: the guest triple-faulted; -no-reboot)"
    return ""
