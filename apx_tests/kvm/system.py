"""Typed handles on /dev/kvm, a VM and a vCPU: one method per ioctl, fds owned and closed.

ioctls whose argument is a struct or a small integer go through the standard library's
fcntl.ioctl (the struct is passed in place as a writable buffer); an integer argument above
INT_MAX (KVM_SET_TSS_ADDR's 0xfffbd000) goes through libc's ioctl(), because fcntl.ioctl
takes only a C int.  fcntl's path costs ~1.8 us less per call here, and a scenario makes
15 of them (docs/bench.md, Step K fifth round).  Errors become KvmError naming the ioctl
and errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass

from . import abi

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int

_IOCTL_NAMES = {value: name for name, value in abi.IOCTLS.items()}


class KvmError(OSError):
    """A KVM ioctl failed; str() is one line naming the ioctl, the object and errno."""


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used here (missing, not permitted, wrong API version)."""


_INT_MAX = 2**31 - 1


def _ioctl(fd: int, request: int, arg=None, *, what: str = "") -> int:
    """ioctl(fd, request, arg): arg None (0), an int, or a ctypes object passed in place.
    A SIGALRM handler's exception (MicroVm.run's timeout) passes through unchanged."""
    try:
        if arg is None:
            return fcntl.ioctl(fd, request, 0)
        if not isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg, True)
        if arg <= _INT_MAX:
            return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise _ioctl_error(exc.errno, fd, request, what) from None
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        raise _ioctl_error(ctypes.get_errno(), fd, request, what)
    return ret


