"""One test's outcome as the reports need it, independent of pytest's report objects.

A scenario case has a label (`kvm-ymm-import`, `qemu-tcg-linux-ymm-restore`,
`remote[root@lab1]-kvm-ymm-import`) from which the bank, backend and scenario follow;
any other test is labelled by its name and grouped under its module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..cases import BACKENDS
from ..probe import BANK_ORDER
from ..qemu.binaries import TAG_RE, parse_backend, version_tuple
from ..scenarios import SCENARIOS

# pytest outcomes as recorded here: pass, fail (the test body), error (setup/teardown),
# skip, xfail (expected failure), xpass (unexpected pass, not strict)
STATUSES = ("pass", "fail", "error", "skip", "xfail", "xpass")
_WORD = re.compile(r"[a-z0-9_]+$")
# A backend as case ids spell it: kvm, qemu-kvm, qemu-tcg, or a QEMU with its version tag
# when several run side by side (qemu11-kvm, qemu10.1-tcg).
_BACKEND = re.compile(rf"(kvm|qemu(?:{TAG_RE.pattern})?-(?:kvm|tcg))-")


def parse_case_label(text: str) -> tuple[str, str, str] | None:
    """`kvm-ymm-import` -> ("kvm", "ymm", "import"); `qemu11-kvm-ymm-export` ->
    ("qemu11-kvm", "ymm", "export"); `qemu-tcg-linux-ymm-restore` -> ("qemu-tcg", "ymm",
    "linux-restore"); a prefix such as `remote[host]-` is skipped.  None when the text
    names no backend and bank."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "-"]
    for start in starts:
        m = _BACKEND.match(text, start)
        if m is None:
            continue
        backend = m.group(1)
        tokens = text[m.end():].split("-")
        for i, token in enumerate(tokens):
            if token in BANK_ORDER:
                words = tokens[:i] + tokens[i + 1:]
                if words and all(_WORD.match(w) for w in words):
                    return backend, token, "-".join(words)
                break
    return None


def scenario_order(name: str) -> tuple[int, str]:
    """Sort key: the catalogue's order, then other scenarios (Linux cases) by name."""
    names = list(SCENARIOS)
    return (names.index(name), "") if name in names else (len(names), name)


def backend_order(name: str) -> tuple:
    """Sort key: kvm, qemu-kvm, qemu-tcg (the catalogue's order), each QEMU's by version
    (qemu10-kvm before qemu11-kvm), then anything else (kernel[...]-kvm) by name."""
    qemu = parse_backend(name)
    tag, base = qemu if qemu is not None else ("", name)
    if base not in BACKENDS:
        return (len(BACKENDS), (), name)
    digits = re.match(r"[\d.]*", tag).group(0).strip(".")
    return (BACKENDS.index(base), version_tuple(digits) if digits else (), tag)


def bank_order(name: str) -> int:
    return BANK_ORDER.index(name) if name in BANK_ORDER else len(BANK_ORDER)


def one_line(text: str, limit: int = 400) -> str:
    text = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class TestRecord:
    __test__ = False  # not a pytest test class, whatever its name

    nodeid: str
    label: str                      # the case label, or the test's name
    group: str                      # the bank for a case, else the module
    backend: str | None = None
    bank: str | None = None
    scenario: str | None = None
    status: str = "pass"
    reason: str = ""                # skip/xfail reason, or an error's first line
    lines: list[str] = field(default_factory=list)  # diagnostics of a failure
    properties: dict[str, str] = field(default_factory=dict)
    order: int = 0                  # arrival order (collection order without xdist)

    @property
    def is_case(self) -> bool:
        return self.bank is not None

    @property
    def artifacts(self) -> str | None:
        return self.properties.get("apx.artifacts")

    @property
    def skip_reason(self) -> str:
        """The reason without the `<label>: ` every case message starts with."""
        reason = self.reason
        # A guest's or remote host's case (kernel[R]-kvm-ymm-import) reports the message
        # the agent wrote, which starts with the bare case id.
        for prefix in (f"{self.label}: ", f"{self.label.rsplit(']-', 1)[-1]}: "):
            if reason.startswith(prefix):
                return reason[len(prefix):]
        return reason

    @classmethod
    def for_test(cls, nodeid: str, properties: dict[str, str], order: int = 0) -> "TestRecord":
        """A record for `nodeid`: a case when the property apx.case names one (the
        plugin sets it at setup), else a test of its module."""
        name = nodeid.split("::")[-1]
        label = properties.get("apx.case")
        parsed = parse_case_label(label) if label else None
        if parsed is None:
            module = nodeid.split("::")[0].rsplit("/", 1)[-1]
            module = module[:-3] if module.endswith(".py") else module
            return cls(nodeid, name, module, properties=dict(properties), order=order)
        backend, bank, scenario = parsed
        if label.startswith("kernel[") and "]-" in label:
            # A kernel under test (apx_tests.kut): its own row in the summary table, beside
            # this host's KVM, not merged into the same cells.
            backend = f"{label[:label.index(']-') + 1]}-{backend}"
        return cls(nodeid, label, bank, backend, bank, scenario, properties=dict(properties), order=order)

    def update(self, when: str, outcome: str, *, reason: str = "", lines=(), xfail: str | None = None) -> None:
        """Fold in one phase report (when: setup/call/teardown; outcome: passed/failed/
        skipped), the way pytest counts: a failing setup or teardown is an error.  For a
        failure, `reason` is its one-line cause (default: the first of `lines`)."""
        if when == "call":
            if xfail is not None:
                self.status, self.reason = ("xfail" if outcome == "skipped" else "xpass"), one_line(xfail)
            elif outcome == "passed":
                self.status = "pass"
            elif outcome == "failed":
                self.status, self.lines = "fail", list(lines)
                self.reason = one_line(reason or (self.lines[0] if self.lines else ""))
            else:
                self.status, self.reason = "skip", one_line(reason)
        elif outcome == "failed":
            if self.status != "fail":
                self.status = "error"
                self.lines = [f"{when}: {line}" if i == 0 else line for i, line in enumerate(lines)]
                first = reason or (list(lines)[0] if lines else "")
                self.reason = one_line(f"{when} failed: {first}")
        elif outcome == "skipped" and when == "setup":
            self.status, self.reason = "skip", one_line(reason)


def counts(records) -> dict[str, int]:
    """status -> how many, every status present (zeros included)."""
    out = {status: 0 for status in STATUSES}
    for record in records:
        out[record.status] += 1
    return out


def counts_text(records) -> str:
    words = {"pass": "passed", "fail": "failed", "error": "errors", "skip": "skipped",
             "xfail": "xfailed", "xpass": "xpassed"}
    n = counts(records)
    return ", ".join(f"{n[s]} {words[s]}" for s in STATUSES if n[s]) or "no tests"
