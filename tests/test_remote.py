"""--apx-host against a real OpenSSH server on 127.0.0.1 (started here, generated keys):
the KVM scenarios run on "the remote" (this machine, through SSH) with the local outcomes;
host key problems, refused connections, a silent agent and a lost connection are one-line
errors naming host and phase; nothing is left running or lying around afterwards."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apx_tests import procfs
from apx_tests.cases import case_ids
from apx_tests.remote.testing import (LocalSshd, free_port, junit_outcomes, keygen, processes_matching,
                                      run_apx_suite, sshd_unavailable_reason)

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIRS = "/tmp/apx-remote.*"
AGENT_MARKS = ("run-remote", "apx-remote.")

pytestmark = pytest.mark.skipif(sshd_unavailable_reason() is not None,
                                reason=f"no test sshd: {sshd_unavailable_reason()}")


@pytest.fixture(scope="module")
def sshd():
    server = LocalSshd().start()
    yield server
    pid, directory = server.process.pid, server.dir
    server.stop()
    assert not procfs.exists(pid) or not server.pids(), "sshd still running"
    assert not directory.exists(), "sshd temp dir left behind"


@pytest.fixture(scope="module")
def local_outcomes(tmp_path_factory):
    junit = tmp_path_factory.mktemp("local") / "local.xml"
    proc = run_apx_suite(REPO, junit)
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    return {o.case: o for o in junit_outcomes(junit) if o.host is None and o.case in set(case_ids())}


def _wait_until(check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """After every test: no agent process, no remote temp dir, no sshd session process."""
    before = set(glob.glob(REMOTE_DIRS))
    yield
    assert _wait_until(lambda: processes_matching(*AGENT_MARKS)) == []
    assert _wait_until(lambda: set(glob.glob(REMOTE_DIRS)) - before) == set()
    if "sshd" in request.fixturenames:
        server = request.getfixturevalue("sshd")
        assert _wait_until(server.session_pids) == []


def remote_args(server: LocalSshd, *more: str) -> list[str]:
    return ["--apx-host", server.host_arg, "--apx-known-hosts", str(server.known_hosts),
            "--apx-ssh-key", str(server.client_key), *more]


def one_line_errors(output: str, host: str) -> list[str]:
    """The distinct lines naming the host; asserting no traceback came with them."""
    assert "Traceback" not in output and "During handling" not in output, output[-3000:]
    return sorted({line for line in output.splitlines() if line.startswith(f"apx-host {host}:")})


# --- the real thing -------------------------------------------------------------------------------

def test_remote_run_has_the_local_outcomes(sshd, local_outcomes, tmp_path):
    junit = tmp_path / "remote.xml"
    proc = run_apx_suite(REPO, junit, *remote_args(sshd))
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-2000:]
    remote = [o for o in junit_outcomes(junit) if o.host is not None]
    assert {o.host for o in remote} == {sshd.host_arg}
    assert not [o for o in junit_outcomes(junit) if o.host is None and o.case in local_outcomes], \
        "KVM cases must not also run locally"
    got = {o.case: (o.outcome, o.message) for o in remote}
    want = {case: (o.outcome, o.message) for case, o in local_outcomes.items()}
    assert got == want
    assert f"{sshd.host_arg}: {len(want)}/{len(want)} cases reported" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    log = sshd.log_text()
    assert "Accepted publickey for root" in log and "Connection from 127.0.0.1" in log


def test_remote_items_carry_probe_and_facts(sshd, tmp_path):
    junit = tmp_path / "r.xml"
    proc = run_apx_suite(REPO, junit, *remote_args(sshd), "-k", "kvm-apx-export or kvm-x87-import",
                         "-rA", "-v")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Captured apx remote call" in proc.stdout
    assert "probe: kvm: /dev/kvm present" in proc.stdout
    assert f"{sshd.host_arg} probe: kernel:" in proc.stdout  # -v: the summary lists the remote probe
    xml = junit.read_text()
    assert 'name="apx.remote.host" value="%s"' % sshd.host_arg in xml
    assert 'name="apx.remote.kvm_supported_xcr0"' in xml


def test_apx_require_applies_to_remote_apx_cases(sshd, local_outcomes, tmp_path):
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *remote_args(sshd), "-k", "kvm-apx-export", "--apx-require")
    if local_outcomes["kvm-apx-export"].outcome == "passed":
        assert proc.returncode == 0
        return
    assert proc.returncode == 1
    assert "--apx-require: kvm-apx-export: " in proc.stdout


def test_collect_only_connects_nowhere(sshd, tmp_path):
    before = sshd.log_text().count("Connection from")
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *remote_args(sshd), "--collect-only", "-q")
    assert proc.returncode == 0
    assert f"test_scenario[remote[{sshd.host_arg}]-kvm-ymm-import]" in proc.stdout
    assert sshd.log_text().count("Connection from") == before


# --- host keys ------------------------------------------------------------------------------------

def test_wrong_host_key_is_a_clear_one_line_failure(sshd, tmp_path):
    other = keygen(tmp_path / "other_host_key", "someone-else")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line(other) + "\n")
    args = ["--apx-host", sshd.host_arg, "--apx-known-hosts", str(known), "--apx-ssh-key", str(sshd.client_key)]
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *args, "-k", "ymm")
    assert proc.returncode == 1
    lines = one_line_errors(proc.stdout, sshd.host_arg)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"apx-host {sshd.host_arg}: host key not in known_hosts (connect: {known} lists "
                               f"ssh-ed25519 SHA256:")
    assert "the host key changed" in lines[0]
    assert all(o.outcome == "error" for o in junit_outcomes(tmp_path / "r.xml") if o.host)
    assert "Accepted publickey" not in sshd.log_text().split("Connection from")[-1]


def test_unknown_host_key_is_refused_and_insecure_mode_accepts_it(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    base = ["--apx-host", sshd.host_arg, "--apx-known-hosts", str(empty), "--apx-ssh-key", str(sshd.client_key),
            "-k", "kvm-x87-import"]
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *base)
    assert proc.returncode == 1
    (line,) = one_line_errors(proc.stdout, sshd.host_arg)
    assert line.startswith(f"apx-host {sshd.host_arg}: host key not in known_hosts (connect: no entry for "
                           f"[127.0.0.1]:{sshd.port} in {empty}; the server offers ssh-ed25519 SHA256:")

    proc = run_apx_suite(REPO, tmp_path / "i.xml", *base, "--apx-host-insecure")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "host keys NOT checked (--apx-host-insecure)" in proc.stdout
    assert empty.read_text() == "", "insecure mode must not write known_hosts"


# --- connection problems ----------------------------------------------------------------------------

def test_connection_refused_names_host_and_phase(tmp_path):
    port = free_port()
    spec = f"root@127.0.0.1:{port}"
    known = tmp_path / "known_hosts"
    known.write_text("")
    proc = run_apx_suite(REPO, tmp_path / "r.xml", "--apx-host", spec, "--apx-known-hosts", str(known),
                         "-k", "ymm")
    assert proc.returncode == 1
    assert one_line_errors(proc.stdout, spec) == [f"apx-host {spec}: connect: connection refused (127.0.0.1 port {port})"]
    outcomes = [o for o in junit_outcomes(tmp_path / "r.xml") if o.host]
    assert outcomes and all(o.outcome == "error" for o in outcomes)


def test_wrong_user_key_fails_to_authenticate(sshd, tmp_path):
    keygen(tmp_path / "stranger", "stranger")
    args = ["--apx-host", sshd.host_arg, "--apx-known-hosts", str(sshd.known_hosts),
            "--apx-ssh-key", str(tmp_path / "stranger"), "-k", "kvm-x87-import"]
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *args)
    assert proc.returncode == 1
    (line,) = one_line_errors(proc.stdout, sshd.host_arg)
    assert line.startswith(f"apx-host {sshd.host_arg}: connect: authentication as root failed")


def test_silent_agent_times_out_and_is_killed(sshd, tmp_path):
    hang = tmp_path / "hanging-python"
    hang.write_text("#!/bin/sh\nexec sleep 120\n")
    hang.chmod(0o755)
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *remote_args(sshd), "-k", "kvm-ymm-export or kvm-ymm-import",
                         "--apx-remote-python", str(hang), "--apx-remote-timeout", "2")
    assert proc.returncode == 1
    lines = one_line_errors(proc.stdout, sshd.host_arg)
    assert f"apx-host {sshd.host_arg}: run: no result for kvm-ymm-export within 2 s" in lines
    assert any("the agent was stopped after no result for kvm-ymm-export" in line for line in lines)
    assert processes_matching(str(hang)) == []  # killed by the cleanup, not left to time out


def test_agent_that_cannot_start_is_a_run_error(sshd, tmp_path):
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *remote_args(sshd), "-k", "kvm-x87-import",
                         "--apx-remote-python", "/nonexistent/python3")
    assert proc.returncode == 1
    (line,) = one_line_errors(proc.stdout, sshd.host_arg)
    assert line.startswith(f"apx-host {sshd.host_arg}: run: the agent exited with status 127 before reporting "
                           "kvm-x87-import: ")


def test_lost_connection_is_a_collect_error_and_the_agent_goes_away(sshd, tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    junit = tmp_path / "r.xml"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "apx_tests/suite",
            "--apx-backend", "kvm", f"--junitxml={junit}", *remote_args(sshd), "-k", "kvm-ymm-import",
            "--apx-remote-python", str(slow)]
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL)
    try:
        # Cut the connection once the remote shell has become the wrapper (the agent's stand-in
        # for `python3`): from then on the agent owns the remote dir. (A cut while the remote
        # login shell still starts up leaves the dir behind: docs/remote.md, caveats.)
        wrapper = f"/bin/sh {slow} "
        started = lambda: any(cmd.startswith(wrapper) for _, cmd in processes_matching("run-remote"))
        assert _wait_until(lambda: not started(), timeout=30) is False, "agent never started"
        sessions = [pid for pid in sshd.session_pids() if os.path.realpath(f"/proc/{pid}/exe") == "/usr/sbin/sshd"]
        assert sessions
        for pid in sessions:  # the network goes away: the session's sshd dies
            os.kill(pid, signal.SIGKILL)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 1, output[-3000:]
    (line,) = one_line_errors(output, sshd.host_arg)
    assert line.startswith(f"apx-host {sshd.host_arg}: collect: connection lost before kvm-ymm-import was reported")
    assert "remote cleanup not confirmed" in output
    # The agent still starts after the sleep, finds its stdin closed, removes its dir and exits
    # (checked by nothing_left_behind).


# --- usage ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--apx-host", "root@"], "--apx-host 'root@': expected USER@HOST[:PORT]"),
    (["--apx-host", "root@h", "--apx-host", "root@h:22"], "--apx-host root@h:22 given twice"),
    (["--apx-host", "root@h", "--apx-ssh-key", "/nonexistent/key"], "--apx-ssh-key /nonexistent/key: no such file"),
    (["--apx-host", "root@h", "--apx-remote-timeout", "0"], "apx_remote_timeout: must be > 0"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    proc = run_apx_suite(REPO, tmp_path / "r.xml", *args)
    assert proc.returncode == 4
    assert message in proc.stderr and "Traceback" not in proc.stderr
