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
from apx_tests.kvm.backend import KvmBackend
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure
from apx_tests.xsave import BANKS, XsaveImage

LOADED = 1  # the stage whose pattern the guest loads (docs/scenarios.md)


@pytest.fixture(scope="module")
def backend(kvm_host):
    return KvmBackend(kvm_host)


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


# ---- export: every check's line, partial views, the raw size ----------------------------

def test_export_reports_every_observer_and_every_check(backend):
    """Two whole-image observers, each wrong in its own way: all their lines, in order."""
    bank, code = runnable(backend, "ymm")
    pattern = bank.pattern(LOADED)
    seen = {}

    def wrap(session):
        def observers():
            def first():
                image = session.export().copy()
                seen["ymm3"] = flip(image, "ymm3", 1)
                return image

            def second():
                image = session.export().copy()
                seen["st2"] = flip(image, "st2", 3)
                image.xstate_bv &= ~0x4  # AVX's bit: the upper halves read as init (zero)
                seen["bv"] = image.xstate_bv
                return image
            return {"KVM_GET_XSAVE2": first, "copy": second}
        return Wrapped(session, observers=observers)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["export"].run(run)
    a, b = seen["ymm3"]
    c, d = seen["st2"]
    assert failure.value.lines == (
        [f"KVM_GET_XSAVE2: sse ymm3 byte 1: want {a:#04x} got {b:#04x}"]
        + [f"copy: avx ymm{i} bytes 16..31: want 0x{pattern[f'ymm{i}'][16:].hex()} got 0x{'00' * 16} "
           "(hex, memory order)" for i in range(16)]
        + [f"copy: XSTATE_BV {seen['bv']:#x} lacks 0x4 for ymm holding non-zero values",
           f"copy: outside ymm: x87 st2 byte 3: want {c:#04x} got {d:#04x}"])


def test_export_checks_the_raw_size_against_kvm_cap_xsave2(backend):
    bank, code = runnable(backend, "xmm")
    size = backend.host.xsave2_size

    def wrap(session):
        return Wrapped(session, export_raw=lambda: session.export_raw()[:3000])

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["export"].run(run)
    assert failure.value.lines == [f"KVM_GET_XSAVE2 returned 3000 bytes, KVM_CAP_XSAVE2 says {size}"]


def test_export_then_the_guest_must_still_see_its_values(backend):
    """The observers see the truth, but the VMM changes the guest's ymm5 while observing."""
    bank, code = runnable(backend, "ymm")

    def wrap(session):
        def observers():
            def observe():
                image = session.export()
                changed = image.copy()
                flip(changed, "ymm5", 20)
                session.import_image(changed)
                return image
            return {"KVM_GET_XSAVE2": observe}
        return Wrapped(session, observers=observers)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["export"].run(run)
    assert failure.value.lines[0] == "after export: guest verify failed at ymm ymm5 byte 20"


def with_view(view_of):
    """A partial observer 'monitor' whose registers come from view_of(real export image)."""
    def wrap(session):
        return Wrapped(session, views=lambda: {"monitor": lambda: view_of(session.export())})
    return wrap


def test_export_judges_a_view_that_reaches_the_bank(backend):
    bank, code = runnable(backend, "ymm")
    with Run(backend, bank, code, session_wrapper=with_view(
            lambda image: {f"ymm{i}": image.read(f"ymm{i}") for i in range(16)})) as run:
        SCENARIOS["export"].run(run)
    assert run.notes == ["monitor: reaches 256/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"]


def test_export_does_not_judge_a_view_without_the_banks_own_component(backend):
    """xmm0-15 of a ymm bank: none of component 2; wrong values there are not a verdict."""
    bank, code = runnable(backend, "ymm")
    with Run(backend, bank, code, session_wrapper=with_view(
            lambda image: {f"xmm{i}": bytes(16) for i in range(16)})) as run:
        SCENARIOS["export"].run(run)
    assert run.notes == ["monitor: not checked, reaches 0/256 bytes of component 2 (avx), 256/256 bytes of "
                         "component 1 (sse); offers xmm0-15 (16 B each)"]


def test_export_names_a_wrong_byte_in_a_view(backend):
    bank, code = runnable(backend, "ymm")
    want = bank.pattern(LOADED)["ymm3"][20]

    def view(image):
        values = {f"ymm{i}": image.read(f"ymm{i}") for i in range(16)}
        wrong = bytearray(values["ymm3"])
        wrong[20] ^= 0x5A
        values["ymm3"] = bytes(wrong)
        return values

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=with_view(view)) as run:
            SCENARIOS["export"].run(run)
    assert failure.value.lines == [f"monitor: avx ymm3 byte 20: want {want:#04x} got {want ^ 0x5A:#04x}",
                                   f"monitor vs KVM_GET_XSAVE2: avx ymm3 byte 20: want {want:#04x} got {want ^ 0x5A:#04x}"]


