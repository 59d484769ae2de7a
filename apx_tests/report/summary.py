"""The end-of-run summary (bank x backend x scenario table) and the host's facts.

    apx: 59 passed, 1 failed, 73 skipped (133 scenario cases)
    bank       backend   ex im rt fv is xc gp di ne
    apx        kvm       S1 S1 S1 S1 S1 S1 S1 -  S1
               qemu-kvm  S2 S2 S2 S2 S2 -  S2 S2 -
    ymm        kvm       P  F  P  P  P  -  P  -  P
    ...
    ex export, im import, rt round_trip, ...
    P pass  F fail  E error  S<n> skipped (reason n below)  X xfail  - no such case
    S1 (7 cases: apx): CPU lacks APX_F ...
    F kvm-ymm-import: after import: guest verify failed at ymm ymm5 byte 3 (artifacts: ...)
"""

from __future__ import annotations

import re

from .records import (TestRecord, backend_order, bank_order, counts_text, one_line,
                      scenario_order)

LETTERS = {"pass": "P", "fail": "F", "error": "E", "skip": "S", "xfail": "X", "xpass": "P"}
# When several tests share a cell (a fleet running each case on every host), the worst wins.
SEVERITY = ("fail", "error", "xpass", "pass", "xfail", "skip")


def abbreviations(names: list[str]) -> dict[str, str]:
    """Short unique column keys: initials of the words, else the first two letters
    (export -> ex, round_trip -> rt, linux-restore -> lr)."""
    out: dict[str, str] = {}
    for name in names:
        words = [w for w in re.split(r"[-_]", name) if w]
        key = "".join(w[0] for w in words) if len(words) > 1 else name[:2]
        candidates = [key, name[:3], name[:4], *(f"{key}{i}" for i in range(2, 100))]
        out[name] = next(c for c in candidates if c not in out.values())
    return out


def case_table(records: list[TestRecord]) -> list[str]:
    """The table of the scenario cases among `records`, its legends, the skip reasons
    (each once) and the failures.  [] when no scenario case ran."""
    cases = [r for r in records if r.is_case]
    if not cases:
        return []
    scenarios = sorted({r.scenario for r in cases}, key=scenario_order)
    rows = sorted({(r.bank, r.backend) for r in cases}, key=lambda k: (bank_order(k[0]), backend_order(k[1])))
    cells: dict[tuple[str, str, str], list[TestRecord]] = {}
    for r in cases:
        cells.setdefault((r.bank, r.backend, r.scenario), []).append(r)

    reasons: dict[str, list[TestRecord]] = {}
    for key in sorted(cells, key=lambda k: (bank_order(k[0]), backend_order(k[1]), scenario_order(k[2]))):
        for r in cells[key]:
            if r.status == "skip":
                reasons.setdefault(r.skip_reason, []).append(r)
    number = {reason: i for i, reason in enumerate(reasons, 1)}

    def cell(bank: str, backend: str, scenario: str) -> str:
        members = cells.get((bank, backend, scenario))
        if not members:
            return "-"
        worst = min(members, key=lambda r: SEVERITY.index(r.status))
        letter = LETTERS[worst.status]
        return f"{letter}{number[worst.skip_reason]}" if worst.status == "skip" else letter

    keys = abbreviations(scenarios)
    table = [[bank if i == 0 or rows[i - 1][0] != bank else "", backend,
              *(cell(bank, backend, s) for s in scenarios)] for i, (bank, backend) in enumerate(rows)]
    header = ["bank", "backend", *(keys[s] for s in scenarios)]
    widths = [max(len(row[c]) for row in [header, *table]) for c in range(len(header))]

    def line(row: list[str]) -> str:
        return " ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip()

    out = [f"apx: {counts_text(cases)} ({len(cases)} scenario cases: bank x backend x scenario)",
           line(header), *(line(row) for row in table),
           ", ".join(f"{keys[s]} {s}" for s in scenarios),
           "P pass  F fail  E error  S<n> skipped (reason n below)  X xfail  - no such case"]
    for reason, members in reasons.items():
        banks = sorted({r.bank for r in members}, key=bank_order)
        what = f"{len(members)} case{'s' if len(members) != 1 else ''}: {', '.join(banks)}"
        out.append(f"S{number[reason]} ({what}): {one_line(reason)}")
    for r in sorted(cases, key=lambda r: r.order):
        if r.status in ("fail", "error"):
            where = f" (artifacts: {r.artifacts})" if r.artifacts else ""
            out.append(f"{LETTERS[r.status]} {r.label}: {one_line(_without_label(r.reason, r.label), 200)}{where}")
    return out


