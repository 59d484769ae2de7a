"""The embedded micro-VMM: one vCPU, identity-mapped long mode, a payload that runs at CPL3.

Why CPL3 from the first instruction: on nested/paravirtual KVM (kvm_pvm) every CPL0 guest
instruction goes through KVM's emulator, which cannot execute SSE/AVX/AVX-512/xsave and
fails with KVM_EXIT_INTERNAL_ERROR; CPL3 code runs natively.  On bare metal CPL3 works the
same, so one guest serves both.  The vCPU starts directly at CPL3 (DPL3 code/stack segments
through KVM_SET_SREGS, U-bit pages, RFLAGS.IOPL=3 so `out` reaches the VMM) and XCR0 is set
with KVM_SET_XCRS before the first KVM_RUN, so no CPL0 code runs at all.

Guest-physical memory map (one slot, identity-mapped with 2 MiB pages):
    0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 GDT, 0x4800 TSS,
    0x10000 payload, 0x80000 stack top, 0x100000 mailbox (16 KiB).
"""

from __future__ import annotations

import _signal  # signal.signal without its enum wrapping: MicroVm.run
import mmap
import signal
import struct
import threading
from dataclasses import dataclass, field
from functools import cached_property

from ..guests import protocol
from ..profiles import DEFAULT_PROFILE, PROFILES, CpuProfile, max_standard_size, restrict_cpuid
from . import abi
from .system import CpuidEntry, Kvm, KvmError, Vcpu, Vm, cpuid2_buffer

MEMORY_SIZE = 4 << 20
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, TSS = 0x4000, 0x4800
PAYLOAD = 0x10000
STACK_TOP = 0x80000
MAILBOX = 0x100000
TSS_ADDR_FOR_VMX = 0xFFFBD000  # KVM_SET_TSS_ADDR: 3 pages outside guest RAM

# Selectors (index << 3 | RPL)
USER_CS, USER_DS, TSS_SEL = 0x18 | 3, 0x20 | 3, 0x28

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
CR4_PKE = 1 << 22  # protection keys for user pages: rdpkru/wrpkru #UD without it
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_IOPL3 = 3 << 12
PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80

# GDT descriptors: null, kernel code/data (unused, for completeness), user code64/data (DPL3).
_GDT_ENTRIES = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00AFFA000000FFFF, 0x00CFF2000000FFFF)


class GuestError(RuntimeError):
    """The guest did not reach where it should; str() is one line (what, stage, RIP)."""


class GuestTimeout(GuestError):
    pass


@dataclass(frozen=True)
class GuestExit:
    """Why KVM_RUN came back to us, decoded: a sync point or the final 'done' port write."""
    kind: str  # "sync" | "done"
    value: int  # stage number, or the guest's status byte


@dataclass
class VcpuState:
    """Everything needed to continue the guest in a fresh VM (state_test.c style + memory)."""
    regs: abi.kvm_regs
    sregs: abi.kvm_sregs
    xcrs: abi.kvm_xcrs
    xsave: bytes
    memory: bytes


@dataclass(frozen=True)
class GuestCpu:
    """What the guest is allowed to use: XCR0 and the CPUID bits that go with it."""
    xcr0: int
    cpuid: tuple[CpuidEntry, ...] = field(repr=False)

    @cached_property
    def cpuid_buffer(self):
        """The kvm_cpuid2 struct, built once: every VM of a session reuses it."""
        return cpuid2_buffer(self.cpuid)


def guest_cpuid(supported: list[CpuidEntry], xcr0: int,
                profile: CpuProfile = PROFILES[DEFAULT_PROFILE]) -> tuple[CpuidEntry, ...]:
    """KVM's supported CPUID with the feature bits for `xcr0` set, limited to `profile`.

    Paravirtual KVM does not list XSAVE/AVX/AVX-512 in leaves 1 and 7 although leaf 0xD and
    the CPU support them, and KVM refuses CR4.OSXSAVE or XCR0 bits the guest CPUID lacks;
    so we set the bits the enabled components need ourselves.  A restricting profile
    clears the features of the components it excludes and trims leaf 0xD (KVM derives
    the guest's allowed XCR0 from it), so KVM itself enforces the profile.
    """
    table = {(e.function, e.index): restrict_cpuid(profile, e.function, e.index, e.regs) for e in supported}
    out = []
    for e in supported:
        eax, ebx, ecx, edx = table[(e.function, e.index)]
        if e.function == 0xD and e.index == 0 and profile.restricts:
            ecx = max_standard_size(table, eax | edx << 32)
        if e.function == 1:
            ecx |= 1 << 26  # XSAVE
            if xcr0 & 0x4:
                ecx |= 1 << 28  # AVX
        elif e.function == 7 and e.index == 0:
            if xcr0 & 0xE0 == 0xE0:
                ebx |= (1 << 16) | (1 << 17) | (1 << 30) | (1 << 31)  # AVX512 F, DQ, BW, VL
            if xcr0 & (1 << 9):
                ecx |= 1 << 3  # PKU: KVM refuses CR4.PKE (KVM_SET_SREGS) without it
        elif e.function == 7 and e.index == 1 and xcr0 & (1 << 19):
            edx |= 1 << 21  # APX_F
        out.append(CpuidEntry(e.function, e.index, e.flags, eax, ebx, ecx, edx))
    return tuple(out)


