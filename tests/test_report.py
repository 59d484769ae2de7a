"""Reports for CI (apx_tests.report, apx_tests.pytest.reporting): JUnit properties, KTAP, the
artifacts of failing cases, the terminal summary, progress lines.

The end-to-end tests run small pytest sessions (pytester, in-process) with ONE injected
failure: a conftest implements `pytest_apx_prepare_run` and sets `run.tamper`, which
flips one byte of one register in the image the import scenario hands to the VMM."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apx_tests.guests import protocol
from apx_tests.probe import probe
from apx_tests.report import TestRecord, parse_case_label
from apx_tests.report.artifacts import RecordingSession, RunRecorder, finalize, safe_name
from apx_tests.report.summary import abbreviations, case_table, host_line, host_properties
from apx_tests.scenarios.engine import Run
from apx_tests.xsave import BANKS, Layout, XsaveImage
from test_ktap import leaves, outcome_counts, parse_ktap

SUITE = """
import pytest
pytestmark = pytest.mark.apx

def test_scenario(apx_case):
    apx_case.execute()
"""

TAMPER = """
TARGETS = {targets!r}  # case id -> (register, byte) flipped in the image handed to import

def pytest_apx_prepare_run(item, case, run):
    if case.id in TARGETS:
        register, byte = TARGETS[case.id]

        def tamper(image):
            value = bytearray(image.read(register))
            value[byte] ^= 0xFF
            image.write(register, bytes(value))
        run.tamper = tamper