def _ioctl_error(err: int, fd: int, request: int, what: str) -> "KvmError":
    name = _IOCTL_NAMES.get(request, hex(request))
    return KvmError(err, f"{name} on {what or f'fd {fd}'}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)


class _Fd:
    """An owned file descriptor, closed exactly once."""

    def __init__(self, fd: int, what: str):
        self.fd = fd
        self.what = what

    def ioctl(self, request: int, arg=None) -> int:
        if self.fd < 0:
            raise KvmError(errno.EBADF, f"{self.what} is closed")
        return _ioctl(self.fd, request, arg, what=self.what)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def kvm_flavour(sysfs: str = "/sys/module") -> str | None:
    """Which KVM serves /dev/kvm, from the loaded modules: "kvm_pvm" (the paravirtual KVM
    of nested sandboxes), "kvm_intel", "kvm_amd", or None when none is loaded (a remote
    /dev/kvm, or no sysfs).  Scenarios never branch on it; tests and reports name it,
    because kvm_pvm hides standard-KVM behaviour (see docs/kvm.md)."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(os.path.join(sysfs, name)):
            return name
    return None


class Kvm(_Fd):
    """/dev/kvm: system ioctls."""

    _mmap_size: int | None = None
    _xsave2_size: int | None = None

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> "Kvm":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(exc.errno, f"{path}: {exc.strerror}") from None
        kvm = cls(fd, path)
        try:
            version = kvm.api_version()
        except KvmError as exc:  # e.g. a regular file: ENOTTY; close it now, say so in one line
            kvm.close()
            raise KvmUnavailable(exc.errno, f"{path}: not a KVM device (KVM_GET_API_VERSION: "
                                            f"{os.strerror(exc.errno)})") from None
        if version != abi.KVM_API_VERSION:
            kvm.close()
            raise KvmUnavailable(errno.EINVAL, f"{path}: KVM API version {version}, need {abi.KVM_API_VERSION}")
        return kvm

    def api_version(self) -> int:
        return self.ioctl(abi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = self.ioctl(abi.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        while True:
            buf = _cpuid2_buffer(max_entries)
            try:
                self.ioctl(abi.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return _cpuid2_entries(buf)

    def supported_xcr0(self) -> int:
        """XCR0 bits KVM lets a guest enable (KVM_X86_XCOMP_GUEST_SUPP; CPUID 0xD.0 as fallback)."""
        value = ctypes.c_uint64()
        attr = abi.kvm_device_attr(0, abi.KVM_X86_GRP_SYSTEM, abi.KVM_X86_XCOMP_GUEST_SUPP,
                                   ctypes.addressof(value))
        try:
            self.ioctl(abi.KVM_GET_DEVICE_ATTR, attr)
            return value.value
        except KvmError:
            for entry in self.supported_cpuid():
                if entry.function == 0xD and entry.index == 0:
                    return entry.eax | (entry.edx << 32)
            return 0

    def create_vm(self) -> "Vm":
        return Vm(self.ioctl(abi.KVM_CREATE_VM, 0), "VM", self)

    def xsave2_size(self) -> int:
        """KVM_CAP_XSAVE2 asked on a VM fd: the buffer size for KVM_GET_XSAVE2/KVM_SET_XSAVE."""
        if self._xsave2_size is None:
            with self.create_vm() as vm:
                self._xsave2_size = vm.xsave2_size()
        return self._xsave2_size


def _cpuid2_buffer(nent: int):
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", abi.kvm_cpuid_entry2 * nent)]
    buf = Cpuid2()
    buf.nent = nent
    return buf


def cpuid2_buffer(entries) -> ctypes.Structure:
    """A struct kvm_cpuid2 holding `entries`; build once and reuse for every vCPU."""
    buf = _cpuid2_buffer(len(entries))
    for slot, entry in zip(buf.entries, entries):
        (slot.function, slot.index, slot.flags, slot.eax, slot.ebx, slot.ecx,
         slot.edx) = (entry.function, entry.index, entry.flags, entry.eax, entry.ebx,
                      entry.ecx, entry.edx)
    return buf


def _cpuid2_entries(buf) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in buf.entries[: buf.nent]]


class Vm(_Fd):
    def __init__(self, fd: int, what: str, kvm: Kvm):
        super().__init__(fd, what)
        self.kvm = kvm
        self._vcpus = 0

    def check_extension(self, cap: int) -> int:
        return self.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def xsave2_size(self) -> int:
        # The same for every VM of this KVM (kvm_caps); asked once, on the first VM.
        if self.kvm._xsave2_size is not None:
            return self.kvm._xsave2_size
        size = self.check_extension(abi.KVM_CAP_XSAVE2)
        # 0 means no XSAVE2: the legacy 4096-byte struct kvm_xsave is all there is.
        return size if size > 0 else ctypes.sizeof(abi.kvm_xsave)

    def set_tss_addr(self, addr: int) -> None:
        self.ioctl(abi.KVM_SET_TSS_ADDR, addr)

    def set_memory(self, slot: int, guest_phys: int, memory: mmap.mmap) -> None:
        host = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = abi.kvm_userspace_memory_region(slot, 0, guest_phys, len(memory), host)
        self.ioctl(abi.KVM_SET_USER_MEMORY_REGION, region)

    def create_vcpu(self) -> "Vcpu":
        index = self._vcpus
        fd = self.ioctl(abi.KVM_CREATE_VCPU, index)
        self._vcpus += 1
        return Vcpu(fd, f"vcpu{index}", self)


class Vcpu(_Fd):
    def __init__(self, fd: int, what: str, vm: Vm):
        super().__init__(fd, what)
        self.vm = vm
        self._run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_area = abi.kvm_run.from_buffer(self._run_map)
        self.xsave_size = vm.xsave2_size()

    def close(self) -> None:
        if getattr(self, "_run_map", None) is not None:
            self.run_area = None
            self._run_map.close()
            self._run_map = None
        super().close()

    def run(self) -> int:
        """KVM_RUN once; returns the exit reason."""
        self.ioctl(abi.KVM_RUN)
        return self.run_area.exit_reason

    def complete_pending_io(self) -> None:
        """KVM_RUN with ``immediate_exit`` set: finish the instruction of the last
        KVM_EXIT_IO/MMIO without running the guest (KVM API, "KVM_RUN ... immediate_exit").

        A standard KVM completes an `out` on the *next* KVM_RUN (complete_fast_pio_out
        advances RIP); state saved before that replays the `out` when restored.  KVM
        returns EINTR at once; kvm_pvm, which advances RIP early, does the same, so the
        call is cheap and correct everywhere."""
        if self.run_area is None:
            raise KvmError(errno.EBADF, f"{self.what} is closed")
        self.run_area.immediate_exit = 1
        try:
            self.ioctl(abi.KVM_RUN)
        except KvmError as exc:
            if exc.errno != errno.EINTR:
                raise
        finally:
            self.run_area.immediate_exit = 0

    def io_data(self) -> bytes:
        io = self.run_area.exit.io
        return self._run_map[io.data_offset: io.data_offset + io.size * io.count]

    def set_cpuid(self, entries) -> None:
        """KVM_SET_CPUID2 from CpuidEntry objects or a ready buffer (cpuid2_buffer())."""
        buf = entries if isinstance(entries, ctypes.Structure) else cpuid2_buffer(entries)
        self.ioctl(abi.KVM_SET_CPUID2, buf)

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        self.ioctl(abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self.ioctl(abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        self.ioctl(abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self.ioctl(abi.KVM_SET_SREGS, sregs)

    def get_xcrs(self) -> abi.kvm_xcrs:
        xcrs = abi.kvm_xcrs()
        self.ioctl(abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        self.ioctl(abi.KVM_SET_XCRS, xcrs)

    def set_xcr0(self, value: int) -> None:
        xcrs = abi.kvm_xcrs()
        xcrs.nr_xcrs = 1
        xcrs.xcrs[0].xcr = 0
        xcrs.xcrs[0].value = value
        self.set_xcrs(xcrs)

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the legacy fixed 4096-byte ABI."""
        buf = abi.kvm_xsave()
        self.ioctl(abi.KVM_GET_XSAVE, buf)
        return bytes(buf)

    def get_xsave2(self) -> bytes:
        """KVM_GET_XSAVE2: KVM_CAP_XSAVE2 bytes (standard format)."""
        buf = (ctypes.c_uint8 * self.xsave_size)()
        self.ioctl(abi.KVM_GET_XSAVE2, buf)
        return bytes(buf)

    def set_xsave(self, image: bytes) -> None:
        """KVM_SET_XSAVE of a KVM_CAP_XSAVE2-sized buffer (shorter input is zero-padded)."""
        if len(image) > self.xsave_size:
            raise KvmError(errno.EINVAL, f"KVM_SET_XSAVE on {self.what}: image is {len(image)} bytes, "
                                         f"KVM_CAP_XSAVE2 is {self.xsave_size}")
        buf = (ctypes.c_uint8 * self.xsave_size).from_buffer_copy(image.ljust(self.xsave_size, b"\0"))
        self.ioctl(abi.KVM_SET_XSAVE, buf)