# ---- debugger_import on KVM: a debugger made of export + write + import -----------------

def debugger(shown_as, drop=(), offer="stub: features test.xml"):
    """debugger_write: write each value under shown_as(name) (None: not offered), at that
    register's width, through export/import; registers in drop are acknowledged only."""
    from apx_tests.xsave import register as reg

    def wrap(session):
        def debugger_write(values):
            image = session.export()
            written = {}
            for name, value in values.items():
                shown = shown_as(name)
                if shown is None:
                    continue
                written[shown] = value[:reg(shown).width]
                if name not in drop:
                    image.write(shown, written[shown])
            session.import_image(image)
            return written
        return Wrapped(session, debugger_write=debugger_write, debugger_offer=lambda: offer)
    return wrap


def test_debugger_import_full_registers(backend):
    bank, code = runnable(backend, "ymm")
    with Run(backend, bank, code, session_wrapper=debugger(lambda n: n)) as run:
        SCENARIOS["debugger_import"].run(run)
    assert run.notes == ["debugger wrote 256/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"]


def test_debugger_import_low_halves_of_some_registers(backend):
    """ymm0-7 whole, ymm8-15 only as xmm8-15: the guest must see exactly those bytes changed."""
    bank, code = runnable(backend, "ymm")
    shown = lambda n: n if int(n[3:]) < 8 else "x" + n[1:]
    with Run(backend, bank, code, session_wrapper=debugger(shown)) as run:
        SCENARIOS["debugger_import"].run(run)
    assert run.notes == ["debugger wrote 128/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"]


def test_debugger_import_catches_a_dropped_write(backend):
    bank, code = runnable(backend, "ymm")
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=debugger(lambda n: n, drop=("ymm5",))) as run:
            SCENARIOS["debugger_import"].run(run)
    assert failure.value.lines[0] == "after debugger writes: guest verify failed at ymm ymm5 byte 0"


@pytest.mark.parametrize("offer,tail", [("stub: features test.xml", " (stub: features test.xml)"), ("", "")])
def test_debugger_import_that_reaches_only_another_banks_bytes_is_a_skip(backend, offer, tail):
    from apx_tests.scenarios import ScenarioNotApplicable
    bank, code = runnable(backend, "ymm")
    with pytest.raises(ScenarioNotApplicable) as skip:
        with Run(backend, bank, code, session_wrapper=debugger(lambda n: "x" + n[1:], offer=offer)) as run:
            SCENARIOS["debugger_import"].run(run)
    assert str(skip.value) == ("the debugger's edit path reaches 0/256 bytes of component 2 (avx), 256/256 bytes "
                               "of component 1 (sse): none of ymm's own component; it offers xmm0-15 (16 B each)"
                               + tail)


def test_offered_texts():
    from apx_tests.scenarios.catalog import _offered
    assert _offered({}) == "no register of this bank"
    assert _offered({"xmm0": bytes(16), "xmm1": bytes(16)}) == "xmm0-1 (16 B each)"
    assert _offered({"xmm3": bytes(16), "xmm1": bytes(16), "xmm2": bytes(16)}) == "xmm1-3 (16 B each)"
    assert _offered({"k5": bytes(8)}) == "k5 (8 B)"
    assert _offered({"pkru": bytes(4)}) == "pkru (4 B)"
    assert _offered({"xmm0": bytes(16), "xmm1": bytes(16), "ymm0": bytes(32)}) == "xmm0-1 (16 B each), ymm0 (32 B)"


# ---- negative: what a VMM that accepts, misreports or half-applies must show -------------

def negative_cases(supported: int) -> list[str]:
    """The refused imports, in order: XSTATE_BV bits 19 (APX), 3 (MPX), 9 (PKRU), 17 (AMX)
    where the host lacks them, XCOMP_BV bit 63, APX with MPX."""
    cases = [f"XSTATE_BV bit {b} outside supported XCR0 {supported:#x}" for b in (19, 3, 9, 17)
             if not supported >> b & 1]
    return cases + ["XCOMP_BV bit 63 (compacted) in KVM_SET_XSAVE", "XSTATE_BV with APX and MPX together"]


