"""The KVM backend: the embedded micro-VMM behind the backend-neutral Session interface."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .. import profiles
from ..backend import Backend, BackendError, ImportRejected, Session
from ..profiles import DEFAULT_PROFILE, PROFILES, CpuProfile
from ..guests import protocol
from ..hostcpu import parse_cpuid_requirement, xcr0_bits_text
from ..xsave import Bank, Layout, XsaveError, XsaveImage
from .system import Kvm, KvmError
from .vmm import MAILBOX, GuestCpu, GuestError, MicroVm, VcpuState, guest_cpuid

AMX_MASK = (1 << 17) | (1 << 18)  # needs ARCH_REQ_XCOMP_GUEST_PERM first; never enabled here
USER_XCR0_MASK = (1 << 32) - 1 & ~(1 << 8) & ~(1 << 10) & ~(0x3F << 11)  # no supervisor bits


PKRU_BIT = 1 << 9


def needs_pke(bank: Bank) -> bool:
    """The bank's payload uses rdpkru/wrpkru, which #UD unless CR4.PKE is set."""
    return bool(bank.xcr0_mask & PKRU_BIT)


def profile_unavailable(profile: CpuProfile, supported_xcr0: int) -> str | None:
    """Why a KVM whose supported XCR0 is `supported_xcr0` cannot provide `profile`, or None."""
    return profiles.unavailable(profile, supported_xcr0, "KVM (supported XCR0)")


class KvmHost:
    """What /dev/kvm offers, asked once per test session (KVM_GET_SUPPORTED_CPUID alone
    costs ~0.65 ms here, more than half a scenario)."""

    def __init__(self, path: str = "/dev/kvm", profile: CpuProfile = PROFILES[DEFAULT_PROFILE]):
        self.path = path
        self.profile = profile
        self.kvm = Kvm.open(path)

    def close(self) -> None:
        self.kvm.close()

    @cached_property
    def supported_cpuid(self):
        return self.kvm.supported_cpuid()

    @cached_property
    def supported_xcr0(self) -> int:
        return self.kvm.supported_xcr0()

    @cached_property
    def xsave2_size(self) -> int:
        return self.kvm.xsave2_size()

    @cached_property
    def layout(self) -> Layout:
        """The XSAVE layout of KVM's XSAVE ABI: KVM's CPUID leaf 0xD, whatever the profile.
        KVM_GET_XSAVE2 fills the buffer for every component KVM supports (PKRU's XSTATE_BV
        bit is set even in a guest whose XCR0 lacks it), so images are read with KVM's
        layout, not the guest's."""
        table = {(e.function, e.index): e.regs for e in self.supported_cpuid if e.function == 0xD}
        return Layout.from_cpuid(lambda leaf, sub: table.get((leaf, sub), (0, 0, 0, 0)),
                                 source="KVM_GET_SUPPORTED_CPUID")

    @cached_property
    def apx_cpu(self) -> bool:
        """CPUID.(7,1).EDX[21] as KVM reports it."""
        return any(e.function == 7 and e.index == 1 and e.edx >> 21 & 1 for e in self.supported_cpuid)

    @cached_property
    def guest_cpu(self) -> GuestCpu:
        """Every user component KVM supports except AMX, within the CPU profile: the guest
        runs with a realistic, full XCR0 so a bank's load shows it leaves the other
        components alone."""
        xcr0 = self.supported_xcr0 & USER_XCR0_MASK & ~AMX_MASK & self.profile.xcr0
        return GuestCpu(xcr0, guest_cpuid(self.supported_cpuid, xcr0, self.profile))

    def profile_unavailable(self) -> str | None:
        return profile_unavailable(self.profile, self.supported_xcr0)

    @cached_property
    def x87_empty_store(self) -> bytes:
        """What a vCPU of this KVM stores for `fninit; fstpt` (a pop of an empty x87
        stack), measured once by a tiny guest.  Hardware stores the QNaN "real
        indefinite" (the underflow is masked by the init FCW); QEMU's TCG does not
        emulate stack underflow and stores zeros, and so does a KVM nested in a TCG guest,
        whose vCPU is TCG's."""
        with MicroVm(self.kvm, self.guest_cpu) as vm:
            vm.boot(X87_UNDERFLOW_PROBE, protocol.pack_mailbox_header(bank_bytes=ST_BYTES))
            event = vm.run()
            if event.kind != "done":
                raise GuestError(f"x87 underflow probe: expected done, got {event.kind} {event.value}")
            return vm.read(MAILBOX + protocol.STORE_AREA, ST_BYTES)


