"""What a Linux guest in QEMU can be on this host: the machine it boots in (``microvm``,
256 MiB, shared with linux_session's runs), which accelerator boots it -- `choose_accel()`:
KVM where a probe boot of the guest kernel under ``-accel kvm`` reaches /init, TCG
otherwise (this machine's nested paravirtual KVM boots no stock kernel: apx-facts.md) --
and which banks a guest can hold under each accelerator (`unavailable_reason()`, naming
the QEMU and guest kernel versions).  docs/linux-guests.md.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .. import process
from ..guests import linux, linux_kernel, linux_programs
from ..probe import find_qemu, parse_qemu_version
from ..xsave import BANKS
from .errors import QemuError
from .machine import Machine
from .spec import MachineSpec, _private_tmp_root, kvm_usable, temp_prefix

LINUX_MACHINE = "microvm"  # default devices (serial, PIT, PIC, RTC): what linux.MACHINE_ARGS boots
LINUX_MEMORY_MIB = 256  # linux.MEMORY
QEMU_TIMEOUT = 30.0  # MachineSpec.timeout: QMP calls and migrations of a Linux guest

TCG_NO_AVX512 = ("QEMU TCG never emulates AVX-512 (-cpu max has no AVX512F, CPUID.(EAX=7,ECX=0):EBX[16]=0, "
                 "so the guest's XCR0 lacks 0xe0: opmask, ZMM_Hi256, Hi16_ZMM)")


def unavailable_reason(bank: str, accel: str = "tcg", *, qemu: str | None = None,
                       kernel: str | os.PathLike | None = None) -> str | None:
    """Why `bank` cannot be held by a Linux guest under `accel` here, or None. `qemu` and
    `kernel` are what would run (default: as find_qemu / linux_kernel.find_kernel choose them):
    the reason names their versions."""
    if bank not in linux_programs.holder_banks():
        return f"no Linux register holder for bank {bank!r} (have {', '.join(linux_programs.holder_banks())})"
    if accel == "tcg":
        if bank == "apx":
            return tcg_no_apx_reason(qemu, kernel)
        if BANKS[bank].xcr0_mask & 0xE0:
            return TCG_NO_AVX512
    return None


# --- which accelerator boots the guest here --------------------------------------------------

PROBE_TIMEOUT = 20.0  # seconds a KVM probe boot may take to reach /init (about 1 s where KVM works)
KVM_PVM_NO_LINUX = ("KVM here is kvm_pvm (nested, paravirtual), under which no stock kernel boots "
                    "(measured: no console output within 25 s; emulation failures; docs/linux-guests.md)")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator the Linux guest runs under, and the check that decided (one line)."""

    accel: str  # "kvm" or "tcg"
    why: str


def choose_accel(qemu: str | None = None, kernel: str | os.PathLike | None = None, *,
                 timeout: float = PROBE_TIMEOUT, dev: str = "/dev/kvm", sysfs: str = "/sys/module") -> AccelChoice:
    """KVM when this host can boot the guest kernel under it, else TCG; why, in one line.

    In order: /dev/kvm must open; a kvm_pvm KVM (the known case that boots no stock
    kernel) is TCG without trying; otherwise one probe boot of the guest kernel under
    ``-accel kvm`` (`probe_kvm_boot`: /init must print its started line within `timeout`),
    remembered per process and (QEMU, kernel).  KernelUnavailable and GuestBuildError
    pass through: without a guest there is nothing to choose for."""
    why = kvm_usable(dev)
    if why is not None:
        return AccelChoice("tcg", f"KVM is not usable ({why})")
    from ..kvm.system import kvm_flavour
    if kvm_flavour(sysfs) == "kvm_pvm":
        return AccelChoice("tcg", KVM_PVM_NO_LINUX)
    return probe_kvm_boot(qemu, os.fspath(linux_kernel.find_kernel(kernel, fetch=False)), timeout)


