"""ci/bench and its C reference bench/kvm_scenario.c, run for real.

The bench must print a Python row, a C row and a positive Python/C ratio for the
`import` scenario, a Python row for every other scenario, the rows of every other
measurement, and one goal line per goal, PASS or MISS, which the JSON output repeats.
Started by the system python3 it must run in the project's venv all the same.  The C
program must refuse to time a broken run: when the guest's verify fails it exits
non-zero with exactly one line on stderr naming the register and byte.

No test here compares a measured time with anything: whether a goal is met is the
bench's output, not a test's verdict.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apx_tests.guests import build
from apx_tests.kvm.backend import KvmBackend, KvmHost, KvmSession
from apx_tests.kvm.system import KvmUnavailable
from apx_tests.scenarios import SCENARIOS
from apx_tests.xsave import BANKS

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "ci" / "bench"
BANK = "ymm"
ROW = re.compile(r"^(?P<name>(?:kvm|qemu-tcg|qemu-kvm) \S+ \S+)\s+(?P<side>python/c|python|c|total|[a-z_]+)\s+(?P<min>\S+)\s+(?P<median>\S+)$")
GOAL = re.compile(r"^goal: .* (?P<verdict>PASS|MISS|NOT MEASURED)$")
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def runnable():
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (the bench compiles bench/kvm_scenario.c)")
    if not build.have_llvm_mc():
        pytest.skip("llvm-mc ≥ 18 not installed (Debian: llvm-19)")
    try:
        host = KvmHost()
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    try:
        reason = KvmBackend(host).unavailable_reason(BANKS[BANK])
    finally:
        host.close()
    if reason:
        pytest.skip(f"{BANK}: {reason}")


@pytest.fixture(scope="module")
def prepared(runnable, tmp_path_factory):
    """ci/bench --prepare: the compiled C program, its payload and table for BANK."""
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([str(BENCH), "--bank", BANK, "--prepare", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == [f"payload-{BANK}.bin", f"table-{BANK}.txt", "kvm_scenario"]
    assert all(p.is_file() for p in paths)
    payload, table, program = paths
    return program, payload, table


def _run_c(prepared, *extra, payload=None):
    program, own_payload, table = prepared
    argv = [str(program), "--payload", str(payload or own_payload), "--table", str(table),
            "--iterations", "2", "--warmup", "0", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _goals_agree(stdout: str, data: dict) -> list[str]:
    """The goal lines of the table, checked against the JSON's goals (same order, same
    verdicts; the JSON's None is the table's NOT MEASURED)."""
    lines = [line for line in stdout.splitlines() if line.startswith("goal: ")]
    assert all(GOAL.match(line) for line in lines), lines
    assert [GOAL.match(line)["verdict"] for line in lines] == \
        [g["verdict"] or "NOT MEASURED" for g in data["goals"]], (lines, data["goals"])
    verdicts = [g["verdict"] for g in data["goals"]]
    assert data["verdicts"] == {"PASS": verdicts.count("PASS"), "MISS": verdicts.count("MISS"),
                                "NOT MEASURED": verdicts.count(None)}
    return lines


def _rows(data: dict) -> dict[str, dict]:
    return {row["name"]: row for m in data["measurements"] for row in m["rows"]}


def test_bench_prints_python_and_c_rows_and_a_ratio(runnable, tmp_path):
    json_file = tmp_path / "bench.json"
    result = subprocess.run([str(BENCH), "--iterations", "3", "--qemu-iterations", "2", "--parse-iterations", "1",
                             "--linux-boots", "1", "--json", str(json_file)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr  # also when a goal is missed
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for line in result.stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["name"], match["side"]] = (match["min"], match["median"])

    name = f"kvm import {BANK}"
    for side in ("python", "c"):
        assert (name, side) in rows, result.stdout
        assert all(float(v) > 0 for v in rows[name, side]), rows[name, side]
    ratio_min, ratio_median = rows[name, "python/c"]
    for text in (ratio_min, ratio_median):
        assert text.endswith("×"), text
        assert float(text[:-1]) > 0, text
    goal = [line for line in result.stdout.splitlines() if line.startswith("goal: python ≤ 1.2× C per scenario")]
    assert len(goal) == 1 and goal[0].split()[-1] in ("PASS", "MISS"), result.stdout
    for other, scenario in SCENARIOS.items():
        if other != "import" and scenario.applies_to(BANK) and scenario.requires <= KvmSession.features:
            assert (f"kvm {other} {BANK}", "python") in rows, result.stdout
    for accel in ("tcg", "kvm"):
        name = f"qemu-{accel} fresh_vm {BANK}"
        assert all((name, side) in rows for side in ("total", "boot", "save", "restore")), result.stdout
    assert any(line.startswith(f"goal: qemu-tcg fresh_vm {BANK} ≤ 150 ms") for line in result.stdout.splitlines())
    for accel in ("tcg", "kvm"):
        name = f"qemu-{accel} gdb-look xmm"
        assert all((name, side) in rows for side in ("total", "connect", "first_read", "read", "detach", "reattach")), \
            result.stdout

    data = json.loads(json_file.read_text())
    lines = _goals_agree(result.stdout, data)
    assert "NOT MEASURED" not in "\n".join(lines)
    # Every goal that moved here from a timed assertion in tests/, by row, side and bound.
    goals = {(g["row"], g["side"]): (g["op"], g["bound"], g["unit"]) for g in data["goals"]}
    assert goals[f"kvm import {BANK}", "python/c"] == ("<=", 1.2, "×")
    assert goals[f"qemu-tcg fresh_vm {BANK}", "total"] == ("<=", 150, "ms")
    assert goals[f"qemu-kvm fresh_vm {BANK}", "total"] == ("<=", 150, "ms")
    assert goals["pytest -m apx --collect-only", "total"] == ("<=", 1000, "ms")
    assert goals["qemu-tcg gdb-look xmm", "total"] == goals["qemu-kvm gdb-look xmm", "total"] == ("<=", 5000, "ms")
    assert goals["qemu-tcg bad-option error", "total"] == ("<=", 3000, "ms")
    assert goals["gdb stale-socket error", "total"] == ("<=", 3000, "ms")
    assert goals["migration 1GiB tcg", "parse"] == ("<=", 5000, "ms")
    assert goals[f"linux-tcg boot to ready {BANK}", "total"] == ("<=", 3000, "ms")
    assert goals[f"linux-tcg ready snapshot to ready {BANK}", "total"] == ("<=", 1000, "ms")
    assert goals["linux-tcg stop during spin", "xmm/ymm"] == (">=", 0.3, "×")
    assert goals["linux-tcg ctx-ymm pair", "spins"] == (">=", 100, "spins")
    assert {g["verdict"] for g in data["goals"]} <= {"PASS", "MISS"}
    by_name = _rows(data)
    assert by_name["migration 1GiB tcg"]["sides"]["parse"]["iterations"] == 1
    assert by_name["linux-tcg ctx-ymm pair"]["sides"]["spins"]["unit"] == "spins"
    assert [m["name"] for m in data["measurements"]] == ["kvm-import", "kvm-scenarios", "qemu-fresh-vm", "qemu-gdb",
                                                        "qemu-errors", "migration-parse", "linux", "linux-spins",
                                                        "kernel", "collection"]  # suite: only with --only
    assert data["strict"] is False
    assert data["iterations"] == 3
    assert [m["name"] for m in data["measurements"]][:2] == ["kvm-import", "kvm-scenarios"]
    imported = data["measurements"][0]["rows"][0]
    assert set(imported["sides"]) == {"python", "c"}
    assert all(len(s["times_ms"]) == 3 for s in imported["sides"].values())
    expected = imported["sides"]["python"]["median_ms"] / imported["sides"]["c"]["median_ms"]
    assert imported["ratio"]["median"] == pytest.approx(expected)
    assert imported["verdict"] in ("PASS", "MISS")


def _outside_the_venv() -> dict[str, str]:
    """The environment of a shell that never activated the venv: no VIRTUAL_ENV, no venv
    bin on PATH, nothing of ours in PYTHONPATH."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "APX_BENCH_REEXEC")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env