# fninit; fstpt 0x3000(%rdi) (STORE_AREA); movb $1, %al; outb %al, $0xf4 (done); jmp back
# to the out.  Encodings from llvm-mc-19 (tests/test_kernel_under_test.py re-assembles them).
X87_UNDERFLOW_PROBE = bytes.fromhex("dbe3" "dbbf00300000" "b001" "e6f4" "ebfc")
ST_BYTES = 10
X87_INDEFINITE = (0xFFFF << 64 | 0xC000000000000000).to_bytes(ST_BYTES, "little")


class RecordedKvmHost(KvmHost):
    """KVM's facts from a host description (apx_tests.hostdesc.KvmDescription) instead of
    /dev/kvm: the same answers to "which cases run here, and why not" as on that host,
    for hosts we do not have (an APX lab machine, an AVX-512 Xeon).  It runs no guest."""

    def __init__(self, description, profile: CpuProfile = PROFILES[DEFAULT_PROFILE], *,
                 name: str = "a host description"):
        self.path = name
        self.profile = profile
        self.kvm = None
        self.description = description

    def close(self) -> None:
        pass

    @cached_property
    def supported_cpuid(self):
        return self.description.entries()

    @cached_property
    def supported_xcr0(self) -> int:
        return self.description.supported_xcr0

    @cached_property
    def xsave2_size(self) -> int:
        return self.description.xsave2_size


@dataclass
class KvmSnapshot:
    state: VcpuState
    stage: int


