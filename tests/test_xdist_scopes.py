"""apx_tests.pytest.xdist_scopes: under `-n N`, the Linux items share one worker (one ready
boot) and each backend's scenario items share one worker (one probe per QEMU)."""

from __future__ import annotations

import json
import subprocess
import sys

from apx_tests.pytest.xdist_scopes import LINUX_SCOPE, scope_of


def test_scope_of_each_kind_of_item():
    linux = "apx_tests/suite/test_linux.py::test_linux_restore[qemu-tcg-linux-ymm-restore]"
    ctx = "apx_tests/suite/test_linux.py::test_linux_ctxswitch[qemu-tcg-linux-x87-ctxswitch]"
    assert scope_of(linux) == scope_of(ctx) == LINUX_SCOPE
    scenario = "apx_tests/suite/test_scenarios.py::test_scenario[{}]"
    assert scope_of(scenario.format("qemu10-tcg-ymm-export")) == scope_of(scenario.format("qemu10-tcg-x87-fresh_vm")) \
        == "apx-backend-qemu10-tcg"
    assert scope_of(scenario.format("qemu11-kvm-hi16_zmm-debugger_import")) == "apx-backend-qemu11-kvm"
    assert scope_of(scenario.format("qemu-kvm-apx-xcr0_cycle")) == "apx-backend-qemu-kvm"
    assert scope_of(scenario.format("kvm-apx-import")) == "apx-backend-kvm"
    assert len({scope_of(scenario.format(b + "-ymm-export")) for b in ("kvm", "qemu-kvm", "qemu10-tcg", "qemu11-tcg")}) == 4
    # Everything else is its own unit, as under --dist load.
    probe = "apx_tests/suite/test_probe.py::test_probe_reports"
    assert scope_of(probe) == probe
    other = "tests/test_x.py::test_scenario[kvm-ymm-export]"  # not the suite's scenario module
    assert scope_of(other) == other


SUITE_LINUX = """
import os, json, pytest
@pytest.mark.parametrize("i", range(6))
def test_linux_restore(i):
    with open(os.environ["SCOPES_LOG"], "a") as fh:
        fh.write(json.dumps({"item": f"linux{i}", "worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
"""

SUITE_SCENARIOS = """
import os, json, pytest
IDS = [f"{b}-ymm-{s}" for b in ("qemu10-tcg", "qemu11-kvm", "kvm") for s in ("export", "import", "fresh_vm")]
@pytest.mark.parametrize("case", IDS, ids=IDS)
def test_scenario(case):
    with open(os.environ["SCOPES_LOG"], "a") as fh:
        fh.write(json.dumps({"item": case, "worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
"""


def test_a_real_xdist_run_keeps_each_scope_on_one_worker(tmp_path):
    """pytest-xdist with two workers, our plugin loaded: every scope's items ran on one
    worker, and both workers got work."""
    suite = tmp_path / "apx_tests" / "suite"
    suite.mkdir(parents=True)
    (suite / "test_linux.py").write_text(SUITE_LINUX)
    (suite / "test_scenarios.py").write_text(SUITE_SCENARIOS)
    log = tmp_path / "scopes.log"
    env = {"SCOPES_LOG": str(log), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
                           "-p", "no:hypothesispytest", "-p", "no:labgrid",
                           "apx_tests/suite"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 15, rows
    workers: dict[str, set] = {}
    for row in rows:
        key = "linux" if row["item"].startswith("linux") else row["item"].rsplit("-", 2)[0]
        workers.setdefault(key, set()).add(row["worker"])
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len(set().union(*workers.values())) == 2, workers