"""

# A byte in the part of the register that only the bank's own component holds, so the
# decoded diff names it as the bank's register (ymm13 byte 21 is in the AVX component).
FLIP = {"ymm": ("ymm13", 21), "xmm": ("xmm13", 5)}


@pytest.fixture(autouse=True)
def _quiet_rewrite_warning(pytester):
    pytester.makeini("[pytest]\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n")


def _runnable_bank(backend) -> str:
    for bank in FLIP:
        if backend.unavailable_reason(BANKS[bank]) is None:
            return bank
    pytest.skip(f"{backend.name} runs neither ymm nor xmm here")


@pytest.fixture(scope="module")
def kvm_bank():
    from apx_tests.kvm.backend import KvmBackend, KvmHost
    try:
        host = KvmHost()
    except OSError as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    try:
        yield _runnable_bank(KvmBackend(host))
    finally:
        host.close()


@pytest.fixture(scope="module")
def tcg_bank():
    from apx_tests.qemu.backend import QemuBackend
    try:
        backend = QemuBackend("tcg")
    except OSError as exc:
        pytest.skip(f"QEMU unavailable: {exc}")
    try:
        yield _runnable_bank(backend)
    finally:
        backend.host.close()


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo."""
    fields = {}
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def _gdb_version() -> str:
    """What apx.gdb must say, from gdb itself: the version at the end of `gdb --version`'s
    first line ("GNU gdb (Debian 13.1-3) 13.1" -> "13.1"), or "unavailable: ..." naming
    gdb as missing when there is none on PATH."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "unavailable: gdb: not found in PATH"
    first = subprocess.run([gdb, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[0]
    match = re.match(r"\d+(?:\.\d+)+", first.split()[-1])
    assert match, f"gdb --version: {first!r}"
    return match.group(0)


def _junit(path: Path):
    suite = ET.parse(path).getroot().find("testsuite")
    found = suite.find("properties")
    props = [(p.get("name"), p.get("value")) for p in (found if found is not None else [])]
    cases = {}
    for case in suite.findall("testcase"):
        found = case.find("properties")
        cases[case.get("name")] = (case, dict((p.get("name"), p.get("value")) for p in found)
                                   if found is not None else {})
    return props, cases


# --- the one injected failure, end to end (KVM) -------------------------------------------------

def test_one_injected_failure_gives_junit_ktap_and_artifacts(pytester, kvm_bank):
    bank = kvm_bank
    register, byte = FLIP[bank]
    failing = f"kvm-{bank}-import"
    pytester.makepyfile(test_cases=SUITE)
    pytester.makeconftest(TAMPER.format(targets={failing: (register, byte)}))
    result = pytester.runpytest_inprocess(
        "-m", "apx", "--apx-backend", "kvm", "-k", f"kvm-{bank}- or kvm-apx-",
        "--junitxml", "out/junit.xml", "--apx-ktap", "out/apx.ktap", "--apx-artifacts", "out/artifacts")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and outcomes.get("passed", 0) >= 4, result.stdout.str()
    out = pytester.path / "out"

    # JUnit: the host, although no test asked for apx_probe; per-case properties
    props, cases = _junit(out / "junit.xml")
    names = [name for name, _ in props]
    assert len(names) == len(set(names)), "a test-suite property recorded twice"
    host = dict(props)
    p = probe()
    for name in ("apx.cpu", "apx.cpu.vendor", "apx.cpu.family", "apx.cpu.model", "apx.cpu.stepping",
                 "apx.cpu.microcode", "apx.kernel", "apx.kvm.supported_xcr0", "apx.kvm.cap_xsave2",
                 "apx.qemu", "apx.gdb", "apx.accel", "apx.backends", "apx.host"):
        assert host.get(name), name
    cpuinfo = _cpuinfo()  # the kernel's view, not the probe's CPUID decoding
    assert host["apx.cpu.vendor"] == cpuinfo["vendor_id"] and host["apx.cpu.family"] == cpuinfo["cpu family"]
    assert host["apx.cpu.model"] == cpuinfo["model"]
    assert host["apx.cpu.microcode"] == (f"{int(cpuinfo['microcode'], 16):#x}" if "microcode" in cpuinfo else "unknown")
    assert host["apx.kernel"] == os.uname().release
    assert host["apx.kvm.supported_xcr0"] == f"{p.kvm.supported_xcr0:#x}"
    assert host["apx.kvm.cap_xsave2"] == str(p.kvm.xsave2_size)
    assert host["apx.accel"] == "kvm" and host["apx.backends"] == "kvm"
    assert host["apx.gdb"] == _gdb_version(), host["apx.gdb"]
    assert len(cases) == sum(outcomes.get(k, 0) for k in ("passed", "failed", "skipped"))
    for name, (case, cprops) in cases.items():
        label = name[name.index("[") + 1:-1]
        backend, bank_, scenario = parse_case_label(label)
        assert (cprops["apx.case"], cprops["apx.backend"], cprops["apx.bank"], cprops["apx.scenario"]) == \
            (label, "kvm", bank_, scenario)
        ran = case.find("skipped") is None
        observers = cprops["apx.observers"].split(",")
        main = "KVM_GET_REGS" if scenario == "gprs" else "KVM_GET_XSAVE2"  # gprs reads no XSAVE image
        assert (main in observers) if ran else observers == ["none"], (name, cprops)
    case, cprops = cases[f"test_scenario[{failing}]"]
    assert case.find("failure") is not None
    assert cprops["apx.artifacts"] == f"out/artifacts/{failing}"

    # KTAP: valid, the same counts as pytest, the failure's lines before its result line
    doc = parse_ktap((out / "apx.ktap").read_text())
    counts = outcome_counts(doc)
    assert {k: v for k, v in counts.items() if v} == \
        {k: v for k, v in outcomes.items() if k in counts and v}
    groups = {t.name: t for t in doc.tests}
    assert list(groups) == ["apx", bank]
    assert not groups[bank].ok and groups[bank].subtests.subtest_name == bank
    if groups["apx"].directive is not None:  # no APX here: every apx case skipped with its reason
        assert groups["apx"].directive == "SKIP"
        assert all(t.directive == "SKIP" and t.data for t in groups["apx"].subtests.tests)
    bad = [(path, t) for path, t in leaves(doc) if not t.ok]
    assert [path for path, _ in bad] == [(bank, failing)]
    diagnostics = bad[0][1].diagnostics
    assert diagnostics[0].startswith(f"# {failing}: after import: guest verify failed at {bank} {register}")
    assert diagnostics[-1] == f"# artifacts: out/artifacts/{failing}"

    # artifacts: one folder, for the one failure; decode.txt names the register
    assert sorted(os.listdir(out / "artifacts")) == [failing]
    folder = out / "artifacts" / failing
    files = set(os.listdir(folder))
    assert {"mailbox.bin", "exported.bin", "expected.bin", "imported.bin", "intended.bin", "decode.txt",
            "decode-imported.txt", "report.txt"} <= files
    assert (folder / "mailbox.bin").stat().st_size == protocol.MAILBOX_SIZE
    assert (folder / "exported.bin").stat().st_size == p.kvm.xsave2_size  # raw KVM_GET_XSAVE2
    decode = (folder / "decode.txt").read_text()
    assert f"1 difference(s) from expected.bin" in decode
    assert f"{register} byte {byte}: want" in decode
    command, _, output = decode.partition("\n")
    assert command.startswith("$ apx-tests decode exported.bin ") and "--expect expected.bin" in command
    again = subprocess.run([sys.executable, "-m", "apx_tests.cli", *shlex.split(command)[2:]], cwd=folder,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and output.startswith(again.stdout)  # the saved text is the command's
    assert f"{register} byte {byte}: want" in (folder / "decode-imported.txt").read_text()
    report = (folder / "report.txt").read_text()
    assert f"case: {failing} (backend kvm, bank {bank}, scenario import)" in report
    assert "observers: KVM_GET_XSAVE2" in report and f"guest verify failed at {bank} {register}" in report

    # the summary: the table with the F, the host line
    text = result.stdout.str()
    assert "apx summary" in text and host_line(p) in text
    row = next(line for line in result.outlines if line.startswith(f"{bank} ") and " kvm " in line)
    assert row.split()[2:4] == ["P", "F"]  # export, import
    assert any(line.startswith(f"F {failing}: after import: guest verify failed") and
               line.endswith(f"(artifacts: out/artifacts/{failing})") for line in result.outlines)


def test_passing_run_leaves_no_artifacts(pytester, kvm_bank):
    pytester.makepyfile(test_cases=SUITE)
    result = pytester.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", f"kvm-{kvm_bank}-import",
                                          "--apx-artifacts", "art")
    result.assert_outcomes(passed=1)
    assert os.listdir(pytester.path / "art") == []


# --- QEMU: the machine's logs, the migration file, the gdb transcript -------------------------------

def test_qemu_failure_keeps_logs_and_migration_file_and_keep_option_keeps_passing(pytester, tcg_bank):
    bank = tcg_bank
    register, byte = FLIP[bank]
    failing, passing = f"qemu-tcg-{bank}-import", f"qemu-tcg-{bank}-export"
    pytester.makepyfile(test_cases=SUITE)
    pytester.makeconftest(TAMPER.format(targets={failing: (register, byte)}))
    # One QEMU: plain ids (with several they carry the version, tests/test_qemu11.py).
    result = pytester.runpytest_inprocess("-m", "apx", "--apx-backend", "qemu-tcg", "-k",
                                          f"{failing} or {passing}", "--apx-artifacts", "art",
                                          "--apx-keep-artifacts",
                                          f"--apx-qemu={shutil.which('qemu-system-x86_64') or 'qemu-system-x86_64'}")
    result.assert_outcomes(passed=1, failed=1)
    art = pytester.path / "art"
    assert sorted(os.listdir(art)) == sorted([failing, passing])

    files = os.listdir(art / failing)
    cmdlines = [f for f in files if f.endswith("-cmdline.json")]
    assert len(cmdlines) == 2  # the first QEMU and the one restoring the imported stream
    argv = json.loads((art / failing / cmdlines[0]).read_text())
    assert argv[0].endswith("qemu-system-x86_64") and argv[argv.index("-accel") + 1] == "tcg"
    assert len([f for f in files if f.endswith("-qemu.stderr")]) == 2
    logs = [(art / failing / f).read_bytes() for f in files if f.endswith("-debugcon.log")]
    assert b"".join(logs).count(b"0") >= 1 and any(b"1" in log for log in logs)
    migration = [f for f in files if f.endswith(".mig")]
    assert migration and (art / failing / migration[0]).read_bytes()[:4] == b"QEVM"
    assert (art / failing / "mailbox.bin").stat().st_size == protocol.MAILBOX_SIZE
    assert f"{register} byte {byte}: want" in (art / failing / "decode.txt").read_text()
    assert "observers: migration" in (art / failing / "report.txt").read_text()

    kept = os.listdir(art / passing)
    transcripts = [f for f in kept if "-gdb-" in f and f.endswith(".json")]
    assert transcripts, kept
    transcript = json.loads((art / passing / transcripts[0]).read_text())
    assert any(c["command"].startswith("-target-select remote") for c in transcript["commands"])
    report = (art / passing / "report.txt").read_text()
    assert "outcome: passed (kept)" in report and "observers: migration, gdb, hmp" in report


# --- tests that are not scenario cases -----------------------------------------------------------------

GENERIC = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_passes():
    pass

def test_fails():
    assert 1 + 1 == 3, "arithmetic # is off"

@pytest.mark.skip(reason="not on this host")
def test_skipped():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False

def test_errors(broken):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n
"""