def test_negative_reports_a_vmm_that_accepts_every_invalid_image(backend):
    bank, code = runnable(backend, "xmm")
    supported = backend.host.supported_xcr0
    given = []
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s, import_raw=given.append)) as run:
            SCENARIOS["negative"].run(run)
    assert failure.value.lines == [f"{c}: KVM_SET_XSAVE accepted it, want EINVAL" for c in negative_cases(supported)]
    # the buffers: the real export with only the named header bits changed
    bits = [1 << b for b in (19, 3, 9, 17) if not supported >> b & 1]
    good = given[-1]  # APX + MPX: recover the export's own XSTATE_BV from it
    base = int.from_bytes(good[512:520], "little") & ~(1 << 19 | 1 << 3)
    assert all(len(data) == len(given[0]) for data in given)
    for data, bit in zip(given, bits):
        assert int.from_bytes(data[512:520], "little") == base | bit
        assert data[520:528] == bytes(8)
    assert given[len(bits)][527] & 0x80 and int.from_bytes(given[len(bits)][512:520], "little") == base
    assert int.from_bytes(given[-1][512:520], "little") == base | 1 << 19 | 1 << 3


def test_negative_reports_the_wrong_errno(backend):
    from apx_tests.backend import ImportRejected
    bank, code = runnable(backend, "xmm")

    def refuse(data):
        raise ImportRejected("kvm xmm: Operation not permitted", 1)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s, import_raw=refuse)) as run:
            SCENARIOS["negative"].run(run)
    assert failure.value.lines == [f"{c}: rejected with errno 1, want EINVAL (22)"
                                   for c in negative_cases(backend.host.supported_xcr0)]


def test_negative_compares_kvm_get_xsave_with_xsave2(backend):
    bank, code = runnable(backend, "xmm")
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s, export_legacy=lambda: bytes(4096))) as run:
            SCENARIOS["negative"].run(run)
    assert failure.value.lines == ["KVM_GET_XSAVE differs from KVM_GET_XSAVE2's first 4096 bytes"]


def test_negative_reports_state_changed_by_a_refused_import(backend):
    """The first refused import changes xmm3 byte 0 anyway (then says EINVAL)."""
    from apx_tests.backend import ImportRejected
    bank, code = runnable(backend, "xmm")
    changed = []

    def wrap(session):
        def import_raw(data):
            if not changed:
                image = session.export()
                changed.append(flip(image, "xmm3", 0))
                session.import_image(image)
            raise ImportRejected("kvm xmm: Invalid argument", 22)
        return Wrapped(session, import_raw=import_raw)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["negative"].run(run)
    old, new = changed[0]
    cases = negative_cases(backend.host.supported_xcr0)
    assert failure.value.lines == [f"{c}: state changed by a refused import: sse xmm3 byte 0: want {old:#04x} "
                                   f"got {new:#04x}" for c in cases]


# ---- gprs ---------------------------------------------------------------------------------

def test_gprs_reports_observers_that_disagree(backend):
    bank, code = runnable(backend, "xmm")
    seen = {}

    def wrap(session):
        def gpr_views():
            real = session.gpr_views()["KVM_GET_REGS"]

            def other():
                view = dict(real())
                seen["rax"] = view["rax"]
                view["rax"] = bytes(b ^ 0x11 for b in view["rax"])
                view["rip"] = bytes(8)  # moves while the guest spins: not compared
                return view
            return {"KVM_GET_REGS": real, "other": other}
        return Wrapped(session, gpr_views=gpr_views)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["gprs"].run(run)
    rax = seen["rax"]
    other = bytes(b ^ 0x11 for b in rax)
    assert failure.value.lines == [f"other vs KVM_GET_REGS: rax: {other[::-1].hex()} vs {rax[::-1].hex()}"]


def test_gprs_reports_a_missing_rdi_and_notes_every_observer(backend):
    bank, code = runnable(backend, "xmm")

    def wrap(session):
        def gpr_views():
            real = session.gpr_views()["KVM_GET_REGS"]
            return {"KVM_GET_REGS": real, "partial": lambda: {"rax": real()["rax"]}}
        return Wrapped(session, gpr_views=gpr_views)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["gprs"].run(run)
    assert failure.value.lines == ["partial: rdi missing, the payload's mailbox is 0x100000"]

    def wrap_ok(session):
        def gpr_views():
            real = session.gpr_views()["KVM_GET_REGS"]
            return {"KVM_GET_REGS": real, "copy": lambda: dict(real())}
        return Wrapped(session, gpr_views=gpr_views)

    with Run(backend, bank, code, session_wrapper=wrap_ok) as run:
        SCENARIOS["gprs"].run(run)
    assert run.notes == ["GPR observers: KVM_GET_REGS (18), copy (18)"]


