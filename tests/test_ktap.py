"""A small KTAP version 1 parser and validator (after the kernel's
Documentation/dev-tools/ktap.rst; the checks of tools/testing/kunit/kunit_parser.py were
the model, none of its code is here), its own tests, and apx_tests.report.ktap.render
checked with it.  tests/test_report.py uses parse_ktap on real runs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from apx_tests.report import TestRecord
from apx_tests.report.ktap import render

VERSION = re.compile(r"^KTAP version 1$")
PLAN = re.compile(r"^1\.\.([0-9]+)$")
RESULT = re.compile(r"^(ok|not ok) ([0-9]+)(?: ([^#]*?))?[ ]*(?:# ?(.*))?$")
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")
INDENT = 2


class KtapError(ValueError):
    pass


@dataclass
class KtapTest:
    number: int
    ok: bool
    name: str
    directive: str | None = None       # SKIP, XFAIL, ERROR, ...
    data: str = ""                     # what follows the '#' (after the directive)
    diagnostics: list[str] = field(default_factory=list)  # '#' lines right before it
    subtests: "KtapBlock | None" = None


@dataclass
class KtapBlock:
    header: list[str]                  # '#' lines between the version and plan lines
    plan: int
    tests: list[KtapTest]

    @property
    def subtest_name(self) -> str | None:
        for line in self.header:
            if line.startswith("# Subtest: "):
                return line[len("# Subtest: "):]
        return None


class _Parser:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.pos = 0

    def fail(self, message: str) -> KtapError:
        line = self.lines[self.pos] if self.pos < len(self.lines) else "<end of file>"
        return KtapError(f"line {self.pos + 1}: {message}: {line!r}")

    def line(self, indent: int) -> str | None:
        """The current line without its indentation; KtapError if it is indented otherwise."""
        if self.pos >= len(self.lines):
            return None
        raw = self.lines[self.pos]
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise self.fail("tab in indentation")
        have = len(raw) - len(raw.lstrip(" "))
        if have != indent:
            return None
        return raw[indent:]

    def indent_of(self) -> int:
        raw = self.lines[self.pos]
        return len(raw) - len(raw.lstrip(" "))

    def block(self, indent: int) -> KtapBlock:
        text = self.line(indent)
        if text is None or not VERSION.match(text):
            raise self.fail(f"expected 'KTAP version 1' indented by {indent}")
        self.pos += 1
        header = []
        while (text := self.line(indent)) is not None and text.startswith("#"):
            header.append(text)
            self.pos += 1
        if text is None or not PLAN.match(text):
            raise self.fail(f"expected a plan line '1..N' indented by {indent}")
        plan = int(PLAN.match(text).group(1))
        self.pos += 1
        tests: list[KtapTest] = []
        diagnostics: list[str] = []
        subtests: KtapBlock | None = None
        while len(tests) < plan:
            if self.pos >= len(self.lines):
                raise self.fail(f"the plan says {plan} tests, the file ends after {len(tests)}")
            if self.indent_of() == indent + INDENT and subtests is None:
                subtests = self.block(indent + INDENT)
                continue
            text = self.line(indent)
            if text is None:
                raise self.fail(f"indented by {self.indent_of()}, expected {indent}")
            if text.startswith("#"):
                diagnostics.append(text)
                self.pos += 1
                continue
            m = RESULT.match(text)
            if m is None:
                raise self.fail("not a version, plan, result or diagnostic line")
            status, number, name, rest = m.group(1), int(m.group(2)), (m.group(3) or "").strip(), m.group(4)
            if number != len(tests) + 1:
                raise self.fail(f"test number {number}, expected {len(tests) + 1}")
            directive, data = None, rest or ""
            if rest:
                word = rest.split(" ", 1)[0]
                if word in DIRECTIVES:
                    directive, data = word, rest[len(word):].strip()
            test = KtapTest(number, status == "ok", name, directive, data, diagnostics, subtests)
            if subtests is not None:
                self.check_parent(test, subtests)
            tests.append(test)
            diagnostics, subtests = [], None
            self.pos += 1
        return KtapBlock(header, plan, tests)

    def check_parent(self, test: KtapTest, block: KtapBlock) -> None:
        if block.subtest_name is not None and block.subtest_name != test.name:
            raise self.fail(f"'# Subtest: {block.subtest_name}' closed by a result named {test.name!r}")
        failed = [t for t in block.tests if not t.ok and t.directive != "SKIP"]
        if failed and test.ok:
            raise self.fail(f"parent is ok but subtest {failed[0].name!r} is not")
        if not failed and not test.ok:
            raise self.fail("parent is not ok but none of its subtests failed")


def parse_ktap(text: str) -> KtapBlock:
    """Parse and validate a whole KTAP document; KtapError (naming the line) otherwise."""
    parser = _Parser(text)
    document = parser.block(0)
    while parser.pos < len(parser.lines):  # only diagnostics may follow the last result
        text = parser.line(0)
        if text is None or not text.startswith("#"):
            raise parser.fail("after the last test")
        parser.pos += 1
    return document


def leaves(block: KtapBlock, path: tuple[str, ...] = ()):
    """(path, test) of every test without subtests."""
    for test in block.tests:
        if test.subtests is None:
            yield (*path, test.name), test
        else:
            yield from leaves(test.subtests, (*path, test.name))


def outcome_counts(block: KtapBlock) -> dict[str, int]:
    """The leaves counted as pytest counts its outcomes."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "errors": 0}
    for _, test in leaves(block):
        if test.directive == "SKIP":
            out["skipped"] += 1
        elif test.directive == "XFAIL":
            out["xfailed"] += 1
        elif test.directive == "ERROR":
            out["errors"] += 1
        else:
            out["passed" if test.ok else "failed"] += 1
    return out