def test_ktap_counts_match_pytest_for_any_outcome(pytester):
    pytester.makepyfile(test_generic=GENERIC)
    result = pytester.runpytest_inprocess("--apx-ktap", "k.ktap", "--junitxml", "j.xml")
    outcomes = result.parseoutcomes()
    assert outcomes == {"passed": 3, "failed": 1, "skipped": 1, "xfailed": 1, "errors": 1}
    doc = parse_ktap((pytester.path / "k.ktap").read_text())
    counts = {k: v for k, v in outcome_counts(doc).items() if v}
    assert counts == {k: v for k, v in outcomes.items()}
    assert [t.name for t in doc.tests] == ["test_generic"]
    by_name = {t.name: t for t in doc.tests[0].subtests.tests}
    assert by_name["test_skipped"].data == "not on this host"
    assert by_name["test_xfails"].directive == "XFAIL" and "known bug" in by_name["test_xfails"].data
    assert by_name["test_errors"].directive == "ERROR" and "setup broke" in by_name["test_errors"].data
    assert any("arithmetic # is off" in line for line in by_name["test_fails"].diagnostics)
    # no apx-marked test: no apx host properties in JUnit and no apx summary
    props, _ = _junit(pytester.path / "j.xml")
    assert not [name for name, _ in props if name.startswith("apx.")]
    assert "apx summary" not in result.stdout.str()


