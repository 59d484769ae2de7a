"""KTAP version 1 output (the kernel's Documentation/dev-tools/ktap.rst).

    KTAP version 1
    # apx_tests 0.1.0: host: AuthenticAMD family 25 ...
    1..3
      KTAP version 1
      # Subtest: ymm
      1..19
      ok 1 kvm-ymm-export
      # kvm-ymm-import: after import: guest verify failed at ymm ymm5 byte 3
      # artifacts: results/artifacts/kvm-ymm-import
      not ok 2 kvm-ymm-import
      ok 3 qemu-tcg-ymm-init_state # SKIP QEMU TCG ...
    # ymm: 1 failed, 17 passed, 1 skipped
    not ok 1 ymm
    ...

One top-level test per bank (in the probe's bank order) holding its cases, named by
their ids; tests that are not scenario cases are grouped by module after the banks.
A bank fails when one of its cases fails and is skipped when all of them were.
Nesting is two spaces per level; every block has its version and plan lines; a
description never contains "#"; a failure's lines are diagnostics ("# ...") right
before its result line.
"""

from __future__ import annotations

from .records import TestRecord, backend_order, bank_order, counts_text, one_line, scenario_order

VERSION_LINE = "KTAP version 1"
INDENT = "  "
MAX_DIAGNOSTIC_LINES = 20


def description(text: str) -> str:
    """A result line's description: one line, no '#' (which would start the directive)."""
    return " ".join(str(text).replace("#", "_").split()) or "unnamed"


def groups(records: list[TestRecord]) -> list[tuple[str, list[TestRecord]]]:
    """Banks first (probe order; cases by backend, then scenario), then the other
    groups in the order their first test arrived."""
    by_group: dict[str, list[TestRecord]] = {}
    for record in sorted(records, key=lambda r: r.order):
        by_group.setdefault(record.group, []).append(record)
    banks = sorted((g for g, rs in by_group.items() if rs[0].is_case), key=bank_order)
    others = [g for g, rs in by_group.items() if not rs[0].is_case]
    out = []
    for name in banks:
        cases = sorted(by_group[name], key=lambda r: (backend_order(r.backend), scenario_order(r.scenario),
                                                      r.label, r.order))
        out.append((name, cases))
    out += [(name, by_group[name]) for name in others]
    return out


def result_line(number: int, record: TestRecord) -> str:
    name = description(record.label)
    status = record.status
    if status == "pass":
        return f"ok {number} {name}"
    if status == "skip":
        return f"ok {number} {name} # SKIP {one_line(record.skip_reason)}".rstrip()
    if status == "xfail":
        return f"ok {number} {name} # XFAIL {one_line(record.reason)}".rstrip()
    if status == "xpass":  # no KTAP directive for it: diagnostic data only
        return f"ok {number} {name} # unexpectedly passed (xfail: {one_line(record.reason)})"
    if status == "error":
        return f"not ok {number} {name} # ERROR {one_line(record.reason)}".rstrip()
    return f"not ok {number} {name}"


def diagnostics(record: TestRecord) -> list[str]:
    """The lines before a result line: a failure's message, the artifacts folder."""
    lines: list[str] = []
    if record.status in ("fail", "error"):
        body = [line.rstrip() for line in record.lines if line.strip()]
        if len(body) > MAX_DIAGNOSTIC_LINES:
            body = body[:MAX_DIAGNOSTIC_LINES] + [f"... {len(body) - MAX_DIAGNOSTIC_LINES} more lines"]
        lines += body
        if record.artifacts:
            lines.append(f"artifacts: {record.artifacts}")
    return [f"# {line}" for line in lines]


def group_result(number: int, name: str, records: list[TestRecord]) -> str:
    name = description(name)
    if any(r.status in ("fail", "error") for r in records):
        return f"not ok {number} {name}"
    if records and all(r.status == "skip" for r in records):
        return f"ok {number} {name} # SKIP all {len(records)} skipped"
    return f"ok {number} {name}"


def render(records: list[TestRecord], header: list[str] = ()) -> str:
    """The whole KTAP document for `records` (header: diagnostic lines after the version)."""
    parts = groups(records)
    out = [VERSION_LINE, *(f"# {one_line(line, 1000)}" for line in header), f"1..{len(parts)}"]
    for number, (name, members) in enumerate(parts, 1):
        out += [INDENT + VERSION_LINE, f"{INDENT}# Subtest: {description(name)}", f"{INDENT}1..{len(members)}"]
        for index, record in enumerate(members, 1):
            out += [INDENT + line for line in diagnostics(record)]
            out.append(INDENT + result_line(index, record))
        out.append(f"# {description(name)}: {counts_text(members)}")
        out.append(group_result(number, name, members))
    out.append(f"# totals: {counts_text(records)}")
    return "\n".join(out) + "\n"
