"""apx_tests.scenarios: self-tests that ci/mutation showed missing (docs/mutation.md).

They run the real micro-VMM on /dev/kvm with the real payloads, and break the VMM on
purpose through a session wrapper (Run(session_wrapper=...)): an import that changes a
byte, an export whose image differs outside the bank.  Each scenario must then fail with
the one line that names the register and the byte; the same wrapper passing everything
through must let the scenario pass.  Expected lines are written out in full.
"""

from __future__ import annotations

import pytest

from apx_tests.guests.build import build_payload
from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.kvm.system import KvmUnavailable
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure
from apx_tests.xsave import BANKS, XsaveImage

LOADED = 1  # the stage whose pattern the guest loads (docs/scenarios.md)


@pytest.fixture(scope="module")
def backend():
    try:
        host = KvmHost()
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    yield KvmBackend(host)
    host.close()


def runnable(backend, name):
    bank = BANKS[name]
    reason = backend.unavailable_reason(bank)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return bank, build_payload(name).code


class Wrapped:
    """A session whose listed methods are replaced; everything else is the real session's."""

    def __init__(self, inner, **overrides):
        self._inner = inner
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._inner, name)


def flip(image: XsaveImage, register: str, byte: int) -> tuple[int, int]:
    """XOR one byte of a register with 0x5a; returns (old, new)."""
    value = bytearray(image.read(register))
    old = value[byte]
    value[byte] ^= 0x5A
    image.write(register, bytes(value))
    return old, value[byte]


# ---- round_trip: the second export must be a real export -------------------------------

@pytest.mark.parametrize("bank_name,register,byte,component", [
    ("ymm", "ymm13", 21, "avx"),   # byte 21 = the upper half's byte 5 (component 2)
    ("xmm", "xmm9", 6, "sse"),
    ("x87", "st5", 4, "x87"),
])
def test_round_trip_fails_on_an_import_that_changes_a_byte(backend, bank_name, register, byte, component):
    bank, code = runnable(backend, bank_name)
    want = bank.pattern(LOADED)[register][byte]
    got = want ^ 0x5A

    def changing_import(session):
        def import_image(image):
            changed = image.copy()
            flip(changed, register, byte)
            session.import_image(changed)
        return Wrapped(session, import_image=import_image)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=changing_import) as run:
            SCENARIOS["round_trip"].run(run)
    assert failure.value.lines[0] == f"round trip: {component} {register} byte {byte}: want {want:#04x} got {got:#04x}"
    assert not any("guest" in line for line in failure.value.lines)  # the compare caught it, not the guest


@pytest.mark.parametrize("bank_name", ["ymm", "x87"])
def test_round_trip_passes_through_an_honest_wrapper(backend, bank_name):
    bank, code = runnable(backend, bank_name)
    with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s)) as run:
        SCENARIOS["round_trip"].run(run)


# ---- export: everything outside the bank stays as it was --------------------------------

def tampered_observers(register: str, byte: int, seen: list):
    """Wrap KVM_GET_XSAVE2 in session.observers() (not session.export(), which takes the
    baseline) so the observed image differs from the real state in one byte outside the bank."""
    def wrap(session):
        def observers():
            real = session.observers()

            def observe(fn):
                image = fn().copy()
                seen.append(flip(image, register, byte))
                return image
            return {name: (lambda fn=fn: observe(fn)) for name, fn in real.items()}
        return Wrapped(session, observers=observers)
    return wrap


@pytest.mark.parametrize("bank_name,register,byte,label", [
    ("ymm", "st2", 3, "x87"),      # another component: x87 ST2 (legacy 64 + 3)
    ("xmm", "st6", 0, "x87"),
    ("x87", "xmm4", 9, "sse"),     # another bank's register, in the legacy region
    ("ymm", "pkru", 1, "pkru"),    # component 9, where the host's XCR0 has it
])
def test_export_fails_on_a_change_outside_the_bank(backend, bank_name, register, byte, label):
    bank, code = runnable(backend, bank_name)
    seen: list[tuple[int, int]] = []
    if register == "pkru" and not backend.layout.has(9):
        pytest.skip("KVM's XSAVE layout here has no PKRU component (9)")
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=tampered_observers(register, byte, seen)) as run:
            SCENARIOS["export"].run(run)
    old, new = seen[0]
    assert failure.value.lines == [
        f"KVM_GET_XSAVE2: outside {bank_name}: {label} {register} byte {byte}: want {old:#04x} got {new:#04x}"]


def test_export_names_a_changed_legacy_field(backend):
    """MXCSR (legacy bytes 24..27) is SSE state outside every bank's registers."""
    bank, code = runnable(backend, "ymm")
    seen = []

    def wrap(session):
        def observers():
            def observe(fn=session.observers()["KVM_GET_XSAVE2"]):
                image = fn().copy()
                seen.append(image.mxcsr)
                image.mxcsr ^= 0x0100  # byte 1 of MXCSR
                return image
            return {"KVM_GET_XSAVE2": observe}
        return Wrapped(session, observers=observers)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["export"].run(run)
    old = seen[0] >> 8 & 0xFF
    assert failure.value.lines == [
        f"KVM_GET_XSAVE2: outside ymm: sse mxcsr byte 1: want {old:#04x} got {old ^ 0x01:#04x}"]


@pytest.mark.parametrize("bank_name", ["ymm", "xmm", "x87"])
def test_export_passes_through_an_honest_wrapper(backend, bank_name):
    bank, code = runnable(backend, bank_name)
    with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s)) as run:
        SCENARIOS["export"].run(run)
