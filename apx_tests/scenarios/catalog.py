"""The scenarios: short step lists over a Session and a Bank, after the kernel's
x86/apx_test.c and state_test.c and the seed patch's ABI rules.

Each scenario is written once for every bank and backend.  Backend-specific ABI checks
declare the Session features they need; a backend without them does not get the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..backend import ImportRejected
from ..guests import protocol
from ..xsave import XsaveImage, narrower_names
from ..xsave.layout import APX, BNDREGS, LEGACY_FIELDS, PKRU, XTILECFG
from ..xsave.xcr0 import xcr0_without
from .engine import (GARBAGE, IMPORTED, LOADED, Run, ScenarioFailure, ScenarioNotApplicable,
                     check_components_present, check_registers, check_untouched, check_view, compare_images,
                     guest_verify, init_readout, load_bank, reaches_own_component)


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Run], None]
    summary: str
    requires: frozenset[str] = frozenset()
    banks: frozenset[str] | None = None  # None: every bank

    def applies_to(self, bank: str) -> bool:
        return self.banks is None or bank in self.banks


def _loaded_session(run: Run, *, restores: bool = False, baseline: bool = False):
    """Boot, load the bank: (session, the stage-0 image if `baseline`, else None).
    `restores`: the scenario goes on to import or restore (Session.expect_restore).
    Only `export` compares against a baseline; for the others it was a save and a parse
    (~30 ms under QEMU) that nothing looked at."""
    session = run.start()
    if restores:
        session.expect_restore()
    session.run_to(protocol.STAGE_STARTED)
    before = session.export() if baseline else None
    load_bank(run, session, run.pattern(LOADED))
    return session, before


def export(run: Run) -> None:
    """Guest loads -> the VMM's export holds the values at the CPUID offsets, the bank's
    XSTATE_BV bits set, everything else as before the load; the guest still has them."""
    session, baseline = _loaded_session(run, baseline=True)
    expected = run.pattern(LOADED)
    failures = []
    images = {}
    for name, observe in session.observers().items():
        image = images[name] = observe()
        failures += check_registers(image, expected, what=name)
        failures += check_components_present(image, run.bank, what=name)
        failures += check_untouched(image, baseline, run.bank, what=name)
    # Partial observers (gdbstub, monitor): against the expected values and against every
    # whole-image observer, for the registers they can see.
    for name, observe in session.views().items():
        view = observe()
        lines, covered = check_view(view, expected, what=name)
        coverage = run.bank.coverage_text(covered)
        if not reaches_own_component(run.bank, covered):
            # A view that shows none of the bank's own bytes checked nothing of this bank
            # (gdb's xmm0-15 for ymm, nothing at all for zmm16-31): say so, judge nothing.
            run.notes.append(f"{name}: not checked, reaches {coverage}; offers {_offered(view)}")
            continue
        failures += lines
        for other, image in images.items():
            failures += check_view(view, {n: image.read(n) for n in expected}, what=f"{name} vs {other}")[0]
        run.notes.append(f"{name}: reaches {coverage}")
    if "raw_xsave" in session.features:
        size = len(session.export_raw())
        if size != session.owner.host.xsave2_size:
            failures.append(f"KVM_GET_XSAVE2 returned {size} bytes, KVM_CAP_XSAVE2 says "
                            f"{session.owner.host.xsave2_size}")
    if failures:
        raise ScenarioFailure(failures)
    guest_verify(run, session, expected, what="after export")


def import_(run: Run) -> None:
    """Host writes new values into the exported image -> import -> the guest sees them."""
    session, _ = _loaded_session(run, restores=True)
    image = session.export()
    wanted = run.pattern(IMPORTED)
    image.write_registers(wanted)
    session.import_image(run.before_import(image))
    guest_verify(run, session, wanted, what="after import")


def round_trip(run: Run) -> None:
    """export -> import -> export gives the same bytes; the guest keeps its values."""
    session, _ = _loaded_session(run, restores=True)
    first = session.export()
    session.import_image(run.before_import(first.copy()))
    second = session.export()
    failures = compare_images(first, second, run.bank, what="round trip")
    if failures:
        raise ScenarioFailure(failures)
    guest_verify(run, session, run.pattern(LOADED), what="after round trip")


def fresh_vm(run: Run) -> None:
    """Snapshot at LOADED, restore into a new VM/vCPU; its export equals the snapshot's and
    the guest continues there and finds its values."""
    session, _ = _loaded_session(run, restores=True)
    before = session.export()
    snapshot = session.snapshot()
    session.close()
    restored = run.adopt(session.restore(snapshot))
    after = restored.export()
    failures = compare_images(before, after, run.bank, what="fresh VM export")
    failures += check_registers(after, run.pattern(LOADED), what="fresh VM export")
    if failures:
        raise ScenarioFailure(failures)
    guest_verify(run, restored, run.pattern(LOADED), what="in the fresh VM")


def init_state(run: Run) -> None:
    """Import with the bank's XSTATE_BV bits clear but garbage in its bytes: the component
    is in its init state and the guest must read init values, not the garbage."""
    why_not = run.backend.init_readout_unjudgeable(run.bank)
    if why_not:
        raise ScenarioNotApplicable(why_not)
    session, _ = _loaded_session(run, restores=True)
    image = session.export()
    image.write_registers(run.pattern(GARBAGE))
    if 0 in run.bank.components:
        # Tag every x87 register valid, else a VMM that ignored XSTATE_BV would still show
        # empty registers and the guest's fstpt would store "indefinite" either way.
        _set_legacy_byte(image, "ftw", 0xFF)
    image.xstate_bv &= ~run.bank.xstate_mask
    session.import_image(run.before_import(image))
    if run.backend.init_state_kept(run.bank):
        guest_verify(run, session, run.pattern(LOADED),
                     what=f"after init-state import ({run.backend.name} keeps {run.bank.name} "
                          f"when its XSTATE_BV bit is clear)")
        return
    guest_verify(run, session, init_readout(run.bank), what="after init-state import")


def xcr0_cycle(run: Run) -> None:
    """After the kernel's apx_test.c GUEST_APXOFF: with the bank loaded, XCR0 loses the
    bank's bit, the guest runs on, XCR0 gets it back; the values must have survived.

    Only for APX: its registers live in KVM's vCPU register cache, not in the XSAVE area,
    and the series promises they survive.  For the vector and x87 banks the SDM does not
    define what a component holds after its XCR0 bit was cleared and set again, so the
    stand-in banks do not get this case (tests/ still runs its mechanics on them).
    """
    session, _ = _loaded_session(run)
    xcr0 = session.get_xcr0()
    # Not `xcr0 & ~mask`: the bits that depend on the bank's go too (AVX-512 on AVX), or
    # KVM_SET_XCRS refuses the value on hosts where they are enabled.
    without = xcr0_without(xcr0, run.bank.xcr0_mask)
    session.set_xcr0(without)
    if session.get_xcr0() != without:
        raise ScenarioFailure(f"XCR0 {session.get_xcr0():#x} after setting {without:#x}")
    session.set_xcr0(xcr0)
    guest_verify(run, session, run.pattern(LOADED), what=f"after XCR0 {xcr0:#x} -> {without:#x} -> {xcr0:#x}")


def debugger_import(run: Run) -> None:
    """The debugger edit path: with the guest at LOADED, write pattern 2 through the
    debugger (QEMU's gdbstub) into every bank register it offers (under a narrower name
    it writes only the low bytes), resume, and the guest must see exactly those bytes
    changed and the rest still pattern 1."""
    session, _ = _loaded_session(run)
    loaded, wanted = run.pattern(LOADED), run.pattern(IMPORTED)
    written = session.debugger_write(wanted)
    widths = {}
    for name in run.bank.names:
        for shown in (name, *narrower_names(name)):
            if shown in written:
                widths[name] = min(len(written[shown]), len(wanted[name]))
                break
    coverage = run.bank.coverage_text(widths)
    if not reaches_own_component(run.bank, widths):
        # Writing only xmm0-15 for ymm (or nothing for zmm16-31, k0-7) would pass while the
        # bank's own state was never edited: not a verdict on this bank.
        offer = session.debugger_offer()
        raise ScenarioNotApplicable(f"the debugger's edit path reaches {coverage}: none of "
                                    f"{run.bank.name}'s own component; it offers {_offered(written)}"
                                    + (f" ({offer})" if offer else ""))
    expected = dict(loaded)
    for name, width in widths.items():
        expected[name] = wanted[name][:width] + loaded[name][width:]
    run.notes.append(f"debugger wrote {coverage}")
    guest_verify(run, session, expected, what="after debugger writes")


# Constant while the payload waits at a sync point (its spin loop changes only RIP and,
# identically each time round, RFLAGS), so every observer must agree on them.
STABLE_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp") + tuple(f"r{i}" for i in range(8, 32))


def gprs(run: Run) -> None:
    """Every GPR observer (KVM_GET_REGS; QEMU's migration stream, gdbstub, HMP) sees %rdi =
    the mailbox address the payload was given, and all of them agree on every GPR they
    share (r16..r31 too, where an observer knows APX); the guest then still verifies."""
    session, _ = _loaded_session(run)
    views = {name: observe() for name, observe in session.gpr_views().items()}
    failures = []
    for name, view in views.items():
        rdi = int.from_bytes(view.get("rdi", b""), "little") if "rdi" in view else None
        if rdi != session.mailbox_gpa:
            got = "missing" if rdi is None else f"{rdi:#x}"
            failures.append(f"{name}: rdi {got}, the payload's mailbox is {session.mailbox_gpa:#x}")
    first, *others = list(views) or [None]
    for other in others:
        for reg in STABLE_GPRS:
            if reg in views[first] and reg in views[other] and views[first][reg] != views[other][reg]:
                failures.append(f"{other} vs {first}: {reg}: {views[other][reg][::-1].hex()} vs "
                                f"{views[first][reg][::-1].hex()}")
    if failures:
        raise ScenarioFailure(failures)
    run.notes.append("GPR observers: " + ", ".join(f"{n} ({len(v)})" for n, v in views.items()))
    guest_verify(run, session, run.pattern(LOADED), what="after reading GPRs")


def _offered(view: dict[str, bytes]) -> str:
    """What a partial view or edit path showed, compactly: 'xmm0-15 (16 B each)'."""
    if not view:
        return "no register of this bank"
    groups: dict[str, list[int]] = {}
    for name, value in view.items():
        prefix = name.rstrip("0123456789")
        if prefix != name:
            groups.setdefault(f"{prefix}|{len(value)}", []).append(int(name[len(prefix):]))
        else:
            groups.setdefault(f"{name}|{len(value)}", [])
    parts = []
    for key, numbers in groups.items():
        prefix, width = key.split("|")
        span = f"{prefix}{min(numbers)}-{max(numbers)}" if len(numbers) > 1 else (
            f"{prefix}{numbers[0]}" if numbers else prefix)
        parts.append(f"{span} ({width} B each)" if len(numbers) > 1 else f"{span} ({width} B)")
    return ", ".join(parts)


def _set_legacy_byte(image: XsaveImage, field: str, value: int) -> None:
    offset, _ = LEGACY_FIELDS[field]
    data = bytearray(image.raw_component_bytes(0))
    data[offset] = value
    image.set_component_bytes(0, bytes(data), mark=True)


def _invalid_images(run: Run, session) -> list[tuple[str, bytes]]:
    """Buffers KVM_SET_XSAVE must refuse on this host, built from a valid export."""
    supported = session.owner.host.supported_xcr0
    good = session.export_raw()
    cases = []
    for bit in (APX, BNDREGS, PKRU, XTILECFG):
        if not supported >> bit & 1:
            cases.append((f"XSTATE_BV bit {bit} outside supported XCR0 {supported:#x}",
                          _with_xstate_bits(good, 1 << bit)))
    compacted = bytearray(good)
    compacted[520 + 7] |= 0x80  # XCOMP_BV bit 63
    cases.append(("XCOMP_BV bit 63 (compacted) in KVM_SET_XSAVE", bytes(compacted)))
    cases.append(("XSTATE_BV with APX and MPX together", _with_xstate_bits(good, (1 << APX) | (1 << BNDREGS))))
    return cases


def _with_xstate_bits(data: bytes, bits: int) -> bytes:
    out = bytearray(data)
    xstate_bv = int.from_bytes(out[512:520], "little") | bits
    out[512:520] = xstate_bv.to_bytes(8, "little")
    return bytes(out)


def negative(run: Run) -> None:
    """Invalid imports return EINVAL and change nothing: a later export equals the one
    before, the guest keeps its values; KVM_GET_XSAVE agrees with XSAVE2's first 4096 bytes."""
    session, _ = _loaded_session(run)
    before = session.export_raw()
    failures = []
    legacy = session.export_legacy()
    if legacy != before[:4096]:
        failures.append("KVM_GET_XSAVE differs from KVM_GET_XSAVE2's first 4096 bytes")
    for what, data in _invalid_images(run, session):
        try:
            session.import_raw(data)
        except ImportRejected as exc:
            if exc.errno != 22:
                failures.append(f"{what}: rejected with errno {exc.errno}, want EINVAL (22)")
        else:
            failures.append(f"{what}: KVM_SET_XSAVE accepted it, want EINVAL")
        after = session.export_raw()
        if after != before:
            failures += compare_images(XsaveImage(session.layout, before),
                                       XsaveImage(session.layout, after), run.bank,
                                       what=f"{what}: state changed by a refused import")
    if failures:
        raise ScenarioFailure(failures)
    guest_verify(run, session, run.pattern(LOADED), what="after refused imports")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("export", export, "guest loads; the export holds the values at CPUID offsets"),
    Scenario("import", import_, "host edits the image; import; the guest sees the edit"),
    Scenario("round_trip", round_trip, "export -> import -> export is identical"),
    Scenario("fresh_vm", fresh_vm, "restore into a fresh VM; the guest continues"),
    # Needs a VMM that loads XSTATE_BV's init rule into the vCPU (KVM_SET_XSAVE does);
    # QEMU TCG keeps its own register copies and ignores env.xstate_bv (docs/qemu.md).
    Scenario("init_state", init_state, "XSTATE_BV bit clear + garbage: the guest reads init values",
             frozenset({"xstate_bv_init"})),
    Scenario("xcr0_cycle", xcr0_cycle, "XCR0 drops the bank's bit and regains it; values survive",
             frozenset({"set_xcr0"}), frozenset({"apx"})),
    Scenario("gprs", gprs, "every GPR observer agrees; rdi is the payload's mailbox",
             frozenset({"gpr_views"})),
    Scenario("debugger_import", debugger_import, "registers written through the gdbstub reach the guest",
             frozenset({"debugger_write"})),
    Scenario("negative", negative, "invalid imports return EINVAL and lose nothing",
             frozenset({"raw_xsave", "legacy_get_xsave"})),
)}
