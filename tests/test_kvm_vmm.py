"""The micro-VMM's state handling under *standard* KVM semantics.

A standard KVM finishes a guest's `out` on the next KVM_RUN (complete_fast_pio_out
advances RIP); only then may state be saved (KVM API: KVM_RUN, ``immediate_exit``).  This
host's paravirtual KVM advances RIP before the exit and so hides a VMM that saves too
early: `fresh_vm` then replays the `out` on a lab host ("expected sync 2, guest sent
sync 1").  These tests pin the VMM's side of the contract on any KVM: the save path
completes the exit with an immediate-exit KVM_RUN that does not run the guest, and the
saved RIP points just past the sync `out`.
"""

from __future__ import annotations

import pytest

from apx_tests.guests import protocol
from apx_tests.guests.build import build_payload
from apx_tests.kvm import abi
from apx_tests.kvm.system import Vcpu
from apx_tests.kvm.vmm import MAILBOX, PAYLOAD, MicroVm

OUTB_IMM8 = 0xE6  # `outb %al, $imm8`, the payload's sync instruction (guests/payload/common.S)


@pytest.fixture(scope="module")
def host(kvm_host):
    return kvm_host


@pytest.fixture
def synced_vm(host):
    """A VM whose xmm payload stopped at its first sync point (stage 0)."""
    code = build_payload("xmm").code
    with MicroVm(host.kvm, host.guest_cpu) as vm:
        vm.boot(code, protocol.pack_mailbox_header(bank_bytes=256))
        exit_ = vm.run()
        assert (exit_.kind, exit_.value) == ("sync", protocol.STAGE_STARTED)
        yield vm, code


def test_save_state_completes_the_pending_out_without_running_the_guest(synced_vm, monkeypatch):
    vm, code = synced_vm
    runs = []
    real_ioctl = Vcpu.ioctl

    def spy(self, request, arg=None):
        if request == abi.KVM_RUN:
            runs.append(self.run_area.immediate_exit)
        return real_ioctl(self, request, arg)

    monkeypatch.setattr(Vcpu, "ioctl", spy)
    go_before = vm.read(MAILBOX + protocol.OFF_GO, 4)
    state = vm.save_state()
    assert runs == [1], "save_state must complete the exit with exactly one immediate-exit KVM_RUN"
    assert vm.vcpu.run_area.immediate_exit == 0, "immediate_exit left set: the next run would not enter"
    assert vm.read(MAILBOX + protocol.OFF_GO, 4) == go_before
    # RIP is just past the sync `out`: a restore continues after the sync point.
    offset = state.regs.rip - PAYLOAD
    assert code[offset - 2: offset] == bytes([OUTB_IMM8, protocol.SYNC_PORT]), hex(state.regs.rip)


def test_restored_vm_continues_after_the_sync_point(host, synced_vm):
    """The saved state, loaded into a fresh VM and released, reaches the *next* sync point."""
    vm, _ = synced_vm
    state = vm.save_state()
    with MicroVm(host.kvm, host.guest_cpu) as fresh:
        fresh.load_state(state)
        fresh.release(protocol.STAGE_STARTED)
        exit_ = fresh.run()
    assert (exit_.kind, exit_.value) == ("sync", protocol.STAGE_LOADED)


def test_complete_pending_io_propagates_other_errors(synced_vm):
    """Only EINTR is the expected answer; a closed vCPU is an error naming the ioctl."""
    vm, _ = synced_vm
    vcpu = vm.vcpu
    vm.vcpu = None
    vcpu.close()
    with pytest.raises(OSError, match="closed"):
        vcpu.complete_pending_io()


def test_a_run_and_a_hung_run_give_back_the_sigalrm_handler(host):
    """MicroVm.run bounds KVM_RUN with SIGALRM (set through _signal, not signal.signal): the
    handler the process had before is back after a run that synced and after one that hung,
    and a hang is a GuestTimeout, not the caller's handler running."""
    import signal

    from apx_tests.kvm.vmm import GuestTimeout

    calls = []
    mine = lambda signum, frame: calls.append(signum)  # noqa: E731
    before = signal.signal(signal.SIGALRM, mine)
    try:
        with MicroVm(host.kvm, host.guest_cpu) as vm:
            vm.boot(build_payload("xmm").code, protocol.pack_mailbox_header(bank_bytes=256))
            assert vm.run().kind == "sync"
        assert signal.getsignal(signal.SIGALRM) is mine
        with MicroVm(host.kvm, host.guest_cpu) as vm:
            vm.boot(bytes.fromhex("ebfe"), protocol.pack_mailbox_header(bank_bytes=256))  # jmp . at CPL3
            with pytest.raises(GuestTimeout, match="guest hung: no sync within 0.2 s"):
                vm.run(timeout=0.2)
        assert signal.getsignal(signal.SIGALRM) is mine and calls == []
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, before)