def test_progress_lines_with_verbose_only(pytester):
    pytester.makepyfile(test_slow="""
        def test_boot(apx_progress):
            apx_progress("booting Linux guest (TCG)...")
            apx_progress("snapshot")
    """)
    verbose = pytester.runpytest_inprocess("-v")
    verbose.assert_outcomes(passed=1)
    verbose.stdout.fnmatch_lines(["apx: test_boot: booting Linux guest (TCG)...", "apx: test_boot: snapshot",
                                  "*test_boot PASSED*"])
    quiet = pytester.runpytest_inprocess()
    assert "booting Linux guest" not in quiet.stdout.str()


def test_apx_test_artifacts_folder_kept_only_for_failures(pytester):
    pytester.makepyfile(test_files="""
        def test_fails(apx_test_artifacts):
            (apx_test_artifacts / "console.log").write_text("boot log")
            assert False, "guest said not ok"

        def test_passes(apx_test_artifacts):
            (apx_test_artifacts / "console.log").write_text("boot log")

        def test_option(apx_test_artifacts, request):
            assert (apx_test_artifacts is None) == (request.config.getoption("apx_artifacts") is None)
    """)
    result = pytester.runpytest_inprocess("--apx-artifacts", "art")
    result.assert_outcomes(passed=2, failed=1)
    art = pytester.path / "art"
    assert os.listdir(art) == ["test_files-test_fails"]
    assert (art / "test_files-test_fails" / "console.log").read_text() == "boot log"
    report = (art / "test_files-test_fails" / "report.txt").read_text()
    assert "outcome: failed" in report and "guest said not ok" in report
    pytester.runpytest_inprocess("-k", "option").assert_outcomes(passed=1)  # None without --apx-artifacts


