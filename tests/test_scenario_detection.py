"""Detection power of the scenarios on the real KVM backend: break one thing on purpose
and the failure must name the bank, the register and the byte.

These run the real micro-VMM and real payloads; a bank this host cannot run is skipped
with the backend's reason (the zmm23 case needs AVX-512, the r23 case APX).
"""

from __future__ import annotations

import pytest

from apx_tests.backend import BackendError
from apx_tests.guests import protocol
from apx_tests.guests.build import build_payload
from apx_tests.kvm.backend import KvmBackend
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure
from apx_tests.xsave import BANKS

# (bank, register, byte) - one register per bank, away from the first and last bytes.
TARGETS = [("hi16_zmm", "zmm23", 37), ("zmm_hi256", "zmm9", 50), ("opmask", "k5", 3),
           ("ymm", "ymm13", 21), ("xmm", "xmm9", 6), ("x87", "st5", 4), ("apx", "r23", 5)]


@pytest.fixture(scope="module")
def backend(kvm_host):
    return KvmBackend(kvm_host)


def _runnable(backend, bank_name):
    bank = BANKS[bank_name]
    reason = backend.unavailable_reason(bank)
    if reason:
        pytest.skip(f"{bank_name}: {reason}")
    return bank, build_payload(bank_name).code


def _flip(register: str, byte: int):
    def tamper(image):
        value = bytearray(image.read(register))
        value[byte] ^= 0x5A
        image.write(register, bytes(value))
    return tamper


@pytest.mark.parametrize("bank_name,register,byte", TARGETS, ids=[t[1] for t in TARGETS])
def test_import_reports_the_flipped_byte(backend, bank_name, register, byte):
    bank, code = _runnable(backend, bank_name)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=_flip(register, byte)) as run:
            SCENARIOS["import"].run(run)
    first = failure.value.lines[0]
    assert f"{bank_name} {register} byte {byte}" in first, failure.value.lines
    assert any(register in line for line in failure.value.lines[1:])


@pytest.mark.parametrize("bank_name,register,byte", TARGETS, ids=[t[1] for t in TARGETS])
def test_same_scenario_passes_untampered(backend, bank_name, register, byte):
    """The control: without the flip the very same scenario passes."""
    bank, code = _runnable(backend, bank_name)
    with Run(backend, bank, code) as run:
        SCENARIOS["import"].run(run)


@pytest.mark.parametrize("bank_name", ["ymm", "xmm", "x87"])
def test_round_trip_reports_a_changed_register(backend, bank_name):
    bank, code = _runnable(backend, bank_name)
    register = bank.registers[3].name
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=_flip(register, 1)) as run:
            SCENARIOS["round_trip"].run(run)
    assert register in failure.value.lines[0]


@pytest.mark.parametrize("bank_name", ["ymm", "xmm", "x87"])
def test_init_state_catches_a_vmm_that_ignores_xstate_bv(backend, bank_name):
    """Leaving the bank's XSTATE_BV bits set is what a VMM ignoring them would do: the
    garbage becomes visible and the scenario must say where."""
    bank, code = _runnable(backend, bank_name)

    def keep_bits(image):
        image.xstate_bv |= bank.xstate_mask

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=keep_bits) as run:
            SCENARIOS["init_state"].run(run)
    assert f"{bank_name} {bank.registers[0].name}" in failure.value.lines[0]


def test_export_catches_a_wrong_expected_value(backend):
    """export compares against the loaded pattern: load another stage's pattern and the
    export check must fail on every register (a swap or stale state would look like this)."""
    bank, code = _runnable(backend, "ymm")
    with Run(backend, bank, code) as run:
        run.pattern = lambda stage, real=run.pattern: real(stage + 5) if stage == 1 else real(stage)
        session = run.start()
        session.run_to(protocol.STAGE_STARTED)
        session.write_area(protocol.LOAD_AREA, bank.pack(bank.pattern(1)))
        session.run_to(protocol.STAGE_LOADED)
        from apx_tests.scenarios.engine import check_registers
        lines = check_registers(session.export(), run.pattern(1), what="KVM_GET_XSAVE2")
    assert len(lines) >= len(bank.registers)