# ---- labels of the guest-side failures ------------------------------------------------------

def test_import_failure_line(backend):
    bank, code = runnable(backend, "ymm")

    def tamper(image):
        flip(image, "ymm13", 21)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=tamper) as run:
            SCENARIOS["import"].run(run)
    assert failure.value.lines[0] == "after import: guest verify failed at ymm ymm13 byte 21"


@pytest.mark.parametrize("bank_name,ftw", [("x87", 0xFF), ("ymm", None)])
def test_init_state_imports_a_full_tag_word_for_x87_only(backend, bank_name, ftw):
    """docs/scenarios.md: for x87 also a full tag word (legacy byte 4 = 0xff); other banks'
    images keep the exported tag byte."""
    bank, code = runnable(backend, bank_name)
    imported, exported = [], []

    def wrap(session):
        def export():
            image = session.export()
            exported.append(image.raw_component_bytes(0)[4])
            return image

        def import_image(image):
            imported.append(image.raw_component_bytes(0)[4])
            session.import_image(image)
        return Wrapped(session, import_image=import_image, export=export)

    with Run(backend, bank, code, session_wrapper=wrap) as run:
        SCENARIOS["init_state"].run(run)
    assert imported == [exported[-1] if ftw is None else ftw]


def test_init_state_failure_line(backend):
    bank, code = runnable(backend, "ymm")

    def keep_bits(image):
        image.xstate_bv |= bank.xstate_mask

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=keep_bits) as run:
            SCENARIOS["init_state"].run(run)
    assert failure.value.lines[0] == "after init-state import: guest verify failed at ymm ymm0 byte 0"


def test_round_trip_guest_failure_line(backend):
    """An import that changes ymm7 while exports keep showing the first image."""
    bank, code = runnable(backend, "ymm")
    first = []

    def wrap(session):
        def export():
            return first[0].copy() if first else session.export()

        def import_image(image):
            first.append(image.copy())
            changed = image.copy()
            flip(changed, "ymm7", 2)
            session.import_image(changed)
        return Wrapped(session, export=export, import_image=import_image)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["round_trip"].run(run)
    assert failure.value.lines[0] == "after round trip: guest verify failed at ymm ymm7 byte 2"


def test_fresh_vm_reports_a_restore_that_changes_a_byte(backend):
    bank, code = runnable(backend, "ymm")
    want = bank.pattern(LOADED)["ymm3"][1]

    def wrap(session):
        def restore(snapshot):
            restored = session.restore(snapshot)
            image = restored.export()
            flip(image, "ymm3", 1)
            restored.import_image(image)
            return restored
        return Wrapped(session, restore=restore)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["fresh_vm"].run(run)
    line = f"sse ymm3 byte 1: want {want:#04x} got {want ^ 0x5A:#04x}"
    assert failure.value.lines == [f"fresh VM export: {line}", f"fresh VM export: {line}"]


def test_xcr0_cycle_reports_an_xcr0_that_does_not_change(backend):
    bank, code = runnable(backend, "ymm")
    seen = []

    def wrap(session):
        seen.append(session.get_xcr0())
        return Wrapped(session, set_xcr0=lambda value: None)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["xcr0_cycle"].run(run)
    xcr0 = seen[0]
    # Without AVX the AVX-512 bits (5-7) go too, where the host has them.
    assert failure.value.lines == [f"XCR0 {xcr0:#x} after setting {xcr0 & ~0xE4:#x}"]


def test_xcr0_cycle_guest_failure_line(backend):
    bank, code = runnable(backend, "ymm")
    seen = []

    def wrap(session):
        def set_xcr0(value):
            seen.append(value)
            session.set_xcr0(value)
            if len(seen) == 2:  # back up: now change ymm9 behind the guest's back
                image = session.export()
                flip(image, "ymm9", 0)
                session.import_image(image)
        return Wrapped(session, set_xcr0=set_xcr0)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["xcr0_cycle"].run(run)
    down, up = seen
    assert failure.value.lines[0].startswith(f"after XCR0 {up:#x} -> {down:#x} -> {up:#x}: guest verify failed at ymm ymm")


# ---- guest_verify's other verdicts ----------------------------------------------------------