# --- the validator itself ---------------------------------------------------------------------

NESTED = """\
KTAP version 1
1..2
  KTAP version 1
  # Subtest: suite_a
  1..3
    KTAP version 1
    1..2
    ok 1 inner_1
    ok 2 inner_2 # SKIP not here
  ok 1 case_1
  # case_2: something went wrong
  not ok 2 case_2
  ok 3 case_3 # SKIP no hardware
# suite_a failed
not ok 1 suite_a
  KTAP version 1
  1..1
  ok 1 case_1
ok 2 suite_b
# totals
"""


def test_parser_accepts_nested_results():
    doc = parse_ktap(NESTED)
    assert doc.plan == 2 and [t.name for t in doc.tests] == ["suite_a", "suite_b"]
    suite_a = doc.tests[0]
    assert not suite_a.ok and suite_a.diagnostics == ["# suite_a failed"]
    assert suite_a.subtests.subtest_name == "suite_a"
    case_2 = suite_a.subtests.tests[1]
    assert (case_2.ok, case_2.diagnostics) == (False, ["# case_2: something went wrong"])
    assert suite_a.subtests.tests[2].directive == "SKIP" and suite_a.subtests.tests[2].data == "no hardware"
    assert [p for p, _ in leaves(doc)] == [("suite_a", "case_1", "inner_1"), ("suite_a", "case_1", "inner_2"),
                                           ("suite_a", "case_2"), ("suite_a", "case_3"), ("suite_b", "case_1")]
    assert outcome_counts(doc) == {"passed": 2, "failed": 1, "skipped": 2, "xfailed": 0, "errors": 0}


@pytest.mark.parametrize("broken, message", [
    (NESTED.replace("KTAP version 1\n1..2\n", "1..2\n", 1), "expected 'KTAP version 1'"),
    (NESTED.replace("  1..3\n", "", 1), "expected a plan line"),
    (NESTED.replace("  ok 3 case_3", "   ok 3 case_3"), "indented by 3"),
    (NESTED.replace("  ok 3 case_3", "  ok 4 case_3"), "test number 4, expected 3"),
    (NESTED.replace("1..2\n  KTAP", "1..3\n  KTAP", 1), "the plan says 3"),
    (NESTED.replace("not ok 1 suite_a", "ok 1 suite_a"), "parent is ok but subtest 'case_2'"),
    (NESTED.replace("not ok 1 suite_a", "not ok 1 suite_x"), "closed by a result named 'suite_x'"),
    (NESTED.replace("# totals", "stray text"), "after the last test"),
    (NESTED.replace("  ok 1 case_1\n  # case_2", "  ok 1 case_1\n  garbage\n  # case_2"), "not a version"),
])
def test_parser_rejects(broken, message):
    with pytest.raises(KtapError, match=re.escape(message)):
        parse_ktap(broken)