# --- the pure parts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("kvm-ymm-import", ("kvm", "ymm", "import")),
    ("qemu-tcg-hi16_zmm-round_trip", ("qemu-tcg", "hi16_zmm", "round_trip")),
    ("qemu-kvm-apx-debugger_import", ("qemu-kvm", "apx", "debugger_import")),
    ("qemu-tcg-linux-ymm-restore", ("qemu-tcg", "ymm", "linux-restore")),
    ("remote[root@lab-kvm-01:22]-kvm-x87-fresh_vm", ("kvm", "x87", "fresh_vm")),
    # several QEMUs side by side: the backend as the id spells it, with the version tag
    ("qemu11-kvm-ymm-export", ("qemu11-kvm", "ymm", "export")),
    ("qemu10.1-tcg-x87-fresh_vm", ("qemu10.1-tcg", "x87", "fresh_vm")),
    ("qemu11.1.3b-tcg-apx-gprs", ("qemu11.1.3b-tcg", "apx", "gprs")),
    ("ymm", None), ("test_x", None), ("kvm-foo-import", None), ("kvm-ymm", None), ("qemu11-xen-ymm-export", None),
])
def test_parse_case_label(text, parsed):
    assert parse_case_label(text) == parsed


def test_record_folds_phases_the_way_pytest_counts():
    record = TestRecord.for_test("s/test_scenarios.py::test_scenario[kvm-ymm-import]",
                                 {"apx.case": "kvm-ymm-import"})
    assert (record.group, record.backend, record.bank, record.scenario) == ("ymm", "kvm", "ymm", "import")
    record.update("setup", "passed")
    record.update("call", "failed", lines=["kvm-ymm-import: bad", "more"])
    record.update("teardown", "failed", lines=["cleanup broke"])
    assert (record.status, record.reason) == ("fail", "kvm-ymm-import: bad")
    other = TestRecord.for_test("s/test_probe.py::test_x", {})
    assert (other.group, other.label, other.is_case) == ("test_probe", "test_x", False)
    other.update("setup", "skipped", reason="no KVM")
    assert (other.status, other.skip_reason) == ("skip", "no KVM")
    erred = TestRecord.for_test("s/test_probe.py::test_y", {})
    erred.update("call", "passed")
    erred.update("teardown", "failed", lines=["boom"])
    assert (erred.status, erred.reason, erred.lines) == ("error", "teardown failed: boom", ["teardown: boom"])