def test_guest_that_says_ok_but_stored_something_else(backend):
    from apx_tests.guests import protocol
    bank, code = runnable(backend, "xmm")
    want = bank.pattern(LOADED)["xmm2"][3]

    def wrap(session):
        def read_area(offset, size):
            data = bytearray(session.read_area(offset, size))
            if offset == protocol.STORE_AREA:
                data[2 * 16 + 3] ^= 0x5A  # xmm2 byte 3 of the packed bank
            return bytes(data)
        return Wrapped(session, read_area=read_area)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["round_trip"].run(run)
    assert failure.value.lines == [f"after round trip: guest reported ok but stored sse xmm2 byte 3: "
                                   f"want {want:#04x} got {want ^ 0x5A:#04x}"]


def test_guest_with_an_unknown_status_or_a_bad_finish(backend):
    import dataclasses
    bank, code = runnable(backend, "xmm")

    def odd_status(session):
        return Wrapped(session, mailbox=lambda: dataclasses.replace(session.mailbox(), status=7))

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=odd_status) as run:
            SCENARIOS["import"].run(run)
    assert failure.value.lines == ["after import: guest did not verify xmm (status 7)"]

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: Wrapped(s, finish=lambda: 5)) as run:
            SCENARIOS["import"].run(run)
    assert failure.value.lines == ["after import: guest finished with status 5 after verifying ok"]


# ---- engine pieces --------------------------------------------------------------------------

def test_scenario_failure_lines_and_text():
    assert ScenarioFailure("one line").lines == ["one line"]
    assert str(ScenarioFailure(["a", "b"])) == "a\nb"


def test_compare_images_reports_a_header_only_difference():
    from apx_tests.scenarios.engine import check_components_present, compare_images
    from apx_tests.xsave import Layout
    zen3 = Layout.reference("amd-zen3")
    live_zero = XsaveImage.build(zen3, {2: bytes(256)}, xstate_bv=0x7)
    init = XsaveImage.build(zen3, {}, xstate_bv=0x3)
    # A set bit over a component holding its init value is the same state as the bit
    # clear (what a Zen 5 under KVM saves for all-zero XMM registers): no difference.
    assert compare_images(live_zero, init, BANKS["ymm"], what="w") == []
    assert compare_images(init, live_zero, BANKS["ymm"], what="w") == []
    zero_sse = XsaveImage.build(zen3, {1: bytes(256)}, xstate_bv=0x3)
    assert compare_images(zero_sse, XsaveImage.build(zen3, {}, xstate_bv=0x1), BANKS["x87"], what="w") == []
    # ... but XCOMP_BV and padding still count, and so does a bit over a non-init value.
    odd_header = live_zero.copy()
    odd_header.xcomp_bv = 0x7
    assert compare_images(live_zero, odd_header, BANKS["ymm"], what="w") == \
        ["w: XSTATE_BV 0x7 -> 0x7, XCOMP_BV 0x0 -> 0x7 or padding bytes differ"]
    padded = bytearray(init.to_bytes())
    padded[500] = 0x5A  # the legacy region's reserved bytes (416..511)
    assert compare_images(live_zero, XsaveImage(zen3, bytes(padded)), BANKS["ymm"], what="w") == \
        ["w: XSTATE_BV 0x7 -> 0x3, XCOMP_BV 0x0 -> 0x0 or padding bytes differ"]
    live_one = XsaveImage.build(zen3, {2: b"\x01" + bytes(255)}, xstate_bv=0x7)
    assert compare_images(live_one, init, BANKS["ymm"], what="w")[0].startswith("w: avx ymm0 byte 16: want 0x01 got 0x00")
    assert check_components_present(init, BANKS["ymm"], what="w") == \
        ["w: XSTATE_BV 0x3 lacks 0x4 for ymm holding non-zero values"]
    assert check_components_present(live_zero, BANKS["ymm"], what="w") == []