# --- apx_tests.report.ktap.render, checked with the validator ---------------------------------------

def _case(label, status="pass", reason="", lines=(), order=0, **props):
    record = TestRecord.for_test(f"suite/test_scenarios.py::test_scenario[{label}]", {"apx.case": label, **props},
                                 order)
    record.status, record.reason, record.lines = status, reason, list(lines)
    return record


def test_render_nests_cases_under_their_bank_and_others_under_their_module():
    records = [
        _case("kvm-ymm-import", "fail", "kvm-ymm-import: after import: guest verify failed at ymm ymm5 byte 3",
              ["kvm-ymm-import: after import: guest verify failed at ymm ymm5 byte 3",
               "after import: guest sees avx ymm5 byte 20: want 0x01 got 0xfe"], order=0,
              **{"apx.artifacts": "results/artifacts/kvm-ymm-import"}),
        _case("kvm-apx-import", "skip", "kvm-apx-import: CPU lacks APX_F", order=1),
        _case("qemu-tcg-ymm-export", order=2),
        _case("kvm-ymm-export", order=3),
        _case("kvm-apx-export", "skip", "kvm-apx-export: CPU lacks APX_F", order=4),
        TestRecord("suite/test_probe.py::test_apx_available", "test_apx_available", "test_probe",
                   status="skip", reason="apx: CPU lacks APX_F", order=5),
        TestRecord("suite/test_probe.py::test_odd[a#b]", "test_odd[a#b]", "test_probe", status="xfail",
                   reason="known", order=6),
        TestRecord("suite/test_probe.py::test_err", "test_err", "test_probe", status="error",
                   reason="setup failed: boom", lines=["setup: boom"], order=7),
    ]
    text = render(records, ["host: somewhere"])
    doc = parse_ktap(text)
    assert doc.header == ["# host: somewhere"]
    assert [(t.name, t.ok, t.directive) for t in doc.tests] == [
        ("apx", True, "SKIP"), ("ymm", False, None), ("test_probe", False, None)]
    ymm = doc.tests[1].subtests
    assert ymm.subtest_name == "ymm"
    assert [t.name for t in ymm.tests] == ["kvm-ymm-export", "kvm-ymm-import", "qemu-tcg-ymm-export"]
    failed = ymm.tests[1]
    assert not failed.ok and failed.diagnostics == [
        "# kvm-ymm-import: after import: guest verify failed at ymm ymm5 byte 3",
        "# after import: guest sees avx ymm5 byte 20: want 0x01 got 0xfe",
        "# artifacts: results/artifacts/kvm-ymm-import"]
    apx = doc.tests[0].subtests.tests
    assert [(t.name, t.directive, t.data) for t in apx] == [
        ("kvm-apx-export", "SKIP", "CPU lacks APX_F"), ("kvm-apx-import", "SKIP", "CPU lacks APX_F")]
    probe = doc.tests[2].subtests.tests
    assert [(t.name, t.ok, t.directive) for t in probe] == [
        ("test_apx_available", True, "SKIP"), ("test_odd[a_b]", True, "XFAIL"), ("test_err", False, "ERROR")]
    assert outcome_counts(doc) == {"passed": 2, "failed": 1, "skipped": 3, "xfailed": 1, "errors": 1}
    assert "  KTAP version 1\n  # Subtest: ymm\n  1..3\n" in text  # two spaces per level


def test_render_of_nothing_is_still_valid():
    doc = parse_ktap(render([]))
    assert doc.plan == 0 and doc.tests == []