# --- fresh_vm: a restore that loses what the snapshot held ----------------------------------

# (bank, register, byte, component label, a register outside the bank and its label): the
# labels written out by hand from the XSAVE layout (ymm13 byte 21 is in the upper half,
# component 2 "avx"; zmm9 byte 50 in its upper 256 bits, component 6).
FRESH = [("hi16_zmm", "zmm23", 37, "hi16_zmm", "xmm2", "sse"),
         ("zmm_hi256", "zmm9", 50, "zmm_hi256", "st2", "x87"),
         ("opmask", "k5", 3, "opmask", "xmm2", "sse"),
         ("ymm", "ymm13", 21, "avx", "st2", "x87"),
         ("xmm", "xmm9", 6, "sse", "st2", "x87"),
         ("x87", "st5", 4, "x87", "xmm2", "sse"),
         ("apx", "r23", 5, "apx", "xmm2", "sse")]
FRESH_IDS = [f[0] for f in FRESH]


class _LossyRestore:
    """A VMM whose restore loses something: the fresh VM is given the snapshot's XSAVE
    buffer after `edit` changed it (the vCPU state, memory and everything else are the
    snapshot's).  With `hide`, the fresh VM's exports show the snapshot as it was, so
    only the guest can notice."""

    def __init__(self, inner, edit, *, hide: bool = False):
        self.inner, self.edit, self.hide = inner, edit, hide

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def restore(self, snapshot):
        import dataclasses
        from apx_tests.kvm.backend import KvmSnapshot
        from apx_tests.xsave import XsaveImage
        image = XsaveImage(self.inner.layout, snapshot.state.xsave)
        self.edit(image)
        lossy = KvmSnapshot(dataclasses.replace(snapshot.state, xsave=image.to_bytes()), snapshot.stage)
        restored = self.inner.restore(lossy)
        if self.hide:
            honest = XsaveImage(self.inner.layout, snapshot.state.xsave)
            restored.export = lambda: honest.copy()
        return restored


def _zero_byte(register: str, byte: int):
    def edit(image):
        value = bytearray(image.read(register))
        assert value[byte] != 0, "the patterns have no zero byte"
        value[byte] = 0
        image.write(register, bytes(value))
    return edit


@pytest.mark.parametrize("bank_name,register,byte,label,_o,_ol", FRESH, ids=FRESH_IDS)
def test_fresh_vm_reports_a_byte_the_restore_lost(backend, bank_name, register, byte, label, _o, _ol):
    """The restore zeroes one byte of the bank on its way into the new VM: the fresh VM's
    export must differ from the snapshot's exactly there, named by register and byte."""
    bank, code = _runnable(backend, bank_name)
    want = bank.pattern(1)[register][byte]
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code,
                 session_wrapper=lambda s: _LossyRestore(s, _zero_byte(register, byte))) as run:
            SCENARIOS["fresh_vm"].run(run)
    assert failure.value.lines[0] == f"fresh VM export: {label} {register} byte {byte}: want 0x{want:02x} got 0x00"
    assert all(f"{register} byte {byte}:" in line for line in failure.value.lines), failure.value.lines


@pytest.mark.parametrize("bank_name,register,byte,label,_o,_ol", FRESH, ids=FRESH_IDS)
def test_fresh_vm_guest_notices_a_loss_the_export_hides(backend, bank_name, register, byte, label, _o, _ol):
    """The same loss, but the fresh VM's export shows the snapshot unchanged (a VMM whose
    state read-back and vCPU disagree): the guest, continuing in the fresh VM, must name
    the register and byte."""
    bank, code = _runnable(backend, bank_name)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code,
                 session_wrapper=lambda s: _LossyRestore(s, _zero_byte(register, byte), hide=True)) as run:
            SCENARIOS["fresh_vm"].run(run)
    assert failure.value.lines[0] == f"in the fresh VM: guest verify failed at {bank_name} {register} byte {byte}"
    assert any(f"{label} {register} byte {byte}: want" in line for line in failure.value.lines[1:])


