"""Fault injection: how much do the scenarios catch?

A fault is a deliberate VMM bug applied between a backend's Session and the scenario
engine, by a Session proxy (FaultySession) that has the same interface as the session it
wraps.  Nothing in the backends changes: the proxy edits what the VMM hands out (exports,
the migration file a restore reads, a debugger write) or what it is handed (imports), so
the same fault runs on KVM and on QEMU, and every scenario meets it exactly as it would
meet the real bug.

    from apx_tests.faults import FAULTS
    with Run(backend, bank, payload, session_wrapper=FAULTS["swap"].wrap) as run:
        SCENARIOS["export"].run(run)          # -> ScenarioFailure naming ymm2 and ymm13

    CaseRunner(session_wrapper=FAULTS["swap"].wrap)      # the case registry, same thing
    pytest -m apx --apx-inject swap                      # the plugin (apx_tests.pytest.faults)
    ci/fault-table                                       # every fault x scenario -> docs/faults.md

Each fault touches one bank (the run's) at a fixed, named place (``target()``: for ymm,
ymm9 byte 17, in the upper half), so a catching scenario's message can be checked for
naming the bank and the register (``Fault.named``).  ``run_matrix`` runs faults x
scenarios x banks x backends through the case registry (apx_tests.cases.CaseRunner) and
``summarize`` says which scenarios caught each fault; docs/faults.md has the table.

It stays one file (about 600 lines): the faults, the proxy that applies them and the matrix
that measures them are one vocabulary (a Cell's outcome is only meaningful next to its
Fault's target() and named()), and ci/fault-table, the plugin and the tests import it as one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .backend import BackendError, ImportRejected, Session
from .xsave import BANKS, Bank, Register, XsaveError, XsaveImage, narrower_names

NO_FAULT = "none"  # the control row of a matrix: no proxy at all


# --- register bytes, raw (no init rule, no XSTATE_BV change) -----------------------------

def _read_raw(image: XsaveImage, reg: Register) -> bytearray:
    return bytearray(b"".join(image.raw_component_bytes(s.component)[s.offset:s.offset + s.size]
                              for s in reg.slots))


def _write_raw(image: XsaveImage, reg: Register, value: bytes) -> None:
    pos = 0
    for s in reg.slots:
        data = bytearray(image.raw_component_bytes(s.component))
        data[s.offset:s.offset + s.size] = value[pos:pos + s.size]
        image.set_component_bytes(s.component, bytes(data), mark=False)
        pos += s.size


def _bank_spans(bank: Bank) -> dict[int, tuple[int, int]]:
    """Per component, the (start, stop) byte range the bank's registers cover in it."""
    spans: dict[int, tuple[int, int]] = {}
    for reg in bank.registers:
        for s in reg.slots:
            lo, hi = spans.get(s.component, (s.offset, s.offset + s.size))
            spans[s.component] = (min(lo, s.offset), max(hi, s.offset + s.size))
    return spans