def test_equivalent_bytes_takes_want_only_where_the_value_is_the_same():
    """Worked by hand on Zen 3's standard layout: SSE at 160, AVX at 576 (256 bytes each),
    XSTATE_BV at 512."""
    from apx_tests.scenarios.engine import equivalent_bytes
    from apx_tests.xsave import Layout
    zen3 = Layout.reference("amd-zen3")
    live_zero = XsaveImage.build(zen3, {1: bytes(256), 2: bytes(256)}, xstate_bv=0x7)
    stale = bytearray(XsaveImage.build(zen3, {}, xstate_bv=0x1).to_bytes())
    stale[160:416] = b"\x11" * 256  # bytes under clear bits: not state (XSAVEOPT leaves them)
    stale[576:832] = b"\x22" * 256
    stale = XsaveImage(zen3, bytes(stale))
    # Both bits and both components taken from want: the same state.
    assert equivalent_bytes(live_zero, stale) == live_zero.to_bytes()
    # A value that differs keeps got's bit and bytes; the equal component still follows want.
    live_one = XsaveImage.build(zen3, {1: bytes(256), 2: b"\x01" + bytes(255)}, xstate_bv=0x7)
    mixed = equivalent_bytes(live_one, stale)
    assert mixed[512:520] == (0x3).to_bytes(8, "little")
    assert mixed[576:832] == b"\x22" * 256 and mixed[160:416] == bytes(256)
    assert mixed[:160] == live_one.to_bytes()[:160] and mixed[832:] == stale.to_bytes()[832:]
    # A compacted image without AVX (XCOMP_BV lacks bit 2): nothing to take, no error.
    compacted = XsaveImage.build(zen3, {1: bytes(256)}, compacted=True, xstate_bv=0x3, xcomp_bv=0x3)
    assert compacted.component_offset(2) is None
    assert equivalent_bytes(compacted, live_zero)[576:832] == bytes(256)
    assert equivalent_bytes(compacted, live_zero)[512:520] == (0x7).to_bytes(8, "little")
    # ... and the components after the missing one are still looked at (Zen 4): opmask (5,
    # init value under a set bit in want) after AVX (2, not in want's XCOMP_BV).
    zen4 = Layout.reference("amd-zen4")
    k_zero = XsaveImage.build(zen4, {1: bytes(256), 5: bytes(64)}, compacted=True, xstate_bv=0x23, xcomp_bv=0x23)
    assert k_zero.component_offset(2) is None
    assert equivalent_bytes(k_zero, XsaveImage.build(zen4, {}, xstate_bv=0x3))[512:520] == (0x23).to_bytes(8, "little")
    # A component whose value differs does not stop the ones after it: SSE differs, AVX
    # (all zero in want, stale under a clear bit in got) is still taken from want.
    sse_one = XsaveImage.build(zen3, {1: b"\x01" + bytes(255), 2: bytes(256)}, xstate_bv=0x7)
    taken = equivalent_bytes(sse_one, stale)
    assert taken[512:520] == (0x5).to_bytes(8, "little") and taken[576:832] == bytes(256)
    assert taken[160:416] == b"\x11" * 256
    # x87 (0) is judged like any other: a non-init FCW in want keeps got's clear bit 0.
    legacy = bytearray(XsaveImage.build(zen3, {}).legacy_bytes())
    legacy[0:2] = (0x027F).to_bytes(2, "little")
    x87_set = XsaveImage.build(zen3, {}, xstate_bv=0x1, legacy=bytes(legacy))
    assert equivalent_bytes(x87_set, XsaveImage.build(zen3, {}, xstate_bv=0x0))[512:520] == bytes(8)


def test_init_state_judges_a_backend_that_says_it_keeps_the_bank(backend):
    """init_state's other branch (a backend that keeps a bank whose XSTATE_BV bit is clear,
    e.g. PKRU on some hosts): the guest must then still see pattern 1.  Real KVM does not
    keep ymm, so a backend claiming it does fails, naming the claim and the register."""
    bank, code = runnable(backend, "ymm")

    class ClaimsToKeep:
        def __init__(self, inner):
            self._inner = inner

        def init_state_kept(self, bank):
            return True

        def __getattr__(self, name):
            return getattr(self._inner, name)

    with pytest.raises(ScenarioFailure) as failure:
        with Run(ClaimsToKeep(backend), bank, code) as run:
            SCENARIOS["init_state"].run(run)
    assert failure.value.lines[0].startswith(
        "after init-state import (kvm keeps ymm when its XSTATE_BV bit is clear): guest verify failed at ymm ymm")


def test_invalid_images_leave_out_what_the_host_supports(backend):
    """With PKRU in KVM's supported XCR0 (0x207, a Zen 3) the PKRU bit is no invalid image;
    APX, MPX's BNDREGS and XTILECFG are."""
    from types import SimpleNamespace
    from apx_tests.scenarios.catalog import _invalid_images
    bank, code = runnable(backend, "xmm")
    with Run(backend, bank, code) as run:
        session = run.start()
        zen3 = Wrapped(session, owner=SimpleNamespace(host=SimpleNamespace(supported_xcr0=0x207)))
        whats = [what for what, _ in _invalid_images(run, zen3)]
    assert whats == ["XSTATE_BV bit 19 outside supported XCR0 0x207", "XSTATE_BV bit 3 outside supported XCR0 0x207",
                     "XSTATE_BV bit 17 outside supported XCR0 0x207", "XCOMP_BV bit 63 (compacted) in KVM_SET_XSAVE",
                     "XSTATE_BV with APX and MPX together"]


