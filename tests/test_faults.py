"""Fault injection (apx_tests.faults): the proxy, each fault's edit, --apx-inject, and -- for
real, on every bank and backend this host runs -- that every fault is caught by a
scenario whose first failure line names the bank and register (truncate and
suppress_einval: the place), while the same scenarios pass without the fault.

The real runs stop at the first naming catch per fault, backend and bank (the full
matrix is ci/fault-table's; tests/test_faults_table.py runs it), trying the scenarios
in the order most likely to catch first.
"""

from __future__ import annotations

import pytest

from apx_tests.backend import BackendError, ImportRejected, Session
from apx_tests.cases import BACKEND_FEATURES, CaseId, CaseRunner
from apx_tests.faults import (FAULTS, NO_FAULT, FaultySession, problems, run_matrix, summarize,
                              swap_pair, target)
from apx_tests.guests.build import build_payload
from apx_tests.kvm.backend import KvmBackend
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure
from apx_tests.xsave import BANKS, Layout, XsaveImage, diff_registers

APX_LAYOUT = Layout.reference("intel-apx")
HOST_BANKS = ("xmm", "ymm", "x87")
# Which faults apply to which backend, written out by hand (docs/faults.md): the migration
# file and the gdbstub exist only under QEMU; raw KVM_SET_XSAVE refusals only under KVM.
_EVERYWHERE = {"bitflip", "zero_after_export", "drop_xstate_bv", "ignore_import", "swap", "shift8", "truncate"}
APPLICABLE = {"kvm": _EVERYWHERE | {"suppress_einval"},
              "qemu-tcg": _EVERYWHERE | {"stream_flip", "gdb_drop"},
              "qemu-kvm": _EVERYWHERE | {"stream_flip", "gdb_drop"}}
# kvm-ymm-*: export, import, round_trip, fresh_vm, init_state, gprs, negative.
KVM_YMM_CASES = 7
# Most faults show in `export`; the import-side ones need `import`/`debugger_import`.
FIRST_TRIES = ("export", "import", "debugger_import", "fresh_vm", "round_trip", "init_state", "negative", "gprs")


# --- the edits, on images (no VMM) -------------------------------------------------------------

class _Stub:
    """Just what the fault hooks read from a session."""

    def __init__(self, bank, layout=APX_LAYOUT, backend="kvm"):
        self.bank, self.layout, self.backend = BANKS[bank], layout, backend


def _loaded(bank: str) -> XsaveImage:
    image = XsaveImage.build(APX_LAYOUT, {})
    image.write_registers(BANKS[bank].pattern(1))
    return image


@pytest.mark.parametrize("bank", ["ymm", "xmm", "x87", "apx", "zmm_hi256", "opmask"])
def test_bitflip_changes_one_bit_of_the_target(bank):
    image = _loaded(bank)
    out = FAULTS["bitflip"].exported(_Stub(bank), image)
    reg, byte = target(BANKS[bank])
    diffs = diff_registers(BANKS[bank].pattern(1), out)
    assert [(d.register, d.byte_range) for d in diffs] == [(reg.name, (byte, byte + 1))]
    assert diffs[0].want[0] ^ diffs[0].got[0] == 0x04
    assert image.read(reg) == BANKS[bank].pattern(1)[reg.name], "the original image is left alone"


@pytest.mark.parametrize("bank", ["ymm", "xmm", "x87", "apx"])
def test_zero_after_export_zeroes_the_bank_and_keeps_xstate_bv(bank):
    image = _loaded(bank)
    out = FAULTS["zero_after_export"].exported(_Stub(bank), image)
    assert out.xstate_bv == image.xstate_bv
    assert all(out.read(n) == bytes(len(v)) for n, v in BANKS[bank].pattern(1).items())
    assert out.mxcsr == image.mxcsr and out.raw_component_bytes(0)[:2] == image.raw_component_bytes(0)[:2]


@pytest.mark.parametrize("bank", ["ymm", "xmm", "x87", "apx"])
def test_drop_xstate_bv_clears_the_banks_own_bit_only(bank):
    image = _loaded(bank)
    out = FAULTS["drop_xstate_bv"].exported(_Stub(bank), image)
    assert image.xstate_bv ^ out.xstate_bv == 1 << max(BANKS[bank].components)
    assert out.to_bytes()[576:] == image.to_bytes()[576:]