@pytest.fixture
def system_python():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not installed")
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a venv: there is no other interpreter to fall back to")
    return SYSTEM_PYTHON


def test_bench_started_by_the_system_python_runs_in_the_venv(runnable, system_python, tmp_path):
    """`python3 ci/bench` outside the venv: the bench re-executes itself under the venv's
    python, so the QEMU and gdb rows (qemu.qmp, pygdbmi) work.  -S keeps site-packages
    out, so the system python lacks the dependencies whatever this machine installed."""
    json_file = tmp_path / "bench.json"
    result = subprocess.run([system_python, "-S", str(BENCH), "--only", "qemu-gdb", "--only", "qemu-errors",
                             "--warmup", "0", "--qemu-iterations", "1", "--json", str(json_file)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**_outside_the_venv(), "APX_VENV": sys.prefix})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ModuleNotFoundError" not in result.stdout + result.stderr and "ERROR" not in result.stdout
    data = json.loads(json_file.read_text())
    assert data["facts"]["python_prefix"] == sys.prefix
    assert f"({data['facts']['python_executable']})" in result.stdout.splitlines()[0]
    rows = _rows(data)
    assert set(rows) == {"qemu-tcg gdb-look xmm", "qemu-kvm gdb-look xmm", "qemu-tcg bad-option error",
                         "gdb stale-socket error"}
    assert not [name for name, row in rows.items() if "error" in row], rows
    assert len(_goals_agree(result.stdout, data)) == 4