def test_run_close_tells_the_backend_once_its_sessions_are_closed(backend):
    """Backend.run_closed (the QEMU backend ends standby QEMUs there) comes once, after
    every session of the Run was closed, whether the scenario passed or failed."""
    bank, code = runnable(backend, "xmm")
    seen = []

    class Recording:
        def __init__(self, inner):
            self._inner = inner

        def run_closed(self):
            seen.append(len(run.sessions))  # sessions left open when it is told

        def __getattr__(self, name):
            return getattr(self._inner, name)

    with Run(Recording(backend), bank, code) as run:
        SCENARIOS["round_trip"].run(run)
    assert seen == [0]
    with pytest.raises(ScenarioFailure):
        with Run(Recording(backend), bank, code, session_wrapper=lambda s: Wrapped(s, finish=lambda: 5)) as run:
            SCENARIOS["import"].run(run)
    assert seen == [0, 0]


def test_run_hands_the_exception_to_on_exit():
    seen = []
    with pytest.raises(ValueError):
        with Run(None, BANKS["xmm"], b"", on_exit=lambda run, exc: seen.append(exc)):
            raise ValueError("boom")
    assert isinstance(seen[0], ValueError) and str(seen[0]) == "boom"


# ---- every view judged, every observer's line kept (export) ---------------------------------

def with_views(**view_of):
    """Partial observers name -> view_of(real export image), in the order given."""
    def wrap(session):
        return Wrapped(session, views=lambda: {name: (lambda fn=fn: fn(session.export()))
                                               for name, fn in view_of.items()})
    return wrap


def test_export_judges_a_view_that_follows_one_it_could_not_judge(backend):
    """gdb (xmm0-15 only: not a verdict on ymm) comes first; the monitor after it reaches
    the bank and shows ymm3 byte 20 wrong: the monitor must still be judged."""
    bank, code = runnable(backend, "ymm")
    want = bank.pattern(LOADED)["ymm3"][20]

    def monitor(image):
        values = {f"ymm{i}": image.read(f"ymm{i}") for i in range(16)}
        wrong = bytearray(values["ymm3"])
        wrong[20] ^= 0x5A
        values["ymm3"] = bytes(wrong)
        return values

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=with_views(
                gdb=lambda image: {f"xmm{i}": image.read(f"xmm{i}") for i in range(16)}, monitor=monitor)) as run:
            SCENARIOS["export"].run(run)
    assert failure.value.lines == [f"monitor: avx ymm3 byte 20: want {want:#04x} got {want ^ 0x5A:#04x}",
                                   f"monitor vs KVM_GET_XSAVE2: avx ymm3 byte 20: want {want:#04x} got {want ^ 0x5A:#04x}"]
    assert run.notes == ["gdb: not checked, reaches 0/256 bytes of component 2 (avx), 256/256 bytes of "
                         "component 1 (sse); offers xmm0-15 (16 B each)",
                         "monitor: reaches 256/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"]


def test_export_keeps_an_observers_line_when_a_correct_view_follows(backend):
    """KVM_GET_XSAVE2 shows st2 byte 3 changed (outside ymm); the monitor view of ymm0-15
    is right: the observer's line must survive the view's (empty) verdict."""
    bank, code = runnable(backend, "ymm")
    seen: list[tuple[int, int]] = []
    views = with_views(monitor=lambda image: {f"ymm{i}": image.read(f"ymm{i}") for i in range(16)})
    observers = tampered_observers("st2", 3, seen)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=lambda s: views(observers(s))) as run:
            SCENARIOS["export"].run(run)
    old, new = seen[0]
    assert failure.value.lines == [f"KVM_GET_XSAVE2: outside ymm: x87 st2 byte 3: want {old:#04x} got {new:#04x}"]
    assert run.notes == ["monitor: reaches 256/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"]


def test_reaches_own_component_counts_one_byte():
    """One byte of the bank's own component is enough (ymm0's 17th byte is AVX's first)."""
    from apx_tests.scenarios.engine import reaches_own_component
    assert reaches_own_component(BANKS["ymm"], {"ymm0": 17}) is True
    assert reaches_own_component(BANKS["ymm"], {"ymm0": 16, "ymm15": 16}) is False
    assert reaches_own_component(BANKS["ymm"], {}) is False
    assert reaches_own_component(BANKS["xmm"], {"xmm15": 1}) is True
    assert reaches_own_component(BANKS["x87"], {"st7": 1}) is True
    assert reaches_own_component(BANKS["pkru"], {"pkru": 1}) is True