@pytest.mark.parametrize("bank", ["ymm", "x87", "apx"])
def test_swap_and_shift8(bank):
    image, b = _loaded(bank), BANKS[bank]
    a, z = swap_pair(b)
    swapped = FAULTS["swap"].exported(_Stub(bank), image)
    assert {d.register for d in diff_registers(b.pattern(1), swapped)} == {a.name, z.name}
    assert swapped.read(a) == image.read(z) and swapped.read(z) == image.read(a)
    shifted = FAULTS["shift8"].exported(_Stub(bank), image)
    first = b.registers[0]
    assert shifted.read(first)[8:first.slots[0].size] == image.read(first)[:first.slots[0].size - 8]
    assert shifted.read(first)[:8] == bytes(8)


@pytest.mark.parametrize("bank", ["ymm", "xmm", "x87", "apx"])
def test_truncate_is_one_line_naming_where(bank):
    with pytest.raises(BackendError) as err:
        FAULTS["truncate"].exported(_Stub(bank), _loaded(bank).copy(where="KVM_GET_XSAVE2 vcpu0"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"kvm {bank}: export: KVM_GET_XSAVE2 vcpu0 (cut to ")
    assert FAULTS["truncate"].named(message, BANKS[bank])


def test_named_wants_bank_and_register():
    ymm, x87 = BANKS["ymm"], BANKS["x87"]
    named = FAULTS["swap"].named
    assert named("KVM_GET_XSAVE2: avx ymm9 byte 17: want 0x0c got 0x08", ymm)
    assert named("after import: guest verify failed at ymm ymm0 byte 0", ymm)
    assert named("migration: x87 st5 byte 6: want 0x60 got 0x64", x87)
    assert not named("round trip: XSTATE_BV 0x7 -> 0x7, XCOMP_BV 0x0 -> 0x0 or padding bytes differ", ymm)
    assert not named("gdb: xmm9 byte 3: want 0x01 got 0x02", ymm)  # a register, not of the bank
    assert not named("st5 byte 6: want 0x60 got 0x64", x87)        # the bank is not named


def test_every_fault_is_described_and_applies_somewhere():
    assert len(FAULTS) == 10
    for fault in FAULTS.values():
        assert fault.summary and "\n" not in fault.summary
        assert any(fault.applies(b, f) for b, f in BACKEND_FEATURES.items()), fault.name
    assert not FAULTS["stream_flip"].applies("kvm", BACKEND_FEATURES["kvm"])
    assert not FAULTS["gdb_drop"].applies("kvm", BACKEND_FEATURES["kvm"])
    assert not FAULTS["suppress_einval"].applies("qemu-tcg", BACKEND_FEATURES["qemu-tcg"])
    for backend, names in APPLICABLE.items():
        assert {n for n, f in FAULTS.items() if f.applies(backend, BACKEND_FEATURES[backend])} == names, backend


# --- the proxy --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvm(kvm_host):
    return KvmBackend(kvm_host)


def test_proxy_forwards_what_the_fault_leaves_alone(kvm):
    bank = BANKS["ymm"]
    with Run(kvm, bank, build_payload("ymm").code, session_wrapper=FAULTS["swap"].wrap) as run:
        session = run.start()
        assert isinstance(session, Session) and isinstance(session, FaultySession)
        assert "raw_xsave" in session.features and session.backend == "kvm" and session.bank is bank
        assert set(session.gpr_views()) == set(session.inner.gpr_views())
        session.run_to(0)
        assert session.stage == 0 and session.mailbox().stage == 0
        snap = session.snapshot()
        restored = run.adopt(session.restore(snap))
        assert isinstance(restored, FaultySession) and restored.fault is FAULTS["swap"]
        a, z = swap_pair(bank)
        image = restored.export()
        assert image.read(a) == restored.inner.export().read(z)
        assert set(restored.observers()) == {"KVM_GET_XSAVE2"}
        assert restored.observers()["KVM_GET_XSAVE2"]().read(a) == image.read(a)
        assert restored.export_legacy() == restored.export_raw()[:4096]


def test_suppress_einval_swallows_the_refusal(kvm):
    bank = BANKS["xmm"]
    with Run(kvm, bank, build_payload("xmm").code) as run:
        plain = run.start()
        plain.run_to(0)
        bad = bytearray(plain.export_raw())
        bad[512 + 2] |= 0x08  # XSTATE_BV bit 19 (APX): not supported here
        if plain.owner.host.supported_xcr0 >> 19 & 1:
            pytest.skip("this KVM supports APX: bit 19 is not invalid here")
        with pytest.raises(ImportRejected):
            plain.import_raw(bytes(bad))
        FAULTS["suppress_einval"].wrap(plain).import_raw(bytes(bad))  # no exception


def test_run_without_wrapper_is_untouched(kvm):
    """The hook is opt-in: Run and CaseRunner without a wrapper behave as before."""
    with CaseRunner() as runner:
        assert runner.session_wrapper is None
        assert runner.run("kvm-ymm-export").outcome == "pass"


# --- for real: every fault caught, naming bank and register -------------------------------------

def _matrix(backend: str):
    with CaseRunner() as runner:
        reason = runner.unavailable(CaseId(backend, "xmm", "export"))
        if reason:
            pytest.skip(reason)
        faults = list(FAULTS) if backend != "kvm" else [NO_FAULT, *FAULTS]
        return run_matrix(faults, [backend], HOST_BANKS, FIRST_TRIES, runner=runner, first_catch=True)


@pytest.mark.parametrize("backend", ["kvm", "qemu-tcg", "qemu-kvm"])
def test_every_fault_is_caught_naming_bank_and_register(backend):
    cells = _matrix(backend)
    rows = summarize(cells)
    assert not problems(rows), problems(rows)
    ran_banks = {c.bank for c in cells if c.outcome in ("pass", "fail")}
    assert ran_banks == set(HOST_BANKS) or pytest.skip(f"banks not runnable here: {set(HOST_BANKS) - ran_banks}")
    for row in rows:
        if row.fault == NO_FAULT or not row.applicable or not row.exercised:
            continue
        assert row.naming, (row.fault, row.bank, row.catching)
        assert "\n" not in row.line and row.line
    # A fault no bank exercised here proved nothing: each applicable one is caught somewhere.
    caught = {r.fault for r in rows if r.naming}
    assert {r.fault for r in rows if r.applicable and r.fault != NO_FAULT} <= caught, rows
    applicable = {r.fault for r in rows if r.applicable and r.fault != NO_FAULT}
    assert applicable == APPLICABLE[backend]


def test_the_same_scenarios_pass_without_a_fault(kvm):
    """The control, in-process on KVM for every bank here (QEMU: tests/test_faults_table.py
    and the suite's own -m apx cases)."""
    cells = run_matrix([NO_FAULT], ["kvm"], HOST_BANKS)
    assert cells and all(c.outcome in ("pass", "skip") for c in cells), [
        (c.bank, c.scenario, c.first_line) for c in cells if c.outcome == "fail"]


def test_engine_failure_from_a_fault_is_a_scenario_failure(kvm):
    """Directly through Run: the scenario raises ScenarioFailure, lines name the registers."""
    bank = BANKS["x87"]
    with pytest.raises(ScenarioFailure) as failure:
        with Run(kvm, bank, build_payload("x87").code, session_wrapper=FAULTS["swap"].wrap) as run:
            SCENARIOS["export"].run(run)
    a, z = swap_pair(bank)
    text = "\n".join(failure.value.lines)
    assert f"x87 {a.name} " in text and f"x87 {z.name} " in text


# --- --apx-inject ---------------------------------------------------------------------------------

# `suite`: the pytester tree with the scenario suite (tests/conftest.py).


def test_apx_inject_fails_the_catching_cases(suite, kvm):
    result = suite.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", "kvm-ymm-", "-q",
                                       "--apx-inject", "zero_after_export")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 3, result.stdout.str()
    result.stdout.fnmatch_lines([
        "*kvm-ymm-export: KVM_GET_XSAVE2: sse ymm0 bytes 0..15: want 0x* got 0x0000*",
        "*apx inject*",
        f"zero_after_export: caught by 3 case(s), missed by {KVM_YMM_CASES - 3}, 0 skipped",
        "  caught: kvm-ymm-export",
    ])
    assert "Traceback" not in result.stdout.str()


def test_apx_inject_skips_backends_the_fault_does_not_apply_to(suite):
    result = suite.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", "kvm-ymm-export", "-rs",
                                       "--apx-inject", "stream_flip")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*kvm-ymm-export: --apx-inject fault stream_flip applies to qemu-kvm, qemu-tcg only*"])


def test_apx_inject_unknown_fault_is_a_usage_error(suite):
    result = suite.runpytest_inprocess("--apx-inject", "nonsense")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--apx-inject: invalid choice: 'nonsense'*"])


def test_without_apx_inject_nothing_changes(suite, kvm):
    result = suite.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", "kvm-ymm-", "-q")
    assert result.parseoutcomes().get("passed") == KVM_YMM_CASES and "apx inject" not in result.stdout.str()


def test_apx_inject_refuses_remote_hosts(suite):
    result = suite.runpytest_inprocess("--apx-inject", "swap", "--apx-host", "root@127.0.0.1:1")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--apx-inject runs the cases locally; it does not combine with --apx-host*"])