class MicroVm:
    """One VM with one vCPU running one payload.  Close it (or use `with`)."""

    def __init__(self, kvm: Kvm, cpu: GuestCpu):
        self.kvm = kvm
        self.cpu = cpu
        self.last_stage: int | None = None
        self._vm: Vm | None = None
        self.vcpu: Vcpu | None = None
        self.memory = mmap.mmap(-1, MEMORY_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._vm = kvm.create_vm()
            self._vm.set_tss_addr(TSS_ADDR_FOR_VMX)
            self._vm.set_memory(0, 0, self.memory)
            self.vcpu = self._vm.create_vcpu()
            self.vcpu.set_cpuid(cpu.cpuid_buffer)
        except BaseException:
            self.close()
            raise

    # --- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        if self.vcpu is not None:
            self.vcpu.close()
            self.vcpu = None
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        if self.memory is not None and not self.memory.closed:
            self.memory.close()

    def __enter__(self) -> "MicroVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- memory ------------------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        self.memory[gpa: gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        return self.memory[gpa: gpa + size]

    # --- boot --------------------------------------------------------------------------
    def boot(self, code: bytes, mailbox: bytes, *, pke: bool = False) -> None:
        """Place page tables, GDT/TSS, the payload and its mailbox image; set the vCPU to
        enter the payload at CPL3 with %rdi = mailbox.  `pke`: set CR4.PKE, only for a
        bank that needs it (pkru), so every other bank runs as before."""
        if len(mailbox) > protocol.MAILBOX_SIZE:
            raise GuestError(f"mailbox image is {len(mailbox)} bytes, the page holds {protocol.MAILBOX_SIZE}")
        if len(code) > STACK_TOP - PAYLOAD - 0x10000:
            raise GuestError(f"payload is {len(code)} bytes, too large for the VMM's code area")
        self._write_page_tables()
        self._write_gdt()
        self.write(PAYLOAD, code)
        self.write(MAILBOX, mailbox)

        sregs = _long_mode_sregs(self.vcpu)
        if pke:
            sregs.cr4 |= CR4_PKE
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_xcr0(self.cpu.xcr0)

        regs = abi.kvm_regs()
        regs.rip, regs.rsp, regs.rdi = PAYLOAD, STACK_TOP, MAILBOX
        regs.rflags = RFLAGS_IOPL3 | 0x2
        self.vcpu.set_regs(regs)

    def _write_page_tables(self) -> None:
        self.write(PML4, _PAGE_TABLES[0])
        self.write(PDPT, _PAGE_TABLES[1])
        self.write(PD, _PAGE_TABLES[2])

    def _write_gdt(self) -> None:
        self.write(GDT, _GDT_BYTES)

    # --- running -----------------------------------------------------------------------
    def run(self, timeout: float = 5.0) -> GuestExit:
        """KVM_RUN until the guest syncs or finishes; anything else is a GuestError.

        Bounded by SIGALRM: a CPL3 spin loop never exits to us, so the alarm interrupts the
        ioctl (EINTR) and its handler's exception ends the wait.  Signals only reach the
        main thread; elsewhere the run is unbounded.  The handler is set with `_signal`'s
        own function: `signal.signal` wraps it in enum conversions, ~4 us a call here, twice
        per KVM_RUN, four runs per scenario (docs/bench.md, Step K fourth round)."""
        bounded = threading.current_thread() is threading.main_thread()
        if bounded:
            previous = _signal.signal(signal.SIGALRM, _on_alarm)
            _signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return self._run_loop()
        except GuestTimeout:
            raise self._error(f"guest hung: no sync within {timeout:g} s", GuestTimeout) from None
        finally:
            if bounded:
                _signal.setitimer(signal.ITIMER_REAL, 0)
                _signal.signal(signal.SIGALRM, previous)

    def _run_loop(self) -> GuestExit:
        while True:
            reason = self.vcpu.run()
            if reason == abi.KVM_EXIT_IO:
                io = self.vcpu.run_area.exit.io
                data = self.vcpu.io_data()
                if io.direction == abi.KVM_EXIT_IO_OUT and io.port == protocol.SYNC_PORT:
                    stage = data[0] - ord("0")
                    self.last_stage = stage
                    return GuestExit("sync", stage)
                if io.direction == abi.KVM_EXIT_IO_OUT and io.port == protocol.EXIT_PORT:
                    return GuestExit("done", data[0])
                raise self._error(f"unexpected port I/O: {'out' if io.direction else 'in'} "
                                  f"port {io.port:#x} size {io.size}")
            if reason == abi.KVM_EXIT_INTR:
                continue
            raise self._error(self._describe_exit(reason))

    def release(self, stage: int) -> None:
        """Let the guest past sync point `stage` (the guest spins until mailbox.go == stage)."""
        self.write(MAILBOX + protocol.OFF_GO, struct.pack("<I", stage))

    def _describe_exit(self, reason: int) -> str:
        name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            internal = self.vcpu.run_area.exit.internal
            return f"KVM_EXIT_INTERNAL_ERROR suberror {internal.suberror}"
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            fail = self.vcpu.run_area.exit.fail_entry
            return f"KVM_EXIT_FAIL_ENTRY reason {fail.hardware_entry_failure_reason:#x}"
        return f"KVM_EXIT_{name}"

    def _error(self, what: str, cls=GuestError) -> GuestError:
        try:
            rip = f"RIP {self.vcpu.get_regs().rip:#x}"
        except KvmError:
            rip = "RIP unknown"
        stage = "none" if self.last_stage is None else str(self.last_stage)
        return cls(f"{what} (last stage {stage}, {rip})")

    # --- state -------------------------------------------------------------------------
    def save_state(self) -> VcpuState:
        """The vCPU's state at its current exit, with the exit's `out` completed first
        (Vcpu.complete_pending_io), so a restore continues after the sync point."""
        self.vcpu.complete_pending_io()
        return VcpuState(self.vcpu.get_regs(), self.vcpu.get_sregs(), self.vcpu.get_xcrs(),
                         self.vcpu.get_xsave2(), bytes(self.memory))

    def load_state(self, state: VcpuState) -> None:
        """Restore a saved state; order as in the kernel's state_test: CPUID (set at
        creation) first, so XCR0 and XSAVE are checked against the right features."""
        self.memory[:] = state.memory
        self.vcpu.set_sregs(state.sregs)
        self.vcpu.set_xcrs(state.xcrs)
        self.vcpu.set_xsave(state.xsave)
        self.vcpu.set_regs(state.regs)


def _on_alarm(signum, frame):
    raise GuestTimeout("timeout")


_SREGS_TEMPLATE: dict = {}


def _long_mode_sregs(vcpu: Vcpu) -> abi.kvm_sregs:
    """Special registers for 64-bit mode at CPL3.  Built once from a fresh vCPU's
    KVM_GET_SREGS (every new vCPU 0 starts the same) and copied for each VM."""
    template = _SREGS_TEMPLATE.get("cpl3")
    if template is None:
        sregs = vcpu.get_sregs()
        _set_segment(sregs.cs, USER_CS, code_type=0xB, dpl=3, long_mode=True)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _set_segment(seg, USER_DS, code_type=0x3, dpl=3, long_mode=False)
        sregs.tr.base, sregs.tr.limit, sregs.tr.selector = TSS, 0x67, TSS_SEL
        sregs.tr.type, sregs.tr.present, sregs.tr.s, sregs.tr.dpl = 0xB, 1, 0, 0
        sregs.tr.unusable = 0
        sregs.ldt.unusable, sregs.ldt.present, sregs.ldt.type = 1, 0, 2
        sregs.gdt.base, sregs.gdt.limit = GDT, 7 * 8 - 1
        sregs.idt.base, sregs.idt.limit = 0, 0  # any exception triple-faults: reported as such
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr3 = PML4
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE
        sregs.efer = EFER_LME | EFER_LMA
        template = _SREGS_TEMPLATE["cpl3"] = bytes(sregs)
    return abi.kvm_sregs.from_buffer_copy(template)


def _page_tables() -> tuple[bytes, bytes, bytes]:
    pml4 = struct.pack("<Q", PDPT | PTE_P | PTE_RW | PTE_US)
    pdpt = struct.pack("<Q", PD | PTE_P | PTE_RW | PTE_US)
    pd = b"".join(struct.pack("<Q", (i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS)
                  for i in range(MEMORY_SIZE >> 21))
    return pml4, pdpt, pd


def _gdt() -> bytes:
    tss_low = (0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xFF) << 56))
    tss_high = TSS >> 32
    return struct.pack("<7Q", *_GDT_ENTRIES, tss_low, tss_high)


def _set_segment(seg: abi.kvm_segment, selector: int, *, code_type: int, dpl: int,
                 long_mode: bool) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, code_type
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, dpl, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if long_mode else (0, 1)


_PAGE_TABLES = _page_tables()
_GDT_BYTES = _gdt()


def xcr0_of(state: VcpuState) -> int:
    for i in range(state.xcrs.nr_xcrs):
        if state.xcrs.xcrs[i].xcr == 0:
            return state.xcrs.xcrs[i].value
    return 0

