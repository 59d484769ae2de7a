"""ci/bench and its C reference bench/kvm_scenario.c, run for real.

The bench must print a Python row, a C row and a positive Python/C ratio for the
`import` scenario, a Python row for every other scenario, and a goal line.  The C
program must refuse to time a broken run: when the guest's verify fails it exits
non-zero with exactly one line on stderr naming the register and byte.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
ROW = re.compile(r"^(?P<name>(?:kvm|qemu-tcg|qemu-kvm) \S+ \S+)\s+(?P<side>python/c|python|c|total|[a-z]+)\s+(?P<min>\S+)\s+(?P<median>\S+)$")


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


def test_bench_prints_python_and_c_rows_and_a_ratio(runnable, tmp_path):
    json_file = tmp_path / "bench.json"
    result = subprocess.run([str(BENCH), "--iterations", "3", "--qemu-iterations", "2", "--json", str(json_file)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
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
    goal = [line for line in result.stdout.splitlines() if line.startswith("goal: python ≤ 1.5× C per scenario")]
    assert len(goal) == 1 and goal[0].split()[-1] in ("PASS", "MISS"), result.stdout
    for other, scenario in SCENARIOS.items():
        if other != "import" and scenario.applies_to(BANK) and scenario.requires <= KvmSession.features:
            assert (f"kvm {other} {BANK}", "python") in rows, result.stdout
    for accel in ("tcg", "kvm"):
        name = f"qemu-{accel} fresh_vm {BANK}"
        assert all((name, side) in rows for side in ("total", "boot", "save", "restore")), result.stdout
    assert any(line.startswith(f"goal: qemu-tcg fresh_vm {BANK} ≤ 400 ms") for line in result.stdout.splitlines())

    data = json.loads(json_file.read_text())
    assert data["iterations"] == 3
    assert [m["name"] for m in data["measurements"]][:2] == ["kvm-import", "kvm-scenarios"]
    imported = data["measurements"][0]["rows"][0]
    assert set(imported["sides"]) == {"python", "c"}
    assert all(len(s["times_ms"]) == 3 for s in imported["sides"].values())
    expected = imported["sides"]["python"]["median_ms"] / imported["sides"]["c"]["median_ms"]
    assert imported["ratio"]["median"] == pytest.approx(expected)
    assert imported["verdict"] in ("PASS", "MISS")


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
