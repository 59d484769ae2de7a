"""apx_tests.kvm.system's one ioctl call: fcntl.ioctl for a struct, None or an int that
fits a C int, libc's ioctl() for a larger int (KVM_SET_TSS_ADDR's address).  Each path
must give the same one-line KvmError, and a struct must come back filled in place."""

from __future__ import annotations

import errno
import os

import pytest

from apx_tests.kvm import abi
from apx_tests.kvm.system import KvmError, _ioctl
from apx_tests.kvm.vmm import TSS_ADDR_FOR_VMX


@pytest.fixture
def not_kvm():
    """An fd no KVM ioctl applies to: each call fails with ENOTTY."""
    fd = os.open(os.devnull, os.O_RDWR)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("request_name, arg", [
    ("KVM_RUN", None),                          # fcntl, no argument
    ("KVM_CREATE_VCPU", 3),                     # fcntl, a C int
    ("KVM_SET_TSS_ADDR", TSS_ADDR_FOR_VMX),     # libc: above INT_MAX
    ("KVM_GET_REGS", "struct"),                 # fcntl, the struct in place
])
def test_every_argument_path_fails_in_one_line_naming_the_ioctl(not_kvm, request_name, arg):
    if arg == "struct":
        arg = abi.kvm_regs()
    with pytest.raises(KvmError) as err:
        _ioctl(not_kvm, abi.IOCTLS[request_name], arg, what="vcpu7")
    assert err.value.errno == errno.ENOTTY
    assert str(err.value) == f"[Errno {errno.ENOTTY}] {request_name} on vcpu7: {os.strerror(errno.ENOTTY)} (ENOTTY)"


def test_an_unnamed_fd_and_request_are_named_by_number(not_kvm):
    with pytest.raises(KvmError, match=rf"^\[Errno {errno.ENOTTY}\] 0x1234 on fd {not_kvm}: "):
        _ioctl(not_kvm, 0x1234)


def test_structs_big_and_small_are_filled_in_place(kvm_host):
    """kvm_regs (144 bytes: fcntl copies it out and back) and the XSAVE2 buffer (over 1024
    bytes: fcntl passes it as is) both carry KVM's answer back; the TSS address above
    INT_MAX reaches KVM intact (libc's path)."""
    with kvm_host.kvm.create_vm() as vm:
        assert _ioctl(vm.fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR_FOR_VMX) == 0
        vcpu = vm.create_vcpu()
        try:
            regs = abi.kvm_regs()
            regs.rip, regs.rflags, regs.r15 = 0x1234_5678_9ABC, 0x2, 0xFEED_F00D_0000_0001
            vcpu.set_regs(regs)
            back = vcpu.get_regs()
            assert (back.rip, back.r15) == (0x1234_5678_9ABC, 0xFEED_F00D_0000_0001)
            image = bytearray(vcpu.get_xsave2())
            assert len(image) == vcpu.xsave_size > 1024
            image[160:176] = bytes(range(0x40, 0x50))  # xmm0 (legacy region offset 160)
            image[512] |= 0x2                            # XSTATE_BV: SSE state present
            vcpu.set_xsave(bytes(image))
            assert vcpu.get_xsave2()[160:176] == bytes(range(0x40, 0x50))
        finally:
            vcpu.close()