@pytest.mark.parametrize("bank_name,_r,_b,_l,outside,label", FRESH, ids=FRESH_IDS)
def test_fresh_vm_reports_a_change_outside_the_bank(backend, bank_name, _r, _b, _l, outside, label):
    """The restore changes a register of another component (byte 3 of it flipped): the
    bank itself is intact, and the comparison with the snapshot must still name where."""
    bank, code = _runnable(backend, bank_name)

    def flip(image):
        value = bytearray(image.read(outside))
        value[3] ^= 0x5A
        image.write(outside, bytes(value))

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: _LossyRestore(s, flip)) as run:
            SCENARIOS["fresh_vm"].run(run)
    assert failure.value.lines[0].startswith(f"fresh VM export: outside {bank_name}: {label} {outside} byte 3: want ")


def test_fresh_vm_passes_through_an_honest_wrapper(backend):
    """The control: the same wrapper with an edit that changes nothing passes."""
    bank, code = _runnable(backend, "ymm")
    with Run(backend, bank, code, session_wrapper=lambda s: _LossyRestore(s, lambda image: None)) as run:
        SCENARIOS["fresh_vm"].run(run)


def test_restore_without_snapshot_fails(backend):
    bank, code = _runnable(backend, "xmm")
    with Run(backend, bank, code) as run:
        session = run.start()
        with pytest.raises(BackendError, match="snapshot before the guest reached a sync point"):
            session.snapshot()


def test_guest_hang_is_a_one_line_error(backend):
    """A guest that never syncs: the run ends after the timeout naming stage and RIP."""
    bank = BANKS["xmm"]
    spin = bytes.fromhex("ebfe")  # jmp . at CPL3: never exits to the VMM
    hung = KvmBackend(backend.host, timeout=0.2)
    with Run(hung, bank, spin) as run:
        session = run.start()
        with pytest.raises(BackendError) as err:
            session.run_to(protocol.STAGE_STARTED)
    message = str(err.value)
    assert "\n" not in message
    assert "guest hung" in message and "last stage none" in message and "RIP 0x10000" in message


def test_guest_fault_is_a_one_line_error(backend):
    """ud2 at CPL3 with no IDT: KVM reports a shutdown (triple fault); we say so."""
    bank = BANKS["xmm"]
    with Run(backend, bank, bytes.fromhex("0f0b")) as run:
        session = run.start()
        with pytest.raises(BackendError) as err:
            session.run_to(protocol.STAGE_STARTED)
    message = str(err.value)
    assert "\n" not in message and "kvm xmm:" in message
    assert "SHUTDOWN" in message or "INTERNAL_ERROR" in message


# XCR0 bits xcr0_cycle must drop for each stand-in bank, written out from the SDM's rules
# (Vol. 1 13.3): the bank's own bits beyond x87/SSE, and AVX-512 (bits 5-7) whenever AVX
# (bit 2) goes.  x87 and SSE are never cleared, so the xmm bank's XCR0 does not change.
CYCLE_DROPS = {"ymm": 0xE4, "hi16_zmm": 0xE4, "zmm_hi256": 0xE4, "opmask": 0xE4, "xmm": 0x0}


def _kvm_xcr0(session) -> int:
    """XCR0 as KVM_GET_XCRS reports it, read here from the ioctl's own structure."""
    xcrs = session.vm.vcpu.get_xcrs()
    values = [xcrs.xcrs[i].value for i in range(xcrs.nr_xcrs) if xcrs.xcrs[i].xcr == 0]
    assert len(values) == 1, f"KVM_GET_XCRS returned {xcrs.nr_xcrs} XCRs, {len(values)} of them XCR0"
    return values[0]