def _without_label(text: str, label: str) -> str:
    return text[len(label) + 2:] if text.startswith(f"{label}: ") else text


def other_tests_line(records: list[TestRecord]) -> str | None:
    others = [r for r in records if not r.is_case]
    if not others:
        return None
    modules = list(dict.fromkeys(r.group for r in others))
    return f"other tests ({', '.join(modules)}): {counts_text(others)}"


# --- the host -----------------------------------------------------------------------------

def _hex(value) -> str:
    return "unknown" if value is None else f"{value:#x}"


def host_line(probe) -> str:
    """One line: CPU (vendor/family/model/stepping, microcode), kernel, KVM, QEMU, gdb."""
    cpu = probe.cpu
    if cpu.vendor is None:
        parts = [f"CPU unknown ({cpu.error})"]
    else:
        name = f" ({cpu.model_name})" if cpu.model_name else ""
        parts = [f"{cpu.vendor} family {cpu.family} model {cpu.model} stepping {cpu.stepping}{name}, "
                 f"microcode {_hex(cpu.microcode)}, APX_F {'yes' if cpu.apx else 'no'}, XCR0 {_hex(cpu.xcr0)}"]
    parts.append(f"kernel {probe.kernel_release}")
    kvm = probe.kvm
    parts.append(f"KVM supported XCR0 {_hex(kvm.supported_xcr0)}, KVM_CAP_XSAVE2 {kvm.xsave2_size}"
                 if kvm.present else f"KVM unavailable ({kvm.error})")
    for qemu in getattr(probe, "qemus", None) or [probe.qemu]:
        accels = f" ({', '.join(qemu.accelerators)})" if qemu.accelerators else ""
        parts.append(f"QEMU {qemu.version}{accels}" if qemu.version else f"QEMU unavailable ({qemu.error})")
    parts.append(f"gdb {probe.gdb.version}" if probe.gdb.version else f"gdb unavailable ({probe.gdb.error})")
    return "host: " + "; ".join(parts)


ACCELERATOR = {"kvm": "kvm", "qemu-kvm": "kvm", "qemu-tcg": "tcg"}


def _qemu_properties(probe) -> dict[str, str]:
    """With several QEMUs: apx.<name> (apx.qemu10, apx.qemu11) = version and path, and the
    -cpu of its KVM guests and its APX verdicts; with one, its -cpu and APX under
    apx.qemu.*."""
    out: dict[str, str] = {}
    qemus = getattr(probe, "qemus", None) or []
    for q in qemus:
        key = f"apx.{q.name}" if len(qemus) > 1 else "apx.qemu"
        if len(qemus) > 1:
            out[key] = f"{q.version} {q.path}" if q.version else f"unavailable: {q.error}"
        if q.kvm_cpu:
            out[f"{key}.kvm_cpu"] = q.kvm_cpu
        for accel, why in (q.apx or {}).items():
            out[f"{key}.apx.{accel}"] = why
    return out


def host_properties(probe, backends) -> dict[str, str]:
    """JUnit test-suite properties beyond apx_tests.pytest.plugin._junit_properties: the CPU's
    identity field by field, microcode, gdb, the QEMU accelerators, the selected
    backends and the accelerators they use."""
    cpu = probe.cpu

    def text(value) -> str:
        return "unknown" if value is None else str(value)

    from .. import __version__
    return {
        "apx.version": __version__,
        "apx.host": host_line(probe)[len("host: "):],
        "apx.cpu.vendor": text(cpu.vendor),
        "apx.cpu.family": text(cpu.family),
        "apx.cpu.model": text(cpu.model),
        "apx.cpu.stepping": text(cpu.stepping),
        "apx.cpu.model_name": text(cpu.model_name),
        "apx.cpu.microcode": _hex(cpu.microcode),
        "apx.kvm.cap_xsave2": text(probe.kvm.xsave2_size),
        "apx.gdb": probe.gdb.version or f"unavailable: {probe.gdb.error}",
        "apx.qemu.accelerators": ",".join(probe.qemu.accelerators or []) or "none",
        "apx.backends": ",".join(backends),
        "apx.accel": ",".join(dict.fromkeys(ACCELERATOR.get(b, b) for b in backends)),
        "apx.llvm_mc": probe.llvm.version or f"unavailable: {probe.llvm.error}",
        **_qemu_properties(probe),
    }