class KvmBackend(Backend):
    name = "kvm"

    def __init__(self, host: KvmHost, *, timeout: float = 5.0):
        self.host = host
        self.timeout = timeout

    def host_unavailable(self, bank: Bank) -> str | None:
        missing = bank.xcr0_mask & ~self.host.supported_xcr0
        reasons = []
        if bank.name == "apx" and not self.host.apx_cpu:
            reasons.append("KVM_GET_SUPPORTED_CPUID lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)")
        if missing:
            reasons.append(f"KVM supported XCR0 {self.host.supported_xcr0:#x} lacks {missing:#x} "
                           f"({', '.join(self.layout_names(missing))})")
        if bank.name == "apx" and not missing and self.host.layout.has(19) is False:
            reasons.append("KVM CPUID leaf 0xD has no component 19 (CONFIG_KVM_APX off?)")
        return "; ".join(reasons) or None

    @staticmethod
    def facts_unavailable(bank: Bank, cpu, kvm, cpuid, profile: CpuProfile = PROFILES[DEFAULT_PROFILE]
                          ) -> str | None:
        """This backend's answer for a host known by its probe facts (apx_tests.probe's
        CpuFacts and KvmFacts, and its CPUID as a function): this machine as probed, with
        or without /dev/kvm, or a host description.  None when a KVM scenario of `bank` can
        run there under `profile`, else every missing piece: the profile's (as
        unavailable_reason says them), the CPU's CPUID bits (host CPUID: a KVM does not
        always list AVX/AVX-512 in KVM_GET_SUPPORTED_CPUID although guests can use them, so
        supported XCR0 decides), host XCR0, KVM presence, KVM supported XCR0,
        KVM_CAP_XSAVE2.  The probe's "bank NAME" lines are this answer."""
        mask = bank.xcr0_mask
        offered = profile_unavailable(profile, kvm.supported_xcr0) if kvm.supported_xcr0 is not None else None
        missing: list[str] = [why for why in (offered, profiles.exclusion(profile, mask)) if why]
        if cpu.error:
            missing.append(f"host CPUID unreadable ({cpu.error})")
        else:
            lacking = [req.describe(0) for req in parse_cpuid_requirement(bank.cpuid_requirement)
                       if not req.value(cpuid)]
            if lacking:
                missing.append(f"CPU lacks {', '.join(lacking)}")
        if cpu.xcr0 is not None and mask & ~cpu.xcr0:
            missing.append(f"host XCR0 {cpu.xcr0:#x} lacks {xcr0_bits_text(mask & ~cpu.xcr0)}")
        if not kvm.present:
            missing.append(f"KVM unavailable ({kvm.error})")
        elif kvm.supported_xcr0 is None:
            missing.append(f"KVM supported XCR0 unknown ({kvm.error})")
        elif mask & ~kvm.supported_xcr0:
            missing.append(f"KVM supported XCR0 {kvm.supported_xcr0:#x} lacks "
                           f"{xcr0_bits_text(mask & ~kvm.supported_xcr0)}")
        if kvm.present and kvm.xsave2_size is None:
            missing.append(f"KVM_CAP_XSAVE2 size unknown ({kvm.error})")
        return "; ".join(missing) or None

    @staticmethod
    def layout_names(mask: int) -> list[str]:
        from ..xsave.layout import component_name
        return [f"{bit} {component_name(bit)}" for bit in range(64) if mask >> bit & 1]

    def init_readout_unjudgeable(self, bank: Bank) -> str | None:
        """x87 under a vCPU that does not emulate stack underflow: the init state (an
        empty stack) and a zeroed valid stack read alike, so init_state cannot judge."""
        if bank.name != "x87" or isinstance(self.host, RecordedKvmHost):
            return None
        stored = self.host.x87_empty_store
        if stored == X87_INDEFINITE:
            return None
        return (f"this vCPU does not emulate x87 stack underflow: `fninit; fstpt` stored "
                f"0x{stored[::-1].hex()} where hardware stores the real indefinite "
                f"0x{X87_INDEFINITE[::-1].hex()} (QEMU TCG under this guest's KVM), so an "
                f"empty (init) x87 stack cannot be told from a zeroed one")

    def init_state_kept(self, bank: Bank) -> bool:
        # KVM_SET_XSAVE passes no PKRU pointer to copy_uabi_to_xstate() when XSTATE_BV[9]
        # is clear, so the vCPU keeps its PKRU ("KVM hasn't used XRSTOR and hasn't had the
        # PKRU resetting behavior", arch/x86/kernel/fpu/xstate.c): the KVM ABI, kept on
        # purpose; a change to it is what init_state then reports.
        return bool(bank.xstate_mask & PKRU_BIT)

    def start(self, bank: Bank, payload: bytes) -> "KvmSession":
        return KvmSession.boot(self, bank, payload)