def target(bank: Bank) -> tuple[Register, int]:
    """The register and byte a one-place fault hits: past the middle of the bank, past the
    middle of the register (ymm: ymm9 byte 17, the upper half; xmm9 byte 9; st5 byte 6)."""
    # min(): a bank of one register (pkru) has no "past the middle" register.
    reg = bank.registers[min(len(bank.registers) // 2 + 1, len(bank.registers) - 1)]
    return reg, reg.width // 2 + 1


def swap_pair(bank: Bank) -> tuple[Register, Register]:
    return bank.registers[2], bank.registers[-3]


def _named(line: str, bank: Bank) -> bool:
    """The line names the bank and one of its registers (``avx ymm9 byte 17`` names both:
    the register's name carries the bank's; ``x87 st5``; ``at ymm ymm9``)."""
    for name in bank.names:
        if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", line):
            if name.startswith(bank.name) or re.search(rf"(?<![\w-]){re.escape(bank.name)}(?![\w-])", line):
                return True
    return False


# --- the faults ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """One deliberate VMM bug.  Subclasses override the hooks they need; every hook gets
    the wrapped (real) session and does the real operation itself."""

    name: str
    summary: str                      # what the proxy does, one line
    models: str = ""                  # the real bug it stands for
    backends: tuple[str, ...] | None = None   # None: every backend
    requires: frozenset[str] = frozenset()    # Session features the fault needs
    # What a catching message must name: "register" (bank and register), or a regex for
    # the place ("where") when the fault has no register to name.
    names: str = "register"

    # ---- applicability --------------------------------------------------------------------
    def applies(self, backend: str, features: Iterable[str]) -> bool:
        return ((self.backends is None or backend in self.backends)
                and self.requires <= frozenset(features))

    def why_not(self, backend: str, features: Iterable[str]) -> str | None:
        if self.backends is not None and backend not in self.backends:
            return f"fault {self.name} applies to {', '.join(self.backends)} only"
        missing = self.requires - frozenset(features)
        if missing:
            return f"fault {self.name} needs session feature(s) {', '.join(sorted(missing))}"
        return None

    def named(self, line: str, bank: Bank) -> bool:
        """Does a failure line name what this fault broke?"""
        if self.names == "register":
            return _named(line, bank)
        return re.search(self.names, line) is not None

    def wrap(self, session: Session) -> "FaultySession":
        """The session wrapper for Run(session_wrapper=...) / CaseRunner(session_wrapper=...)."""
        return FaultySession(session, self)

    # ---- hooks (defaults: pass through) -----------------------------------------------------
    def exported(self, session: Session, image: XsaveImage) -> XsaveImage:
        return image

    def exported_raw(self, session: Session, data: bytes) -> bytes:
        return data

    def import_image(self, session: Session, image: XsaveImage) -> None:
        session.import_image(image)

    def import_raw(self, session: Session, data: bytes) -> None:
        session.import_raw(data)

    def before_restore(self, session: Session, snapshot) -> None:
        pass

    def debugger_write(self, session: Session, values: dict[str, bytes]) -> dict[str, bytes]:
        return session.debugger_write(values)


class _ImageFault(Fault):
    """A fault that edits a copy of every exported image (and raw export)."""

    def edit(self, image: XsaveImage, bank: Bank) -> None:
        raise NotImplementedError

    def exported(self, session, image):
        image = image.copy()
        self.edit(image, session.bank)
        return image

    def exported_raw(self, session, data):
        image = XsaveImage(session.layout, data, where="KVM_GET_XSAVE2 (raw)")
        self.edit(image, session.bank)
        return image.to_bytes()


class BitFlip(_ImageFault):
    def edit(self, image, bank):
        reg, byte = target(bank)
        value = _read_raw(image, reg)
        value[byte] ^= 0x04
        _write_raw(image, reg, value)


class ZeroAfterExport(_ImageFault):
    def edit(self, image, bank):
        for reg in bank.registers:
            _write_raw(image, reg, bytes(reg.width))


class DropXstateBv(_ImageFault):
    def edit(self, image, bank):
        image.xstate_bv &= ~(1 << max(bank.components))


class Swap(_ImageFault):
    def edit(self, image, bank):
        if len(bank.registers) < 2:
            # One register (pkru): the off-by-one lands inside it; its two halves swap.
            reg = bank.registers[0]
            value = _read_raw(image, reg)
            half = len(value) // 2
            _write_raw(image, reg, value[half:] + value[:half])
            return image
        a, b = swap_pair(bank)
        va, vb = _read_raw(image, a), _read_raw(image, b)
        _write_raw(image, a, vb)
        _write_raw(image, b, va)


class Shift8(_ImageFault):
    def edit(self, image, bank):
        for comp, (lo, hi) in _bank_spans(bank).items():
            data = bytearray(image.raw_component_bytes(comp))
            shift = min(8, (hi - lo) // 2)  # pkru's 4 bytes: by 2, keeping the span's size
            data[lo:hi] = bytes(shift) + data[lo:hi - shift]
            image.set_component_bytes(comp, bytes(data), mark=False)


class Truncate(Fault):
    """The export buffer ends inside the bank's state; the image parser must refuse it."""

    @staticmethod
    def cut(image: XsaveImage, bank: Bank) -> int:
        comp = max(bank.components)
        if comp >= 2:
            c = image.layout.components[comp]
            return c.offset + c.size // 2
        lo, hi = _bank_spans(bank)[comp]
        start = image.layout.components[comp].offset if comp in image.layout.components else 0
        return start + (lo + hi) // 2

    def exported(self, session, image):
        data = image.to_bytes()
        cut = self.cut(image, session.bank)
        where = f"{image.where} (cut to {cut} of {len(data)} bytes)"
        try:
            return XsaveImage(image.layout, data[:cut], where=where)
        except XsaveError as exc:
            raise BackendError(f"{session.backend} {session.bank.name}: export: {exc}") from None

    def exported_raw(self, session, data):
        return data[:self.cut(XsaveImage(session.layout, data), session.bank)]


class IgnoreImport(Fault):
    """The import leaves the bank as it was (its bytes and XSTATE_BV bits are taken from
    the current state); everything else is imported."""

    def import_image(self, session, image):
        current = session.export()
        image = image.copy()
        for reg in session.bank.registers:
            _write_raw(image, reg, bytes(_read_raw(current, reg)))
        mask = session.bank.xstate_mask
        image.xstate_bv = (image.xstate_bv & ~mask) | (current.xstate_bv & mask)
        session.import_image(image)

    def import_raw(self, session, data):
        current = session.export_raw()
        out = bytearray(data.ljust(len(current), b"\0"))
        layout = session.layout
        for reg in session.bank.registers:
            for s in reg.slots:
                at = layout.components[s.component].offset + s.offset
                out[at:at + s.size] = current[at:at + s.size]
        mask = session.bank.xstate_mask
        bv = int.from_bytes(out[512:520], "little")
        bv = (bv & ~mask) | (int.from_bytes(current[512:520], "little") & mask)
        out[512:520] = bv.to_bytes(8, "little")
        session.import_raw(bytes(out[:max(len(data), 576)]))


class SuppressEinval(Fault):
    """An import the VMM refuses 'succeeds': the refusal is swallowed (state unchanged)."""

    def import_image(self, session, image):
        try:
            session.import_image(image)
        except ImportRejected:
            pass

    def import_raw(self, session, data):
        try:
            session.import_raw(data)
        except ImportRejected:
            pass


class StreamFlip(Fault):
    """One byte of the bank's target register flipped (xor 0xff) in the migration file a
    fresh QEMU restores: a snapshot (fresh_vm) or the patched stream of an import."""

    def flip(self, session, path: str) -> None:
        from .qemu.migration.stream import MigrationStream, MigrationStreamError
        reg, byte = target(session.bank)
        try:
            stream = MigrationStream.open(path)
            accel = getattr(getattr(session, "owner", None), "accel", None)
            value = bytearray(stream.cpu_state(0, accelerator=accel).register(reg.name))
            value[byte] ^= 0xFF
            edits = stream.register_edits(reg.name, bytes(value), mark_xstate=False)
        except (MigrationStreamError, ValueError) as exc:
            raise BackendError(f"fault {self.name}: {exc}") from None
        with open(path, "r+b") as fh:
            for leaf, raw in edits.items():
                fh.seek(leaf.offset)
                fh.write(raw)

    def before_restore(self, session, snapshot):
        self.flip(session, snapshot.path)

    def import_image(self, session, image):
        move = session._move_to  # QemuSession: continue in a fresh QEMU restoring `path`

        def flipped(path, **kw):
            self.flip(session, path)
            return move(path, **kw)

        session._move_to = flipped
        try:
            session.import_image(image)
        finally:
            del session._move_to


class GdbDrop(Fault):
    """The debugger write of the target register is acknowledged but never reaches the
    vCPU: every other register is written."""

    def debugger_write(self, session, values):
        reg, _ = target(session.bank)
        written = session.debugger_write({n: v for n, v in values.items() if n != reg.name})
        if reg.name in values:
            # Report the dropped register as written, under the name and width the stub
            # used for its neighbours (QEMU 10 shows ymmN as xmmN).
            for shown, value in written.items():
                base = next((n for n in session.bank.names if shown in (n, *narrower_names(n))), None)
                names = [reg.name, *narrower_names(reg.name)]
                position = [base, *narrower_names(base)].index(shown) if base else len(names)
                if position < len(names):
                    written = {**written, names[position]: values[reg.name][:len(value)]}
                    break
        return written


FAULTS: dict[str, Fault] = {f.name: f for f in (
    BitFlip("bitflip", "one bit of one bank register flipped in every export",
            "a bad copy of one register"),
    ZeroAfterExport("zero_after_export", "the bank's register bytes zeroed after the copy, XSTATE_BV kept",
                    "the seed patch's ordering bug: fpu_copy_guest_fpstate_to_uabi() zeroing the APX "
                    "area after kvm_copy_vcpu_regs_to_uabi() wrote it"),
    DropXstateBv("drop_xstate_bv", "the bank's XSTATE_BV bit cleared on export",
                 "XSTATE_BV[APX] not set by the export"),
    IgnoreImport("ignore_import", "an import leaves the bank unchanged (bytes and XSTATE_BV bits)",
                 "the seed patch's import order reversed: XSTATE_BV[APX] cleared before "
                 "kvm_copy_uabi_to_vcpu_regs() looks at it"),
    Swap("swap", "two bank registers swapped on export", "an off-by-one register index"),
    Shift8("shift8", "the bank's bytes shifted by 8 within each component on export",
           "a wrong component offset"),
    Truncate("truncate", "the export buffer cut short inside the bank's component",
             "a buffer sized for the wrong XCR0", names=r"(KVM_GET_XSAVE2|migration stream).*buffer is \d+ bytes"),
    SuppressEinval("suppress_einval", "an invalid import 'succeeds' without changing state",
                   "a missing XSTATE_BV check against the supported XCR0",
                   requires=frozenset({"raw_xsave", "legacy_get_xsave"}),
                   names=r"XSTATE_BV bit \d+.*KVM_SET_XSAVE accepted it, want EINVAL"),
    StreamFlip("stream_flip", "one bank byte flipped in the migration file before a restore",
               "a corrupted or misread migration stream", backends=("qemu-kvm", "qemu-tcg")),
    GdbDrop("gdb_drop", "a debugger register write acknowledged but dropped",
            "a gdbstub write that never reaches the vCPU", requires=frozenset({"debugger_write"})),
)}


def get(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})") from None


# --- the proxy ------------------------------------------------------------------------------

class FaultySession:
    """A Session (virtual subclass) that forwards everything to `inner` except what the
    fault changes: export/observers/export_raw (edited copies), import_image/import_raw,
    restore (the fault's before_restore, and the new session wrapped too) and
    debugger_write.  Attributes and methods the fault does not touch (stage, features,
    views, gpr_views, mailbox, run_to, ...) are the inner session's own."""

    def __init__(self, inner: Session, fault: Fault):
        self.inner = inner
        self.fault = fault

    def __getattr__(self, name: str):
        if name == "inner":  # during unpickling / before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<FaultySession {self.fault.name} over {self.inner!r}>"

    # state out
    def export(self) -> XsaveImage:
        return self.fault.exported(self.inner, self.inner.export())

    def observers(self) -> dict[str, Callable[[], XsaveImage]]:
        return {name: (lambda observe=observe: self.fault.exported(self.inner, observe()))
                for name, observe in self.inner.observers().items()}

    def export_raw(self) -> bytes:
        return self.fault.exported_raw(self.inner, self.inner.export_raw())

    def export_legacy(self) -> bytes:
        """KVM_GET_XSAVE shares KVM_GET_XSAVE2's code in the kernel: the same fault."""
        return self.fault.exported_raw(self.inner, self.inner.export_legacy())

    # state in
    def import_image(self, image: XsaveImage) -> None:
        self.fault.import_image(self.inner, image)

    def import_raw(self, data: bytes) -> None:
        self.fault.import_raw(self.inner, data)

    def debugger_write(self, values: dict[str, bytes]) -> dict[str, bytes]:
        return self.fault.debugger_write(self.inner, values)

    # lifetime
    def snapshot(self):
        return self.inner.snapshot()

    def restore(self, snapshot) -> "FaultySession":
        self.fault.before_restore(self.inner, snapshot)
        return FaultySession(self.inner.restore(snapshot), self.fault)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "FaultySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Session.register(FaultySession)


# --- the matrix -----------------------------------------------------------------------------

@dataclass
class Cell:
    """One fault x backend x bank x scenario run."""
    fault: str
    backend: str
    bank: str
    scenario: str
    outcome: str                  # pass | fail | skip | n/a (fault does not apply)
    lines: list[str] = field(default_factory=list)  # without the case id prefix
    named: bool = False           # a fail whose first line names what the fault broke
    duration: float = 0.0

    @property
    def first_line(self) -> str:
        return self.lines[0] if self.lines else ""


def run_matrix(faults: Iterable[str], backends: Iterable[str], banks: Iterable[str],
               scenarios: Iterable[str] | None = None, *, runner=None, first_catch: bool = False,
               progress: Callable[[Cell], None] | None = None) -> list[Cell]:
    """Run every fault (NO_FAULT = the control) on every case of `backends` x `banks`
    (x `scenarios`, default all that apply).  `first_catch`: per fault, backend and bank
    stop at the first scenario whose message names the finding (for quick self-tests)."""
    from .cases import BACKEND_FEATURES, CaseRunner, cases

    wanted = None if scenarios is None else list(scenarios)
    banks = list(banks)
    own = runner is None
    runner = runner or CaseRunner()
    out: list[Cell] = []
    try:
        plan = [c for c in cases(tuple(backends)) if c.bank in banks
                and (wanted is None or c.scenario in wanted)]
        if wanted is not None:
            plan.sort(key=lambda c: (c.backend, c.bank, wanted.index(c.scenario)))
        for fault_name in faults:
            fault = None if fault_name == NO_FAULT else get(fault_name)
            runner.session_wrapper = None if fault is None else fault.wrap
            caught: set[tuple[str, str]] = set()
            for case in plan:
                features = BACKEND_FEATURES[case.backend]
                if fault is not None and not fault.applies(case.backend, features):
                    cell = Cell(fault_name, case.backend, case.bank, case.scenario, "n/a",
                                [fault.why_not(case.backend, features)])
                elif first_catch and fault is not None and (case.backend, case.bank) in caught:
                    continue
                else:
                    result = runner.run(case.id)
                    prefix = f"{case.id}: "
                    lines = [ln[len(prefix):] if ln.startswith(prefix) else ln for ln in result.lines]
                    cell = Cell(fault_name, case.backend, case.bank, case.scenario, result.outcome, lines,
                                duration=result.duration)
                    if result.outcome == "fail" and fault is not None:
                        cell.named = fault.named(cell.first_line, BANKS[case.bank])
                        if cell.named:
                            caught.add((case.backend, case.bank))
                out.append(cell)
                if progress is not None:
                    progress(cell)
    finally:
        runner.session_wrapper = None
        if own:
            runner.close()
    return out


@dataclass
class Row:
    """What one fault did on one backend (one bank)."""
    fault: str
    backend: str
    bank: str
    applicable: bool
    ran: int                                    # scenarios run (not skipped)
    exercised: int = 0                          # ... of those, ones using what the fault breaks
    catching: list[str] = field(default_factory=list)   # scenarios that failed
    naming: list[str] = field(default_factory=list)     # ... with a message naming the finding
    line: str = ""                              # first line of the first naming (else catching) scenario
    line_scenario: str = ""
    why_not: str = ""

    @property
    def ok(self) -> bool:
        """Control: nothing failed.  Fault: caught with a naming message (or did not apply,
        or nothing ran: the bank or backend is not available here)."""
        if self.fault == NO_FAULT:
            return not self.catching
        return not self.applicable or self.exercised == 0 or bool(self.naming)


def _exercises(scenario: str, fault: str) -> bool:
    """Does `scenario` use what `fault` breaks?  A fault that needs a Session feature (a
    debugger write) is exercised only by scenarios that need it too: when those all skip
    for a bank (debugger_import on ymm: the gdbstub reaches no ymm byte), nothing on that
    bank could catch the fault, and that is not a miss."""
    from .scenarios import SCENARIOS
    needs = FAULTS[fault].requires
    return not needs or bool(needs & SCENARIOS[scenario].requires)


def summarize(cells: list[Cell]) -> list[Row]:
    rows: dict[tuple[str, str, str], Row] = {}
    for c in cells:
        row = rows.get((c.fault, c.backend, c.bank))
        if row is None:
            row = rows[(c.fault, c.backend, c.bank)] = Row(c.fault, c.backend, c.bank, c.outcome != "n/a", 0)
        if c.outcome == "n/a":
            row.why_not = c.first_line
            continue
        row.applicable = True
        if c.outcome == "skip":
            continue
        row.ran += 1
        if c.fault == NO_FAULT or _exercises(c.scenario, c.fault):
            row.exercised += 1
        if c.outcome == "fail":
            row.catching.append(c.scenario)
            if c.named or c.fault == NO_FAULT:
                row.naming.append(c.scenario)
            if not row.line or (c.named and row.line_scenario not in row.naming):
                row.line, row.line_scenario = c.first_line, c.scenario
    return list(rows.values())


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render_table(rows: list[Row]) -> str:
    """The markdown table of docs/faults.md (a bank column only when rows span banks)."""
    banks = len({r.bank for r in rows}) > 1
    out = ["| fault | backend | catching scenarios | first failure line |",
           "|---|---|---|---|"]
    for r in rows:
        if not r.applicable:
            catching, line = "n/a", _cell_text(r.why_not)
        elif r.ran == 0:
            catching, line = "not run here", "(bank or backend unavailable)"
        elif r.exercised == 0 and r.fault != NO_FAULT:
            needs = ", ".join(sorted(FAULTS[r.fault].requires))
            catching, line = "not exercised here", f"(every scenario using {needs} skipped for this bank)"
        elif r.fault == NO_FAULT:
            catching = ", ".join(r.catching) or f"none ({r.ran} scenarios pass)"
            line = f"`{r.line_scenario}`: {_cell_text(r.line)}" if r.catching else "—"
        else:
            names = [f"**{s}**" if s in r.naming else s for s in r.catching]
            catching = ", ".join(names) or "NOTHING"
            line = f"`{r.line_scenario}`: {_cell_text(r.line)}" if r.line else "—"
        where = f"{r.backend} {r.bank}" if banks else r.backend
        out.append(f"| `{r.fault}` | {where} | {catching} | {line} |")
    return "\n".join(out) + "\n"


def problems(rows: list[Row]) -> list[str]:
    """One line per fault caught by nothing (with a naming message), and per control failure."""
    out = []
    for r in rows:
        if r.ok:
            continue
        if r.fault == NO_FAULT:
            out.append(f"no fault, {r.backend} {r.bank}: {', '.join(r.catching)} failed: {r.line}")
        elif r.catching:
            out.append(f"{r.fault} on {r.backend} {r.bank}: caught by {', '.join(r.catching)} but no message "
                       f"names the {'bank and register' if FAULTS[r.fault].names == 'register' else 'place'}: "
                       f"{r.line}")
        else:
            out.append(f"{r.fault} on {r.backend} {r.bank}: caught by no scenario ({r.ran} ran)")
    return out


def elapsed(cells: list[Cell]) -> float:
    return sum(c.duration for c in cells)


__all__ = ["FAULTS", "NO_FAULT", "Fault", "FaultySession", "Cell", "Row", "get", "target", "swap_pair",
           "run_matrix", "summarize", "render_table", "problems"]
