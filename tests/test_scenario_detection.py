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
from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.kvm.system import KvmUnavailable
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure
from apx_tests.xsave import BANKS

# (bank, register, byte) - one register per bank, away from the first and last bytes.
TARGETS = [("hi16_zmm", "zmm23", 37), ("zmm_hi256", "zmm9", 50), ("opmask", "k5", 3),
           ("ymm", "ymm13", 21), ("xmm", "xmm9", 6), ("x87", "st5", 4), ("apx", "r23", 5)]


@pytest.fixture(scope="module")
def backend():
    try:
        host = KvmHost()
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    yield KvmBackend(host)
    host.close()


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


@pytest.mark.parametrize("bank_name", ["ymm", "xmm"])
def test_xcr0_cycle_mechanics_on_a_stand_in_bank(backend, bank_name):
    """xcr0_cycle is an APX case; its steps (KVM_SET_XCRS down and up, the guest runs on)
    run here on a stand-in bank.  What the registers hold afterwards is not defined for
    these banks, so only a clean run or a verdict naming registers is accepted."""
    bank, code = _runnable(backend, bank_name)
    try:
        with Run(backend, bank, code) as run:
            SCENARIOS["xcr0_cycle"].run(run)
    except ScenarioFailure as failure:
        assert f"{bank_name} " in failure.value.lines[0] and "XCR0" in failure.value.lines[0]


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