@functools.lru_cache(maxsize=8)
def probe_kvm_boot(qemu: str | None, kernel: str, timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """One probe boot under ``-accel kvm`` (`probe_boot`), remembered: "kvm" when the
    guest reached /init, else "tcg" with what went wrong."""
    problem, seconds = probe_boot("kvm", qemu, kernel, timeout)
    if problem is None:
        return AccelChoice("kvm", f"a probe boot under -accel kvm reached /init in {seconds:.1f} s")
    return AccelChoice("tcg", f"a probe boot under -accel kvm did not reach /init: {problem}")


def probe_boot(accel: str, qemu: str | None, kernel: str | os.PathLike | None,
               timeout: float = PROBE_TIMEOUT) -> tuple[str | None, float]:
    """Boot `kernel` with the holder initramfs under `accel` (the machine and -cpu a
    LinuxHolderRun uses) until /init prints its started line, then kill it.  (None,
    seconds) when it did, (why not in one line, seconds) otherwise; nothing is left."""
    workdir = tempfile.mkdtemp(prefix=temp_prefix() + "linux-probe-", dir=_private_tmp_root())
    t0 = time.perf_counter()
    try:
        guest = linux.linux_guest(workdir, ["xmm"], kernel=kernel, release="console", exit_port=0xF4, accel=accel)
        spec = MachineSpec.create(accel=accel, kernel=guest.kernel, qemu=qemu, memory_mib=LINUX_MEMORY_MIB,
                                  machine=LINUX_MACHINE, console=True, timeout=QEMU_TIMEOUT,
                                  extra=("-initrd", str(guest.initramfs), "-append", guest.cmdline))
        t0 = time.perf_counter()
        with Machine(spec, label=f"qemu-{accel} linux probe") as machine:
            machine.wait_console(lambda out: linux.parse_console(out).started_uptime is not None,
                                 timeout=timeout, what="/init's started line")
        return None, time.perf_counter() - t0
    except QemuError as exc:
        return str(exc), time.perf_counter() - t0
    finally:
        process.remove_tree(workdir)


def tcg_no_apx_reason(qemu: str | None = None, kernel: str | os.PathLike | None = None) -> str:
    """Why a Linux guest under TCG holds no APX state, naming the QEMU and the guest kernel
    that would run (their versions as found now, and whether that kernel supports APX)."""
    return (f"{_qemu_named(qemu)} TCG does not emulate APX (-cpu max has no APX_F, "
            f"CPUID.(EAX=7,ECX=1):EDX[21]=0){_guest_kernel_apx(kernel)}")


def _qemu_named(qemu: str | None) -> str:
    path = find_qemu(qemu)
    if path is None:
        return f"QEMU (no {qemu or 'qemu-system-x86_64'} found)"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"QEMU ({path}: {exc.strerror or exc})"
    version = _qemu_version(path, st.st_mtime_ns, st.st_size)
    return f"QEMU {version}" if version else f"QEMU ({path}: no version from --version)"


@functools.lru_cache(maxsize=8)
def _qemu_version(path: str, _mtime_ns: int, _size: int) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_qemu_version(out)


def _guest_kernel_apx(kernel: str | os.PathLike | None) -> str:
    """'; ...' naming the guest kernel and its APX support, or '' when there is no kernel."""
    try:
        path = linux_kernel.find_kernel(kernel, fetch=False)
    except linux_kernel.KernelUnavailable:
        return ""  # nothing to name: the QEMU reason stands alone
    release = linux_kernel.kernel_release(path)
    knows = linux_kernel.kernel_knows_apx(path)
    if knows is None:
        return f"; whether guest kernel {release} would enable XCR0[19] is unknown (its image cannot be unpacked here)"
    if knows:
        return f" (guest kernel {release} does support APX state)"
    return (f"; guest kernel {release} has no APX state support either (no XSAVE component 19 "
            f"in its xfeature names), so it would not enable XCR0[19]")
