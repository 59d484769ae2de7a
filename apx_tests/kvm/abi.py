"""The slice of the KVM user-space ABI (<linux/kvm.h>, <asm/kvm.h>) that apx_tests uses.

Hand-written because no kept library provides it for Python.  Every number and struct here
is checked against the C headers by tests/test_kvm_abi.py, which compiles a C program with
gcc and compares sizes, field offsets and ioctl numbers.
"""

from __future__ import annotations

import ctypes

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# --- structs -------------------------------------------------------------------------------
class kvm_regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", ctypes.c_uint64 * 16)]


class kvm_xsave(ctypes.Structure):
    """Only the fixed 4096-byte part; KVM_GET_XSAVE2/SET_XSAVE use KVM_CAP_XSAVE2 bytes."""
    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32), ("ecx", ctypes.c_uint32),
                ("edx", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only; entries follow in memory (flexible array)."""
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("group", ctypes.c_uint32),
                ("attr", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8), ("port", ctypes.c_uint16),
                ("count", ctypes.c_uint32), ("data_offset", ctypes.c_uint64)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32),
                ("data", ctypes.c_uint64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("internal", kvm_run_internal),
                ("fail_entry", kvm_run_fail_entry), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    """The fixed head of the vCPU's mmap'ed run area (x86: no s390 psw fields)."""
    _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("exit", _kvm_run_exit)]


# --- ioctl numbers -------------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _ior(0xCF, kvm_xsave)
KVM_GET_DEVICE_ATTR = _iow(0xE2, kvm_device_attr)

# Capabilities and attributes.
KVM_API_VERSION = 12
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_XSAVE2 = 208
KVM_X86_GRP_SYSTEM = 0
KVM_X86_XCOMP_GUEST_SUPP = 0

# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_OUT = 1

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HLT: "HLT", KVM_EXIT_MMIO: "MMIO", KVM_EXIT_SHUTDOWN: "SHUTDOWN (triple fault)",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

# Ours only (KVM_X86_GRP_SYSTEM is "group 0" in a comment of 6.1's <asm/kvm.h>, named later).
_NOT_IN_HEADERS = ("KVM_NR_INTERRUPTS", "KVM_MAX_XCRS", "KVM_API_VERSION", "KVM_X86_GRP_SYSTEM")
# The (name, value) pairs the header test compares against <linux/kvm.h>.
IOCTLS = {name: value for name, value in globals().items()
          if name.startswith("KVM_") and isinstance(value, int)
          and name not in _NOT_IN_HEADERS}
STRUCTS = (kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_xcr, kvm_xcrs, kvm_xsave,
           kvm_cpuid_entry2, kvm_cpuid2, kvm_userspace_memory_region, kvm_device_attr)