class KvmSession(Session):
    backend = "kvm"
    features = frozenset({"raw_xsave", "legacy_get_xsave", "fresh_vm", "set_xcr0", "xstate_bv_init",
                          "gpr_views"})
    mailbox_gpa = MAILBOX

    def __init__(self, owner: KvmBackend, bank: Bank, vm: MicroVm, stage: int | None):
        super().__init__()
        self.owner = owner
        self.bank = bank
        self.layout = owner.layout
        self.vm = vm
        self.stage = stage

    @classmethod
    def boot(cls, owner: KvmBackend, bank: Bank, payload: bytes) -> "KvmSession":
        vm = MicroVm(owner.host.kvm, owner.host.guest_cpu)
        try:
            mailbox = protocol.pack_mailbox_header(bank_bytes=bank.size)
            vm.boot(payload, mailbox, pke=needs_pke(bank))
        except BaseException:
            vm.close()
            raise
        return cls(owner, bank, vm, None)

    # --- guest control ----------------------------------------------------------------
    def run_to(self, stage: int) -> None:
        event = self._resume()
        if event.kind != "sync" or event.value != stage:
            raise BackendError(f"kvm {self.bank.name}: expected sync {stage}, guest sent "
                               f"{event.kind} {event.value} (after stage {self.stage})")
        self.stage = stage

    def finish(self) -> int:
        event = self._resume()
        if event.kind != "done":
            raise BackendError(f"kvm {self.bank.name}: expected the guest to finish, it sent "
                               f"{event.kind} {event.value}")
        return event.value

    def _resume(self):
        """Release the stage the guest waits at and run it to its next exit."""
        if self.stage is not None:
            self.vm.release(self.stage)
        try:
            return self.vm.run(self.owner.timeout)
        except GuestError as exc:
            raise BackendError(f"kvm {self.bank.name}: {exc}") from None

    # --- state ------------------------------------------------------------------------
    def export(self) -> XsaveImage:
        try:
            return XsaveImage(self.layout, self.vm.vcpu.get_xsave2(), where="KVM_GET_XSAVE2 vcpu0")
        except XsaveError as exc:  # a malformed image from KVM: the scenario fails in one line
            raise BackendError(f"kvm {self.bank.name}: export: {exc}") from None

    def export_raw(self) -> bytes:
        return self.vm.vcpu.get_xsave2()

    def export_legacy(self) -> bytes:
        """KVM_GET_XSAVE: the first 4096 bytes only."""
        return self.vm.vcpu.get_xsave()

    def observers(self):
        return {"KVM_GET_XSAVE2": self.export}

    def gpr_views(self):
        return {"KVM_GET_REGS": self._regs_view}

    def _regs_view(self) -> dict[str, bytes]:
        regs = self.vm.vcpu.get_regs()
        return {name: getattr(regs, name).to_bytes(8, "little") for name, _ in regs._fields_}

    def import_image(self, image: XsaveImage) -> None:
        self.import_raw(image.to_bytes())

    def import_raw(self, data: bytes) -> None:
        try:
            self.vm.vcpu.set_xsave(data)
        except KvmError as exc:
            raise ImportRejected(f"kvm {self.bank.name}: {exc.strerror}", exc.errno) from None

    def get_xcr0(self) -> int:
        xcrs = self.vm.vcpu.get_xcrs()
        return next((x.value for x in xcrs.xcrs[: xcrs.nr_xcrs] if x.xcr == 0), 0)

    def set_xcr0(self, value: int) -> None:
        """KVM_SET_XCRS: the same __kvm_set_xcr() path a guest XSETBV exit takes (our
        payload runs at CPL3, where XSETBV would #GP)."""
        try:
            self.vm.vcpu.set_xcr0(value)
        except KvmError as exc:
            raise ImportRejected(f"kvm {self.bank.name}: KVM_SET_XCRS {value:#x}: {exc.strerror}",
                                 exc.errno) from None

    def snapshot(self) -> KvmSnapshot:
        if self.stage is None:
            raise BackendError(f"kvm {self.bank.name}: snapshot before the guest reached a sync point")
        return KvmSnapshot(self.vm.save_state(), self.stage)

    def restore(self, snapshot: KvmSnapshot) -> "KvmSession":
        """A fresh VM and vCPU with the snapshot's regs, sregs, XCRs, XSAVE and memory."""
        vm = MicroVm(self.owner.host.kvm, self.owner.host.guest_cpu)
        try:
            vm.load_state(snapshot.state)
        except KvmError as exc:
            vm.close()
            raise BackendError(f"kvm {self.bank.name}: restore into a fresh VM: {exc}") from None
        vm.last_stage = snapshot.stage
        return KvmSession(self.owner, self.bank, vm, snapshot.stage)

    # --- mailbox ----------------------------------------------------------------------
    def write_area(self, offset: int, data: bytes) -> None:
        self.vm.write(MAILBOX + offset, data)

    def read_area(self, offset: int, size: int) -> bytes:
        return self.vm.read(MAILBOX + offset, size)

    def close(self) -> None:
        self.vm.close()