def test_case_table_cells_reasons_and_failures():
    def rec(label, status="pass", reason="", order=0, **props):
        r = TestRecord.for_test(f"t.py::test_scenario[{label}]", {"apx.case": label, **props}, order)
        r.status, r.reason = status, reason
        return r
    records = [
        rec("kvm-apx-export", "skip", "kvm-apx-export: no APX", 0),
        rec("kvm-apx-import", "skip", "kvm-apx-import: no APX", 1),
        rec("kvm-ymm-export", order=2),
        rec("kvm-ymm-import", "fail", "kvm-ymm-import: after import: bad ymm5", 3,
            **{"apx.artifacts": "art/kvm-ymm-import"}),
        rec("qemu-tcg-ymm-export", "skip", "qemu-tcg-ymm-export: no QEMU", 4),
        TestRecord("t.py::test_other", "test_other", "t", order=5),
    ]
    assert case_table(records) == [
        "apx: 1 passed, 1 failed, 3 skipped (5 scenario cases: bank x backend x scenario)",
        "bank backend  ex im",
        "apx  kvm      S1 S1",
        "ymm  kvm      P  F",
        "     qemu-tcg S2 -",
        "ex export, im import",
        "P pass  F fail  E error  S<n> skipped (reason n below)  X xfail  - no such case",
        "S1 (2 cases: apx): no APX",
        "S2 (1 case: ymm): no QEMU",
        "F kvm-ymm-import: after import: bad ymm5 (artifacts: art/kvm-ymm-import)",
    ]
    assert case_table(records[5:]) == []


def test_case_table_has_a_row_per_qemu():
    def rec(label, status="pass", reason="", order=0):
        r = TestRecord.for_test(f"t.py::test_scenario[{label}]", {"apx.case": label}, order)
        r.status, r.reason = status, reason
        return r
    records = [rec("qemu11-tcg-ymm-export", order=0), rec("qemu10-tcg-ymm-export", order=1),
               rec("kvm-ymm-export", order=2), rec("qemu11-kvm-ymm-export", order=3),
               rec("qemu10-kvm-ymm-export", "skip", "qemu10-kvm-ymm-export: no KVM", 4)]
    assert case_table(records)[1:7] == [
        "bank backend    ex",
        "ymm  kvm        P",
        "     qemu10-kvm S1",
        "     qemu11-kvm P",
        "     qemu10-tcg P",
        "     qemu11-tcg P",
    ]


def test_abbreviations_are_short_and_unique():
    names = ["export", "import", "round_trip", "fresh_vm", "init_state", "xcr0_cycle", "gprs",
             "debugger_import", "negative", "linux-restore", "linux-ctxswitch", "linux-rescue"]
    keys = abbreviations(names)
    assert keys["export"] == "ex" and keys["round_trip"] == "rt" and keys["linux-restore"] == "lr"
    assert len(set(keys.values())) == len(names) and all(len(k) <= 4 for k in keys.values())


def test_host_line_and_properties_name_the_host():
    p = probe()
    line = host_line(p)
    assert line.startswith(f"host: {p.cpu.vendor} family {p.cpu.family} model {p.cpu.model} "
                           f"stepping {p.cpu.stepping}")
    assert f"kernel {p.kernel_release}" in line
    props = host_properties(p, ("kvm", "qemu-tcg"))
    assert props["apx.accel"] == "kvm,tcg" and props["apx.backends"] == "kvm,qemu-tcg"
    assert props["apx.host"] == line[len("host: "):]
    # Every QEMU of the run on the host line; each one's -cpu and APX verdicts as properties.
    for q in p.qemus:
        assert f"QEMU {q.version}" in line
        key = f"apx.{q.name}" if len(p.qemus) > 1 else "apx.qemu"
        if len(p.qemus) > 1:
            assert props[key] == f"{q.version} {q.path}"
        assert props[f"{key}.kvm_cpu"] == q.kvm_cpu
        assert props[f"{key}.apx.tcg"] == q.apx["tcg"]


def test_safe_name_and_finalize(tmp_path):
    assert safe_name("kvm-ymm-import") == "kvm-ymm-import"
    assert safe_name("remote[root@h:22]-kvm-ymm-import") == "remote_root@h_22_-kvm-ymm-import"
    staging = tmp_path / "stage" / "a"
    staging.mkdir(parents=True)
    (staging / "f").write_text("x")
    dest = tmp_path / "out" / "a"
    dest.mkdir(parents=True)
    (dest / "old").write_text("stale")
    assert finalize(staging, dest) == dest and os.listdir(dest) == ["f"] and not staging.exists()
    again = tmp_path / "stage" / "b"
    again.mkdir()
    assert finalize(again, None) is None and not again.exists()
    assert finalize(tmp_path / "never", tmp_path / "out" / "c").is_dir()  # a failure with nothing staged