def test_bench_without_a_venv_says_run_bootstrap(system_python, tmp_path):
    missing = tmp_path / "no-venv"
    result = subprocess.run([system_python, "-S", str(BENCH), "--only", "qemu-errors"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env={**_outside_the_venv(), "APX_VENV": str(missing)})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ci/bench: error: {system_python} cannot import "), lines[0]
    assert f"no venv at {missing} " in lines[0] and lines[0].endswith("run ci/bootstrap first"), lines[0]


def test_strict_fails_exactly_when_a_goal_is_missed(runnable, tmp_path):
    """--strict: exit 1 if and only if the JSON has a MISS, each named on stderr (whether
    this run misses depends on the machine; the rule does not)."""
    json_file = tmp_path / "bench.json"
    result = subprocess.run([str(BENCH), "--only", "qemu-errors", "--warmup", "0", "--qemu-iterations", "1",
                             "--strict", "--json", str(json_file)], capture_output=True, text=True, timeout=300)
    data = json.loads(json_file.read_text())
    assert data["strict"] is True and data["verdicts"]["NOT MEASURED"] == 0, result.stdout + result.stderr
    _goals_agree(result.stdout, data)
    missed = [g for g in data["goals"] if g["verdict"] == "MISS"]
    assert result.returncode == (1 if missed else 0), result.stdout + result.stderr
    named = [line for line in result.stderr.splitlines() if line.startswith("ci/bench: missed (--strict): ")]
    assert len(named) == len(missed), result.stderr


def test_c_program_times_a_verified_run(prepared):
    result = _run_c(prepared)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["bank"] == BANK and data["iterations"] == 2 and len(data["times_ms"]) == 2
    assert 0 < data["min_ms"] <= data["median_ms"]


def _one_line_failure(result) -> str:
    assert result.returncode != 0
    assert result.stdout == ""  # no numbers for a broken run
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvm_scenario: ")
    return lines[0]


def test_c_program_fails_loudly_when_expect_is_corrupt(prepared):
    line = _one_line_failure(_run_c(prepared, "--corrupt-expect"))
    assert "guest verify failed" in line and f"{BANK} ymm0 byte 0" in line, line


def test_c_program_fails_loudly_with_another_banks_payload(prepared, tmp_path):
    # The xmm payload stores 16 bytes per register where the ymm table expects 32: the
    # guest's compare trips at ymm0's upper half.
    payload = tmp_path / "xmm.bin"
    payload.write_bytes(build.build_payload("xmm").code)
    line = _one_line_failure(_run_c(prepared, payload=payload))
    assert "guest verify failed" in line and f"{BANK} ymm0 byte 16" in line, line


def test_c_program_rejects_a_table_of_another_host(prepared, tmp_path):
    program, payload, table = prepared
    wrong = tmp_path / "table.txt"
    wrong.write_text(re.sub(r"(?m)^xsave_size \d+$", "xsave_size 8192", table.read_text()))
    line = _one_line_failure(_run_c((program, payload, wrong)))
    assert "KVM_CAP_XSAVE2" in line, line


# --- the table's logic, on ci/bench's own functions (no time is judged) ----------------------


@pytest.fixture(scope="module")
def bench_module():
    """ci/bench imported as a module (it is a script without .py)."""
    loader = importlib.machinery.SourceFileLoader("ci_bench", str(BENCH))
    spec = importlib.util.spec_from_loader("ci_bench", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_bench"] = module  # its dataclasses look their module up there
    try:
        loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("ci_bench", None)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="apx_tests" tests="8">
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[kvm-ymm-import]" time="0.5"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[kvm-x87-export]" time="0.25"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[qemu10-kvm-ymm-import]" time="2.0"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[qemu11-tcg-xmm-fresh_vm]" time="3.0"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[qemu-tcg-x87-gprs]" time="1.0"/>
<testcase classname="apx_tests.suite.test_linux" name="test_linux_restore[qemu-tcg-linux-ymm-restore]" time="9.0"/>
<testcase classname="apx_tests.suite.test_probe" name="test_stand_in_bank_available[ymm]" time="0.125"/>
<testcase classname="apx_tests.suite.test_probe" name="test_kvm_api_version" time="0.125"><failure message="x"/></testcase>
</testsuite></testsuites>"""


def test_junit_times_are_summed_per_backend(bench_module):
    seconds, counts = bench_module.junit_breakdown(JUNIT)
    assert list(seconds) == ["kvm", "qemu-tcg", "qemu10-kvm", "qemu11-tcg", "linux", "other"]
    assert seconds == {"kvm": 0.75, "qemu-tcg": 1.0, "qemu10-kvm": 2.0, "qemu11-tcg": 3.0, "linux": 9.0, "other": 0.25}
    assert counts == {"kvm": 2, "qemu-tcg": 1, "qemu10-kvm": 1, "qemu11-tcg": 1, "linux": 1, "other": 2}
    assert bench_module.junit_failures(JUNIT) == ["test_kvm_api_version"]
    assert bench_module.backend_of("test_scenario[qemu11.1.50-kvm-apx-import]") == "qemu11.1.50-kvm"
    assert bench_module.backend_of("test_scenario[kernel[6.1.0-57-amd64]-kvm-ymm-import]") == "other"


def test_a_real_junit_report_is_split_the_same_way(bench_module, tmp_path):
    """The main job's JUnit file for the kvm backend (a real run, ~1 s): every test case
    counted once, the scenario cases under kvm, the probe tests under other."""
    junit = tmp_path / "kvm.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "apx",
                             "--apx-backend", "kvm", f"--junitxml={junit}", "apx_tests/suite"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a case failed (the bench's ERROR)
    seconds, counts = bench_module.junit_breakdown(junit.read_text())
    assert len(bench_module.junit_failures(junit.read_text())) == result.stdout.count("\nFAILED ")
    assert set(counts) == {"kvm", "other"}, counts
    assert sum(counts.values()) == len(list(ET.parse(junit).getroot().iter("testcase")))
    assert all(value >= 0 for value in seconds.values())


def test_collected_reads_pytests_summary_line(bench_module):
    assert bench_module.collected("x\n292 tests collected in 0.25s\n") == (292, 0.25)
    assert bench_module.collected("292/1626 tests collected (1334 deselected) in 10.95s") == (292, 10.95)
    assert bench_module.collected("1 test collected in 0.10s") == (1, 0.1)
    assert bench_module.collected("no tests collected (6 deselected) in 1.75s") is None
    assert bench_module.collected("ERROR: usage") is None


def test_goal_lines_pass_miss_and_not_measured(bench_module):
    Row, Stats, Limit = bench_module.Row, bench_module.Stats, bench_module.Limit
    limit = Limit("total", bench_module.SUITE_GOAL_MS, note="(wall, the main job)")
    fast = Row("pytest -m apx", {"total": Stats([14000.0, 16000.0, 15000.0]), "kvm": Stats([900.0] * 3)},
               limits=[limit])
    slow = Row("pytest -m apx", {"total": Stats([227000.0])}, limits=[limit])
    broken = Row("pytest -m apx", limits=[limit], error="pytest -m apx: 1 failed")
    assert bench_module.goal_lines(fast) == ["goal: pytest -m apx ≤ 15000 ms (wall, the main job): 15000.0 ms (median) PASS"]
    assert bench_module.goal_lines(slow) == ["goal: pytest -m apx ≤ 15000 ms (wall, the main job): 227000.0 ms (median) MISS"]
    assert bench_module.goal_lines(broken) == ["goal: pytest -m apx ≤ 15000 ms: pytest -m apx: 1 failed NOT MEASURED"]
    assert [g["verdict"] for r in (fast, slow, broken) for g in r.goals()] == ["PASS", "MISS", None]
    lines = bench_module.table([fast])
    assert lines[1].split() == ["pytest", "-m", "apx", "total", "14000.000", "15000.000"]
    assert lines[2].split()[3:] == ["kvm", "900.000", "900.000"] and lines[-1].endswith("PASS")


def test_the_suite_runs_only_when_named(bench_module):
    default = [m.name for m in bench_module.selected(None)]
    assert "collection" in default and "suite" not in default
    assert [m.name for m in bench_module.selected(["suite"])] == ["suite"]
    assert [m.name for m in bench_module.selected(["suite", "collection"])] == ["collection", "suite"]
    args = bench_module.parse_args(["--only", "suite", "--suite-runs", "2", "--collection-runs", "3"])
    assert args.only == ["suite"] and args.suite_runs == 2 and args.collection_runs == 3
    with pytest.raises(SystemExit):
        bench_module.parse_args(["--suite-runs", "0"])


def test_collection_is_a_verified_run_with_its_breakdown(runnable, tmp_path):
    json_file = tmp_path / "bench.json"
    result = subprocess.run([str(BENCH), "--only", "collection", "--collection-runs", "1", "--json", str(json_file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(json_file.read_text())
    _goals_agree(result.stdout, data)
    row = _rows(data)["pytest -m apx --collect-only"]
    assert list(row["sides"]) == ["total", "cpu", "startup", "collect"]
    assert all(len(side["times_ms"]) == 1 for side in row["sides"].values())
    assert row["sides"]["startup"]["median_ms"] + row["sides"]["collect"]["median_ms"] == \
        pytest.approx(row["sides"]["total"]["median_ms"])
    assert [g["row"] for g in data["goals"]] == ["pytest -m apx --collect-only"]


XDIST_SERIAL = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[kvm-ymm-import]" time="0.5"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[qemu10-kvm-ymm-import]" time="2.0"/>
<testcase classname="apx_tests.suite.test_scenarios" name="test_scenario[qemu10-kvm-apx-import]" time="0.0"><skipped message="no apx"/></testcase>
<testcase classname="apx_tests.suite.test_probe" name="test_kvm_api_version" time="0.1"/>
<testcase classname="apx_tests.suite.test_probe" name="test_kvm_api_version" time="0.1"><error message="teardown"/></testcase>
</testsuite></testsuites>"""


def test_xdist_outcomes_are_compared_per_item(bench_module):
    serial = bench_module.junit_outcomes(XDIST_SERIAL)
    assert serial == {"apx_tests.suite.test_scenarios::test_scenario[kvm-ymm-import]": "passed",
                      "apx_tests.suite.test_scenarios::test_scenario[qemu10-kvm-ymm-import]": "passed",
                      "apx_tests.suite.test_scenarios::test_scenario[qemu10-kvm-apx-import]": "skipped",
                      "apx_tests.suite.test_probe::test_kvm_api_version": "error"}  # a failing teardown wins
    # xdist's controller writes the cases in the order they finished: order does not matter
    parallel = dict(reversed(list(serial.items())))
    assert bench_module.outcome_differences(serial, parallel) == []
    parallel["apx_tests.suite.test_scenarios::test_scenario[kvm-ymm-import]"] = "failed"
    del parallel["apx_tests.suite.test_scenarios::test_scenario[qemu10-kvm-apx-import]"]
    assert bench_module.outcome_differences(serial, parallel) == [
        "apx_tests.suite.test_scenarios::test_scenario[kvm-ymm-import]: passed -> failed",
        "apx_tests.suite.test_scenarios::test_scenario[qemu10-kvm-apx-import]: skipped -> missing"]


def test_xdist_runs_only_when_named_and_its_goal_lines(bench_module):
    assert "xdist" not in [m.name for m in bench_module.selected(None)]
    assert [m.name for m in bench_module.selected(["xdist"])] == ["xdist"]
    Row, Stats, Limit = bench_module.Row, bench_module.Stats, bench_module.Limit
    limits = [Limit("speedup", bench_module.XDIST_GOAL, "×", "(wall, -n 0 / -n 2)", at_least=True),
              Limit("mismatched", 0, "items", "(per-item outcomes, JUnit)")]
    row = Row("pytest -m apx -n 2 vs -n 0", {"-n 0": Stats([60000.0]), "-n 2": Stats([40000.0]),
                                             "speedup": Stats([1.5], "×"), "mismatched": Stats([0.0], "items")},
              limits=limits)
    assert bench_module.goal_lines(row) == [
        "goal: pytest -m apx -n 2 vs -n 0 speedup ≥ 1.6× (wall, -n 0 / -n 2): 1.50× (median) MISS",
        "goal: pytest -m apx -n 2 vs -n 0 mismatched ≤ 0 items (per-item outcomes, JUnit): 0 items (median) PASS"]
    lines = bench_module.table([row])
    assert [line.split()[-3:] for line in lines[1:5]] == [["0", "60000.000", "60000.000"],
                                                          ["2", "40000.000", "40000.000"],
                                                          ["speedup", "1.50×", "1.50×"],
                                                          ["mismatched", "0", "0"]]
    # How busy -n 0 already keeps the cores, and the most two workers could gain on that CPU
    # time: printed with two decimals (a count would round 1.47 cores to 1).
    row.sides.update({"-n 0 cores": Stats([1.47], "cores"), "speedup bound": Stats([1.36], "×")})
    assert [line.split()[-3:] for line in bench_module.table([row])[5:7]] == [["cores", "1.47", "1.47"],
                                                                            ["bound", "1.36×", "1.36×"]]