class _RecordingXcr0:
    """Forwards everything to the real session; after every set_xcr0 it reads XCR0 back
    with KVM_GET_XCRS and keeps (value set, value read)."""

    def __init__(self, inner):
        self.inner = inner
        self.first = None
        self.sets: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_xcr0(self) -> int:
        if self.first is None:
            self.first = _kvm_xcr0(self.inner)
        return self.inner.get_xcr0()

    def set_xcr0(self, value: int) -> None:
        self.inner.set_xcr0(value)
        self.sets.append((value, _kvm_xcr0(self.inner)))


@pytest.mark.parametrize("bank_name", sorted(CYCLE_DROPS))
def test_xcr0_cycle_mechanics_on_a_stand_in_bank(backend, bank_name):
    """xcr0_cycle is an APX case; its steps run here on a stand-in bank, and each must
    really happen: XCR0 (read with KVM_GET_XCRS) goes down to the value the SDM allows
    without the bank (CYCLE_DROPS, by hand), then back up to where it was, and the guest
    runs on to its verify sync and stores its bank.

    Left out of the assertion: whether the guest then finds its values.  The SDM does not
    define what a component holds after its XCR0 bit was cleared and set again (Vol. 1
    13.3 says nothing of the state of a disabled component), so either guest verdict is
    correct for a stand-in bank; only the APX case (the series' promise) judges it."""
    bank, code = _runnable(backend, bank_name)
    proxies = []

    def record(session):
        proxies.append(_RecordingXcr0(session))
        return proxies[-1]

    verdict = None
    with Run(backend, bank, code, session_wrapper=record) as run:
        try:
            SCENARIOS["xcr0_cycle"].run(run)
        except ScenarioFailure as failure:
            verdict = failure.lines
        mailbox = run.sessions[0].mailbox()
    (proxy,) = proxies
    xcr0 = proxy.first
    down = xcr0 & ~CYCLE_DROPS[bank_name]
    assert xcr0 is not None and xcr0 & bank.xcr0_mask == bank.xcr0_mask, f"guest XCR0 {xcr0}"
    assert proxy.sets == [(down, down), (xcr0, xcr0)], [(hex(a), hex(b)) for a, b in proxy.sets]
    # The guest ran on after the cycle: it reached its verify sync and gave a verdict.
    assert mailbox.stage == protocol.STAGE_VERIFIED, mailbox
    assert mailbox.status in (protocol.STATUS_OK, protocol.STATUS_MISMATCH), mailbox
    if mailbox.status == protocol.STATUS_MISMATCH:  # allowed (see above), but named
        assert verdict and verdict[0].startswith(
            f"after XCR0 {xcr0:#x} -> {down:#x} -> {xcr0:#x}: guest verify failed at {bank_name} "), verdict
    else:
        assert verdict is None, verdict


def test_xcr0_cycle_applies_to_apx_only():
    assert SCENARIOS["xcr0_cycle"].applies_to("apx")
    assert not any(SCENARIOS["xcr0_cycle"].applies_to(b) for b in BANKS if b != "apx")


def test_gprs_scenario_checks_rdi_against_the_mailbox(backend, monkeypatch):
    """KVM_GET_REGS must show the payload's %rdi = mailbox; a VMM reporting another value
    (here: the view shifted by a page) fails naming the observer and both addresses."""
    from apx_tests.kvm.backend import KvmSession
    bank, code = _runnable(backend, "xmm")
    with Run(backend, bank, code) as run:
        SCENARIOS["gprs"].run(run)
    assert run.notes == ["GPR observers: KVM_GET_REGS (18)"]
    real = KvmSession._regs_view
    monkeypatch.setattr(KvmSession, "_regs_view", lambda self: {
        **real(self), "rdi": (self.mailbox_gpa + 4096).to_bytes(8, "little")})
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["gprs"].run(run)
    assert failure.value.lines == [f"KVM_GET_REGS: rdi {0x101000:#x}, the payload's mailbox is {0x100000:#x}"]