# --- RunRecorder on a Run without a VMM -------------------------------------------------------------------

class _FakeSession:
    backend = "fake"

    def __init__(self, bank, image, mailbox):
        self.bank, self.image, self.mailbox_bytes = bank, image, mailbox
        self.closed = False

    def export(self):
        return self.image.copy()

    def observers(self):
        return {"FAKE_GET": self.export}

    def views(self):
        return {"peek": lambda: {"ymm0": b"\0" * 32}}

    def read_area(self, offset, size):
        return self.mailbox_bytes[offset:offset + size]

    def close(self):
        self.closed = True


class _FakeBackend:
    name = "fake"

    def __init__(self, session):
        self.session = session

    def start(self, bank, payload):
        return self.session

    def run_closed(self):
        pass


def test_recorder_chains_the_run_hooks_and_saves_a_failure(tmp_path):
    bank = BANKS["ymm"]
    layout = Layout.reference("intel-apx")  # no --cpuid source of the CLI matches: in-process decode
    state = XsaveImage.build(layout, {})
    state.write_registers(bank.pattern(1))
    wrong = bytearray(state.read("ymm13"))
    wrong[21] ^= 0xFF
    state.write("ymm13", bytes(wrong))
    mailbox = bytearray(protocol.MAILBOX_SIZE)
    mailbox[:protocol.HEADER_SIZE] = protocol.pack_mailbox_header(bank_bytes=bank.size,
                                                                 stage=protocol.STAGE_VERIFIED)
    mailbox[protocol.EXPECT_AREA:protocol.EXPECT_AREA + bank.size] = bank.pack(bank.pattern(1))
    fake = _FakeSession(bank, state, bytes(mailbox))
    calls = []
    run = Run(_FakeBackend(fake), bank, b"", tamper=lambda image: calls.append("tamper"),
              session_wrapper=lambda s: calls.append("wrapper") or s,
              on_exit=lambda r, exc: calls.append(("on_exit", type(exc).__name__)))
    recorder = RunRecorder(tmp_path / "case")
    recorder.attach(run)
    with pytest.raises(AssertionError):
        with run:
            session = run.start()
            assert isinstance(session, RecordingSession) and session.inner is fake
            assert session.bank is bank  # everything else goes through
            session.views()["peek"]()
            image = session.export()
            run.before_import(image)
            raise AssertionError("guest verify failed")
    assert calls == ["wrapper", "tamper", ("on_exit", "AssertionError")]
    assert fake.closed and recorder.failed
    assert recorder.observers == ["peek", "FAKE_GET"]
    files = set(os.listdir(tmp_path / "case"))
    assert files == {"mailbox.bin", "exported.bin", "expected.bin", "imported.bin", "decode.txt"}
    decode = (tmp_path / "case" / "decode.txt").read_text()
    assert decode.startswith("# no `apx-tests decode --cpuid` source")
    assert "1 difference(s) from expected.bin" in decode and "avx ymm13 byte 21: want" in decode
    assert any("mailbox EXPECT area" in line for line in recorder.summary_lines())


def test_recorder_without_a_directory_only_notes_observers():
    bank = BANKS["xmm"]
    fake = _FakeSession(bank, XsaveImage.build(Layout.reference("intel-apx"), {}), bytes(protocol.MAILBOX_SIZE))
    run = Run(_FakeBackend(fake), bank, b"")
    recorder = RunRecorder(None)
    recorder.attach(run)
    with run:
        run.start().export()
        run.notes.append("a note")
    assert recorder.observers == ["FAKE_GET"] and recorder.notes == ["a note"] and not recorder.failed
    assert recorder.files == []