# ---- the final guest verify of gprs, negative and init_state (KVM keeps PKRU) names itself --

def wrong_expectation(offset: int):
    """The VMM writes the guest's expected values with one byte (at `offset` of the packed
    bank) flipped: the guest's own compare must then fail there."""
    from apx_tests.guests import protocol

    def wrap(session):
        def write_area(area, data):
            if area == protocol.EXPECT_AREA:
                data = bytearray(data)
                data[offset] ^= 0x5A
                data = bytes(data)
            session.write_area(area, data)
        return Wrapped(session, write_area=write_area)
    return wrap


@pytest.mark.parametrize("scenario,bank_name,offset,line", [
    ("gprs", "xmm", 5 * 16 + 3, "after reading GPRs: guest verify failed at xmm xmm5 byte 3"),
    ("negative", "xmm", 9 * 16 + 15, "after refused imports: guest verify failed at xmm xmm9 byte 15"),
    # KVM keeps PKRU when XSTATE_BV[9] is clear: init_state expects what the guest loaded.
    ("init_state", "pkru", 2, "after init-state import (kvm keeps pkru when its XSTATE_BV bit is clear): "
                              "guest verify failed at pkru pkru byte 2"),
])
def test_final_guest_verify_line(backend, scenario, bank_name, offset, line):
    bank, code = runnable(backend, bank_name)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, session_wrapper=wrong_expectation(offset)) as run:
            SCENARIOS[scenario].run(run)
    assert failure.value.lines == [line]


# ---- init_state: a backend that cannot judge the init readout makes it a skip -------------

class ClaimingBackend:
    """The real KVM backend, except that it says why it cannot judge an init readout and
    records every session start."""

    def __init__(self, inner, why):
        self._inner, self._why, self.started = inner, why, []

    def init_readout_unjudgeable(self, bank):
        return self._why

    def start(self, bank, payload):
        self.started.append(bank.name)
        return self._inner.start(bank, payload)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_init_state_skips_with_the_backends_reason_before_starting(backend):
    from apx_tests.scenarios import ScenarioNotApplicable
    bank, code = runnable(backend, "ymm")
    claiming = ClaimingBackend(backend, "this vCPU stores 0x0 for an empty stack (self-test)")
    with pytest.raises(ScenarioNotApplicable) as skip:
        with Run(claiming, bank, code) as run:
            SCENARIOS["init_state"].run(run)
    assert str(skip.value) == "this vCPU stores 0x0 for an empty stack (self-test)"
    assert claiming.started == []


# ---- negative: KVM_GET_XSAVE is the first 4096 bytes of a longer KVM_GET_XSAVE2 ------------

def test_negative_compares_kvm_get_xsave_with_the_first_4096_bytes_only(backend):
    """On an AMX host KVM_GET_XSAVE2 returns 11008 bytes and KVM_GET_XSAVE 4096: a VMM
    whose XSAVE2 buffer is longer (here: 6912 zero bytes appended, cut off again before
    KVM_SET_XSAVE) must pass, every invalid image still refused with EINVAL."""
    from apx_tests.backend import ImportRejected
    bank, code = runnable(backend, "xmm")
    size = backend.host.xsave2_size
    refused = []

    def wrap(session):
        def import_raw(data):
            assert len(data) == size + 6912
            try:
                session.import_raw(data[:size])
            except ImportRejected as exc:
                refused.append(exc.errno)
                raise
        return Wrapped(session, export_raw=lambda: session.export_raw() + bytes(6912), import_raw=import_raw)

    with Run(backend, bank, code, session_wrapper=wrap) as run:
        SCENARIOS["negative"].run(run)
    assert refused == [22] * len(negative_cases(backend.host.supported_xcr0))


def test_negative_compacted_case_changes_only_xcomp_bv_bit_63(backend):
    """The XCOMP_BV case is the export with byte 527 (XCOMP_BV bits 56..63) = 0x80 and
    nothing else changed (a standard-format export has XCOMP_BV 0)."""
    bank, code = runnable(backend, "xmm")
    exported, given = [], []

    def wrap(session):
        def export_raw():
            exported.append(session.export_raw())
            return exported[-1]
        return Wrapped(session, export_raw=export_raw, import_raw=given.append)

    with pytest.raises(ScenarioFailure):
        with Run(backend, bank, code, session_wrapper=wrap) as run:
            SCENARIOS["negative"].run(run)
    good = exported[0]
    assert good[520:528] == bytes(8)
    compacted = given[len(negative_cases(backend.host.supported_xcr0)) - 2]
    assert compacted == good[:527] + b"\x80" + good[528:]
