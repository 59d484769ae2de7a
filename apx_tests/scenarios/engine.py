"""The pieces every scenario is made of: a Run (backend + bank + payload), guest loading
and verification through the mailbox, and checks that turn images into failure lines.

A scenario fails by raising ScenarioFailure whose lines each name the bank, the register
and the bytes (e.g. `KVM_GET_XSAVE2: ymm ymm13 byte 5: want 0x8f got 0x90`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..backend import Backend, Session
from ..guests import protocol
from ..xsave import Bank, XsaveImage, diff_images, diff_registers, narrower_names
from ..xsave.layout import XSTATE_BV_OFFSET

# Patterns per stage: what the guest loads, what the host imports, garbage for init tests.
LOADED, IMPORTED, GARBAGE = 1, 2, 3


class ScenarioNotApplicable(Exception):
    """The scenario cannot check this bank here (e.g. the debugger reaches none of its own
    component's bytes): the case is a skip with this one-line reason, not a pass."""


class ScenarioFailure(AssertionError):
    """The scenario saw something wrong; one line per finding."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


@dataclass
class Run:
    """One scenario execution: owns every session it starts and closes them all."""

    backend: Backend
    bank: Bank
    payload: bytes
    # Self-tests only: corrupt an image after the expected values are fixed, before import.
    tamper: Callable[[XsaveImage], None] | None = None
    # Fault injection (apx_tests.faults): wraps every session this run starts.
    session_wrapper: Callable[[Session], Session] | None = None
    sessions: list[Session] = field(default_factory=list)
    # What the run noticed but did not judge (e.g. how much a partial observer covers).
    notes: list[str] = field(default_factory=list)
    # Reporting (apx_tests.report): called with the exception (None on success) while the
    # sessions are still open, so a failure's state can be saved before close().
    on_exit: Callable[["Run", BaseException | None], None] | None = None

    def start(self) -> Session:
        session = self.backend.start(self.bank, self.payload)
        if self.session_wrapper is not None:
            session = self.session_wrapper(session)
        self.sessions.append(session)
        return session

    def adopt(self, session: Session) -> Session:
        self.sessions.append(session)
        return session

    def pattern(self, stage: int) -> dict[str, bytes]:
        return self.bank.pattern(stage)

    def before_import(self, image: XsaveImage) -> XsaveImage:
        if self.tamper is not None:
            self.tamper(image)
        return image

    def close(self) -> None:
        while self.sessions:
            self.sessions.pop().close()
        # What a backend kept for this Run's sessions (the QEMU backend: standby QEMUs its
        # snapshots hold for a restore) goes with them.
        if self.backend is not None:
            self.backend.run_closed()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.on_exit is not None:
                self.on_exit(self, exc)
        finally:
            self.close()


def load_bank(run: Run, session: Session, values: dict[str, bytes]) -> None:
    """Give the guest its values and run it until they sit in the bank (stage LOADED)."""
    session.write_area(protocol.LOAD_AREA, run.bank.pack(values))
    session.run_to(protocol.STAGE_LOADED)


def guest_verify(run: Run, session: Session, expected: dict[str, bytes], *, what: str) -> None:
    """Let the guest store its bank and compare it with `expected`; fail naming registers."""
    bank = run.bank
    session.write_area(protocol.EXPECT_AREA, bank.pack(expected))
    session.run_to(protocol.STAGE_VERIFIED)
    mailbox = session.mailbox()
    stored = bank.unpack(session.read_area(protocol.STORE_AREA, bank.size))
    if mailbox.status == protocol.STATUS_OK:
        # The guest's own compare said ok: cross-check, a broken compare must not pass.
        diffs = diff_registers(expected, stored)
        if diffs:
            raise ScenarioFailure([f"{what}: guest reported ok but stored {d}" for d in diffs])
    elif mailbox.status == protocol.STATUS_MISMATCH:
        register, byte = bank.locate(mailbox.mismatch_offset)
        lines = [f"{what}: guest sees {d}" for d in diff_registers(expected, stored)]
        lines.insert(0, f"{what}: guest verify failed at {bank.name} {register} byte {byte}")
        raise ScenarioFailure(lines)
    else:
        raise ScenarioFailure(f"{what}: guest did not verify {bank.name} (status {mailbox.status})")
    status = session.finish()
    if status != protocol.STATUS_OK:
        raise ScenarioFailure(f"{what}: guest finished with status {status} after verifying ok")


def check_registers(image: XsaveImage, expected: dict[str, bytes], *, what: str) -> list[str]:
    return [f"{what}: {d}" for d in diff_registers(expected, image)]


def compare_images(want: XsaveImage, got: XsaveImage, bank: Bank, *, what: str) -> list[str]:
    """Every difference between two images: the bank's registers by their bank names first,
    then anything else by component, then the header."""
    lines = check_registers(got, {name: want.read(name) for name in bank.names}, what=what)
    lines += [f"{what}: outside {bank.name}: {d}" for d in diff_images(want, got, ignore=(bank,))]
    if not lines and want.to_bytes() != equivalent_bytes(want, got):
        lines.append(f"{what}: XSTATE_BV {want.xstate_bv:#x} -> {got.xstate_bv:#x}, "
                     f"XCOMP_BV {want.xcomp_bv:#x} -> {got.xcomp_bv:#x} or padding bytes differ")
    return lines


def equivalent_bytes(want: XsaveImage, got: XsaveImage) -> bytes:
    """`got`'s buffer, with `want`'s XSTATE_BV bit and raw bytes for every component whose
    value is the same in both: what is left to differ is XCOMP_BV, padding and components
    whose value really differs.

    A set XSTATE_BV bit over a component holding its init value is the same machine state
    as the bit clear (SDM vol. 1, 13.6: XINUSE[i] may be 1 while the state is in its init
    configuration), and CPUs differ in which they save: an AMD EPYC Zen 5 under KVM saves
    SSE's bit clear after a restore of all-zero XMM registers that a Zen 3 kept set.  The
    bytes under a clear bit are likewise not state (XSAVEOPT leaves them as they were)."""
    data = bytearray(got.to_bytes())
    same = 0
    for n in want.layout.components:
        at = got.component_offset(n)
        if at is None or want.component_offset(n) is None:
            continue  # a compacted image without the component: XCOMP_BV tells them apart
        if want.component_bytes(n) != got.component_bytes(n):
            continue
        raw = want.raw_component_bytes(n)
        data[at:at + len(raw)] = raw
        same |= 1 << n
    xstate_bv = (got.xstate_bv & ~same) | (want.xstate_bv & same)
    data[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8] = xstate_bv.to_bytes(8, "little")
    return bytes(data)


def check_view(view: dict[str, bytes], expected: dict[str, bytes], *, what: str
               ) -> tuple[list[str], dict[str, int]]:
    """Compare a partial view with expected values: each register under its own name, or
    the low bytes under a narrower one (gdb on QEMU 10 shows ymm3 only as xmm3).
    Returns (failure lines, register -> how many of its low bytes the view showed): what
    a view covers is counted in bytes (Bank.byte_coverage), never as whole registers."""
    lines, covered = [], {}
    for name, want in expected.items():
        for shown in [name, *narrower_names(name)]:
            if shown in view:
                got = view[shown]
                covered[name] = min(len(got), len(want))
                lines += [f"{what}: {d}" for d in diff_registers({shown: want[:len(got)]}, {shown: got})]
                break
    return lines, covered


def reaches_own_component(bank: Bank, widths: dict[str, int]) -> bool:
    reached, _ = bank.byte_coverage(widths)[bank.own_component]
    return reached > 0


def check_components_present(image: XsaveImage, bank: Bank, *, what: str) -> list[str]:
    """A bank holding non-zero values must have its XSTATE_BV bits set (the seed patch's
    'XSTATE_BV[APX] missing on export' bug)."""
    missing = bank.xstate_mask & ~image.xstate_bv
    if missing:
        return [f"{what}: XSTATE_BV {image.xstate_bv:#x} lacks {missing:#x} for {bank.name} "
                f"holding non-zero values"]
    return []


def check_untouched(image: XsaveImage, baseline: XsaveImage, bank: Bank, *, what: str) -> list[str]:
    """Everything outside the bank (and its documented side effects) equals the baseline."""
    ignore = (bank, *bank.side_effects)
    return [f"{what}: outside {bank.name}: {d}" for d in diff_images(baseline, image, ignore=ignore)]


# What the payload's store sequence reads from a bank whose component is in its init
# state.  Zeros, except x87: init empties the register stack, so each `fstpt` underflows
# (masked by the init FCW 0x037F) and stores the QNaN "real indefinite".
def init_readout(bank: Bank) -> dict[str, bytes]:
    if bank.name == "x87":
        indefinite = (0xFFFF << 64 | 0xC000000000000000).to_bytes(10, "little")
        return {name: indefinite for name in bank.names}
    return {reg.name: bytes(reg.width) for reg in bank.registers}
