"""The remote pieces that need no SSH: host specs, case ids, the pytest-free case runner,
the bundle, and the agent run from the bundle by Debian's own python3 (no pytest there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from apx_tests.guests.build import available_banks
from apx_tests.pytest.items import scenario_cases
from apx_tests.remote.agent import EXIT_ABANDONED
from apx_tests.remote.bundle import build_bundle
from apx_tests.cases import CaseId, CaseIdError, CaseRunner, case_ids
from apx_tests.remote.hosts import HostSpec, HostSpecError, parse_host, parse_hosts

SYSTEM_PYTHON = "/usr/bin/python3"


# --- host specs --------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("root@127.0.0.1:2222", HostSpec("root", "127.0.0.1", 2222)),
    ("alice@lab7", HostSpec("alice", "lab7", 22)),
    ("root@[::1]:2200", HostSpec("root", "::1", 2200)),
])
def test_parse_host(text, want):
    assert parse_host(text) == want


def test_labels_and_known_hosts_names():
    assert HostSpec("root", "127.0.0.1", 2222).label == "root@127.0.0.1:2222"
    assert HostSpec("root", "127.0.0.1", 2222).known_hosts_name == "[127.0.0.1]:2222"
    assert HostSpec("root", "lab", 22).known_hosts_name == "lab"
    assert HostSpec("root", "::1", 2200).label == "root@[::1]:2200"


@pytest.mark.parametrize("text", ["root@", "root@host:0", "root@host:99999", "a b@host", "root@host:port"])
def test_bad_host_specs_are_one_line(text):
    with pytest.raises(HostSpecError) as err:
        parse_host(text)
    assert "\n" not in str(err.value) and "--apx-host" in str(err.value)


def test_a_host_given_twice_is_an_error():
    with pytest.raises(HostSpecError, match="given twice"):
        parse_hosts(["root@h:22", "root@h"])


# --- case ids ------------------------------------------------------------------------------

def test_case_ids_are_the_plugins_kvm_cases(pytestconfig, monkeypatch):
    monkeypatch.setattr(pytestconfig.option, "apx_backend", ["kvm"])
    assert case_ids("kvm") == [c.id for c in scenario_cases(pytestconfig)]


@pytest.mark.parametrize("text", ["kvm-ymm", "qemu-ymm-import", "kvm-zmm-import", "kvm-ymm-nothing"])
def test_bad_case_ids(text):
    with pytest.raises(CaseIdError):
        CaseId.parse(text)


# --- the case runner: the same outcomes and messages as the plugin's apx_case -----------------

@pytest.fixture(scope="module")
def runner():
    with CaseRunner() as r:
        yield r


def test_runner_outcomes_match_the_hosts_abilities(runner):
    for case_id in ("kvm-ymm-import", "kvm-xmm-export", "kvm-apx-export", "kvm-hi16_zmm-import"):
        case = CaseId.parse(case_id)
        reason = runner.unavailable(case)
        result = runner.run(case_id)
        if reason:
            assert result.outcome == "skip"
            assert result.lines == [f"{case_id}: {reason}"]
            assert result.require_applies == (case.bank == "apx")
        else:
            assert result.outcome == "pass", result.lines
        assert result.facts["bank"] == case.bank and isinstance(result.duration, float)


def test_runner_reports_build_errors_and_unknown_ids_as_failures(runner):
    from apx_tests.guests.build import GuestBuildError

    def broken(bank):
        raise GuestBuildError(f"guests/payload/{bank}.S:3: error: boom")

    with CaseRunner(broken) as r:
        case_id = next(c for c in ("kvm-ymm-import", "kvm-xmm-import", "kvm-x87-import")
                       if not r.unavailable(CaseId.parse(c)))
        result = r.run(case_id)
    assert result.outcome == "fail"
    assert result.lines == [f"{case_id}: guests/payload/{case_id.split('-')[1]}.S:3: error: boom"]
    assert runner.run("kvm-nope-import").outcome == "fail"


# --- the bundle and the agent ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    bundle = build_bundle()
    path = tmp_path_factory.mktemp("bundle") / "apx.pyz"
    path.write_bytes(bundle.data)
    return path, bundle


def test_bundle_holds_package_guests_and_prebuilt_payloads(bundle_file):
    path, bundle = bundle_file
    names = zipfile.ZipFile(path).namelist()
    assert "__main__.py" in names and "apx_tests/remote/agent.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "guests/payload/common.S" in names
    for bank in available_banks():
        assert f"payloads/{bank}.bin" in names or f"payloads/{bank}.error" in names
    assert set(bundle.payloads) | set(bundle.errors) >= set(available_banks())
    assert build_bundle().data == bundle.data  # same tree, same bytes


def _agent(bundle: Path, *args, **kwargs):
    return subprocess.run([SYSTEM_PYTHON, "-E", "-s", str(bundle), "run-remote", *args],
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"{SYSTEM_PYTHON} missing")
def test_agent_runs_from_the_bundle_with_debians_python(bundle_file, tmp_path):
    path, _ = bundle_file
    assert subprocess.run([SYSTEM_PYTHON, "-c", "import pytest"], capture_output=True).returncode != 0, \
        "this test wants a python without pytest, like a bare remote host"
    workdir = Path(tempfile.mkdtemp(prefix="apx-remote.", dir=tmp_path))
    (workdir / "apx.pyz").write_bytes(path.read_bytes())
    proc = _agent(workdir / "apx.pyz", "--json", "--workdir", str(workdir),
                  "--cases", "kvm-ymm-import,kvm-apx-export", "--cases", "kvm-bogus-import",
                  env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["hello", "probe", "case", "case", "case", "done"]
    cases = {r["id"]: r for r in records if r["kind"] == "case"}
    with CaseRunner() as local:
        for case_id in ("kvm-ymm-import", "kvm-apx-export"):
            want = local.run(case_id)
            assert (cases[case_id]["outcome"], cases[case_id]["lines"]) == (want.outcome, want.lines)
    assert cases["kvm-bogus-import"]["outcome"] == "fail"
    assert any(line.startswith("kvm: ") for line in records[1]["lines"])
    assert not workdir.exists(), "the agent removes its workdir when done"


def test_agent_exits_and_cleans_up_when_stdin_closes(bundle_file, tmp_path):
    path, _ = bundle_file
    workdir = tmp_path / "apx-remote.w"
    workdir.mkdir()
    (workdir / "apx.pyz").write_bytes(path.read_bytes())
    # Many cases and stdin already at EOF: the watchdog must end the run early.
    proc = _agent(workdir / "apx.pyz", "--json", "--watch-stdin", "--workdir", str(workdir),
                  "--cases", ",".join(case_ids() * 50), stdin=subprocess.DEVNULL)
    assert proc.returncode == EXIT_ABANDONED
    assert not workdir.exists()


def test_agent_plain_output(bundle_file):
    path, _ = bundle_file
    proc = _agent(path, "--no-probe", "--cases", "kvm-apx-export")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith(("SKIP kvm-apx-export", "PASS kvm-apx-export"))
    assert proc.stdout.splitlines()[-1].startswith("done: ")


def test_agent_module_runs_without_a_bundle():
    proc = subprocess.run([sys.executable, "-m", "apx_tests.remote.agent", "run-remote", "--json", "--no-probe",
                           "--cases", "kvm-x87-export"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[1])["id"] == "kvm-x87-export"
