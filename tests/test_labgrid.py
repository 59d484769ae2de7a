"""--apx-place against a real labgrid coordinator and exporter on 127.0.0.1 (started here),
whose two places "a" and "b" are NetworkServices pointing at two real OpenSSH servers on
127.0.0.1 (apx_tests.remote.testing): the KVM cases run on the places with the local
outcomes; a place held by another client is waited for, or given up with one line; a
missing place and a coordinator that is down stop the run with one line; Ctrl-C, SIGTERM
and a cut connection still release every place. After every test nothing is acquired or
reserved and no agent runs; after the module no coordinator or exporter process is left.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apx_tests import procfs
from apx_tests.cases import case_ids
from apx_tests.remote.labgrid import HELPER_CODE, Coordinator
from apx_tests.remote.testing import (LabgridUnavailable, LocalLabgrid, LocalSshd, alive, free_port,
                                      junit_outcomes, labgrid_unavailable_reason, processes_matching,
                                      run_apx_suite, sshd_unavailable_reason)

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIRS = "/tmp/apx-remote.*"
AGENT_MARKS = ("run-remote", "apx-remote.")
HOLDER = ("alice", "ci-7")  # the other client: LG_USERNAME, LG_HOSTNAME

# Decided without importing labgrid (a second of imports for every run that collects this
# module); the LocalLabgrid fixture imports it for real.
LAB_REASON = labgrid_unavailable_reason(quick=True)
needs_lab = pytest.mark.skipif(sshd_unavailable_reason() is not None or LAB_REASON is not None,
                               reason=f"no test sshd: {sshd_unavailable_reason()}" if sshd_unavailable_reason()
                               else f"no labgrid: {LAB_REASON}")


def _wait_until(check, timeout=30.0):
    """Poll `check` until it is falsy (or `timeout` passes); its last value."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _while_running(child: subprocess.Popen, condition, timeout=60.0) -> bool:
    """Wait until `condition()` holds while `child` still runs; False if the child ended
    first (or the timeout passed)."""
    return _wait_until(lambda: child.poll() is None and not condition(), timeout) is False \
        and child.poll() is None and bool(condition())


def _env() -> dict[str, str]:
    """The child pytest's environment, without labgrid settings of whoever runs this."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LG_")}


# --- the lab: two sshd, a coordinator, an exporter, places a and b ------------------------------------

@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    first = LocalSshd().start()
    second = None
    try:
        second = LocalSshd().start()
        second.authorize(Path(str(first.client_key) + ".pub").read_text())  # one client key for both
        known = tmp_path_factory.mktemp("lab") / "known_hosts"  # what a lab ships with its CI job
        known.write_text(first.known_hosts_line() + "\n" + second.known_hosts_line() + "\n")
        yield first, second, known
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
    assert not first.pids() and not second.pids()


@pytest.fixture(scope="module")
def lab(hosts):
    first, second, _ = hosts
    try:
        server = LocalLabgrid({"a": first.spec, "b": second.spec}).start()
    except LabgridUnavailable as exc:
        pytest.skip(f"labgrid servers cannot start here: {exc}")
    pids = list(server.spawned)
    try:
        yield server
    finally:
        server.stop()
    assert [pid for pid in pids if alive(pid)] == [], "coordinator or exporter still running"
    assert processes_matching("labgrid-coordinator", "labgrid-exporter", this_run=True) == []
    assert not server.dir.exists()


@pytest.fixture(scope="module")
def observer(lab):
    """Our own look at the coordinator (the Python client the plugin uses)."""
    coordinator = Coordinator(lab.address, "test observer", timeout=10).open()
    yield coordinator
    coordinator.close()


@pytest.fixture(scope="module")
def local_outcomes(tmp_path_factory):
    junit = tmp_path_factory.mktemp("local") / "local.xml"
    proc = run_apx_suite(REPO, junit, env=_env())
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    return {o.case: (o.outcome, o.message) for o in junit_outcomes(junit) if o.host is None and o.case in set(case_ids())}


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """After every test: no agent, no remote temp dir, no sshd session; and when the lab
    was used, no place acquired and no reservation (an acquire by a test itself, as the
    other client, is released by that test)."""
    before = set(glob.glob(REMOTE_DIRS))
    uses_lab = "lab" in request.fixturenames
    observer = request.getfixturevalue("observer") if uses_lab else None
    hosts = request.getfixturevalue("hosts") if uses_lab else None
    yield
    assert _wait_until(lambda: processes_matching(*AGENT_MARKS)) == []
    assert _wait_until(lambda: set(glob.glob(REMOTE_DIRS)) - before) == set()
    assert _wait_until(stray_helpers) == [], "a run's labgrid helper is still running"
    if uses_lab:
        first, second, _ = hosts
        assert _wait_until(lambda: first.session_pids() + second.session_pids()) == []
        assert {name: who for name, who in observer.acquired().items() if who} == {}
        assert observer.reservations() == []


def stray_helpers() -> list[int]:
    """labgrid helpers not started by this process (the observer's is ours, module-long):
    a child pytest's helper outliving it would be re-parented, so its parent is not us."""
    out = []
    for pid, _ in processes_matching(HELPER_CODE, this_run=True):
        proc = procfs.stat(pid)
        if proc is not None and proc.ppid != os.getpid():
            out.append(pid)
    return out


def place_args(lab: LocalLabgrid, hosts, *more: str) -> list[str]:
    first, _, known = hosts
    return ["--apx-coordinator", lab.address, "--apx-known-hosts", str(known),
            "--apx-ssh-key", str(first.client_key), *more]


def one_line_errors(output: str, place: str) -> list[str]:
    """The distinct lines about a place; asserting no traceback came with them."""
    assert "Traceback" not in output and "During handling" not in output, output[-3000:]
    return sorted({line for line in output.splitlines() if line.startswith(f"apx-place {place} (")})


def junit_properties(path: Path) -> dict[str, dict[str, str]]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        out[case.get("name")] = {p.get("name"): p.get("value") for p in case.iter("property")}
    return out


def hold(lab: LocalLabgrid, place: str) -> None:
    user, host = HOLDER
    proc = lab.client("-p", place, "acquire", user=user, host=host)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def let_go(lab: LocalLabgrid, place: str) -> None:
    user, host = HOLDER
    proc = lab.client("-p", place, "release", user=user, host=host)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the real thing ---------------------------------------------------------------------------------------

@needs_lab
def test_two_places_run_the_kvm_cases_like_a_local_run(lab, hosts, observer, local_outcomes, tmp_path):
    first, second, _ = hosts
    junit = tmp_path / "places.xml"
    proc = run_apx_suite(REPO, junit, "--apx-place", "a", "--apx-place", "b", *place_args(lab, hosts), env=_env())
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    outcomes = [o for o in junit_outcomes(junit) if o.place is not None]
    assert {(o.place, o.host) for o in outcomes} == {("a", first.host_arg), ("b", second.host_arg)}
    cases = [o.case for o in outcomes]
    assert len(cases) == len(set(cases)), "split: every case runs once"
    assert {o.case: (o.outcome, o.message) for o in outcomes} == local_outcomes
    assert not [o for o in junit_outcomes(junit) if o.place is None and o.case in local_outcomes], \
        "KVM cases must not also run locally"
    props = junit_properties(junit)
    name = f"test_scenario[place[a/{first.host_arg}]-kvm-ymm-import]"
    name = name if name in props else f"test_scenario[place[b/{second.host_arg}]-kvm-ymm-import]"
    assert props[name]["apx.place"] in ("a", "b")
    assert props[name]["apx.remote.host"] in (first.host_arg, second.host_arg)
    assert props[name]["apx.place.resource"].startswith("apxlab/apxhost-")
    for place, server in (("a", first), ("b", second)):
        assert f"apx-place {place} ({server.host_arg}): acquired after " in proc.stdout
        assert f"as {observer.name}, released" in proc.stdout
    # what a lab admin would look at afterwards
    places = lab.client("places", "--acquired")
    assert places.returncode == 0 and places.stdout.strip() == "", places.stdout + places.stderr
    assert lab.client("places").stdout.split() == ["a", "b"]


@needs_lab
def test_each_runs_every_case_on_both_places(lab, hosts, local_outcomes, tmp_path):
    junit = tmp_path / "each.xml"
    proc = run_apx_suite(REPO, junit, "--apx-place", "a", "--apx-place", "b", "--apx-fleet", "each",
                         "-k", "kvm-ymm-", *place_args(lab, hosts), env=_env())
    assert proc.returncode in (0, 1), proc.stdout[-3000:]
    by_place: dict[str, dict] = {"a": {}, "b": {}}
    for o in junit_outcomes(junit):
        if o.place:
            by_place[o.place][o.case] = (o.outcome, o.message)
    want = {c: v for c, v in local_outcomes.items() if "-ymm-" in c}
    assert by_place == {"a": want, "b": want}


@needs_lab
def test_collect_only_acquires_nothing(lab, hosts, tmp_path):
    first, _, _ = hosts
    before = first.log_text().count("Connection from")
    proc = run_apx_suite(REPO, tmp_path / "c.xml", "--apx-place", "a", *place_args(lab, hosts), "--collect-only",
                         "-q", env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"test_scenario[place[a/{first.host_arg}]-kvm-ymm-import]" in proc.stdout
    assert first.log_text().count("Connection from") == before


# --- a place someone else holds --------------------------------------------------------------------------

@needs_lab
def test_held_place_is_waited_for_and_used_when_released(lab, hosts, observer, tmp_path):
    hold(lab, "a")
    junit = tmp_path / "w.xml"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "apx_tests/suite",
            "--apx-backend", "kvm", f"--junitxml={junit}", "--apx-place", "a", "-k", "kvm-ymm-import",
            *place_args(lab, hosts)]
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL, env=_env())
    try:
        # The run queues behind alice: its reservation waits on the coordinator.
        waiting = lambda: (observer.name, "waiting") in {(owner, state) for owner, _, state in observer.reservations()}
        assert _while_running(child, waiting), "the run never queued for the place"
        let_go(lab, "a")
        output, _ = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if observer.acquired().get("a") == f"{HOLDER[1]}/{HOLDER[0]}":
            let_go(lab, "a")
    assert child.returncode == 0, output[-3000:]
    first = hosts[0]
    assert f"apx-place a ({first.host_arg}): held by {HOLDER[1]}/{HOLDER[0]} since " in output
    assert "waiting for it (up to 600 s, --apx-place-timeout)" in output
    assert f"apx-place a ({first.host_arg}): acquired after " in output
    (outcome,) = [o for o in junit_outcomes(junit) if o.place]
    assert (outcome.place, outcome.case, outcome.outcome) == ("a", "kvm-ymm-import", "passed")


@needs_lab
def test_held_place_times_out_with_one_line(lab, hosts, observer, tmp_path):
    hold(lab, "a")
    try:
        proc = run_apx_suite(REPO, tmp_path / "t.xml", "--apx-place", "a", "--apx-place-timeout", "2",
                             "-k", "kvm-ymm-import or kvm-x87-import", *place_args(lab, hosts), env=_env())
        assert observer.acquired()["a"] == f"{HOLDER[1]}/{HOLDER[0]}", "someone else's place must be left alone"
    finally:
        let_go(lab, "a")
    assert proc.returncode == 1, proc.stdout[-3000:]
    first = hosts[0]
    lines = [line for line in one_line_errors(proc.stdout, "a") if " acquire: " in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"apx-place a ({first.host_arg}): acquire: held by {HOLDER[1]}/{HOLDER[0]} since ")
    assert lines[0].endswith("; still so after waiting 2 s (--apx-place-timeout 2)")
    outcomes = [o for o in junit_outcomes(tmp_path / "t.xml") if o.place]
    assert len(outcomes) == 2 and all(o.outcome == "error" for o in outcomes)


# --- stopped before it starts: one line -------------------------------------------------------------------

@needs_lab
def test_missing_place_is_one_line(lab, hosts, tmp_path):
    proc = run_apx_suite(REPO, tmp_path / "m.xml", "--apx-place", "a", "--apx-place", "nosuch",
                         *place_args(lab, hosts), env=_env())
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"ERROR: apx-place nosuch: no such place on coordinator {lab.address} (--apx-coordinator); " \
           "places there: a, b" in proc.stderr


@pytest.mark.skipif(LAB_REASON is not None, reason=f"no labgrid: {LAB_REASON}")
def test_coordinator_down_is_one_line(tmp_path):
    port = free_port()  # nobody listens there
    env = dict(_env(), LG_COORDINATOR=f"127.0.0.1:{port}")  # labgrid's own variable
    proc = run_apx_suite(REPO, tmp_path / "d.xml", "--apx-place", "a", env=env)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [f"ERROR: apx-place: coordinator 127.0.0.1:{port} (LG_COORDINATOR): connection refused"]


def test_without_labgrid_the_option_says_how_to_get_it(tmp_path):
    """The plugin without labgrid: runs as before; --apx-place fails with one line."""
    fake = tmp_path / "hide" / "labgrid"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named labgrid (hidden by the test)')\n")
    env = dict(_env(), PYTHONPATH=str(fake.parent))
    # -p no:labgrid: labgrid's own pytest plugin (its entry point stays installed) would fail to load
    proc = run_apx_suite(REPO, tmp_path / "n.xml", "-p", "no:labgrid", "--apx-place", "a", env=env)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --apx-place needs labgrid, which this Python cannot "
                                                     "import ("), errors
    assert errors[0].endswith("): pip install apx-tests[lab]")
    proc = run_apx_suite(REPO, tmp_path / "n.xml", "-p", "no:labgrid", "--collect-only", "-q",
                         "-k", "kvm-ymm-import", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_place_given_twice_is_a_usage_error(tmp_path):
    proc = run_apx_suite(REPO, tmp_path / "u.xml", "--apx-place", "a", "--apx-place", "a", env=_env())
    assert proc.returncode == 4
    assert "ERROR: --apx-place a given twice" in proc.stderr and "Traceback" not in proc.stderr


# --- released whatever happens ------------------------------------------------------------------------------

def _slow_python(tmp_path: Path) -> Path:
    """A remote `python3` that starts the agent 3 s late: the run is surely under way when
    the test interferes."""
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    return slow


def _start(lab, hosts, tmp_path, *more: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "apx_tests/suite",
            "--apx-backend", "kvm", f"--junitxml={tmp_path / 'r.xml'}", *place_args(lab, hosts), *more]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, env=_env())


@needs_lab
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_run_releases_its_places(lab, hosts, observer, tmp_path, signum):
    slow = _slow_python(tmp_path)
    # each: both places get the case, both are acquired
    child = _start(lab, hosts, tmp_path, "--apx-place", "a", "--apx-place", "b", "--apx-fleet", "each",
                   "-k", "kvm-ymm-import", "--apx-remote-python", str(slow))
    try:
        both = lambda: {k: v for k, v in observer.acquired().items() if v == observer.name}.keys() == {"a", "b"}
        assert _while_running(child, both), "the places were never acquired"
        wrapper = f"/bin/sh {slow} "
        started = lambda: any(cmd.startswith(wrapper) for _, cmd in processes_matching("run-remote"))
        assert _while_running(child, started), "the agents never started"
        child.send_signal(signum)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 2, output[-3000:]  # pytest: interrupted
    assert "KeyboardInterrupt" in output
    if signum == signal.SIGTERM:
        assert "SIGTERM: ending the session, releasing the places" in output
    assert "Traceback" not in output
    # nothing_left_behind: neither place acquired, no reservation, no agent, no remote dir


@needs_lab
def test_interrupt_while_waiting_cancels_the_reservation(lab, hosts, observer, tmp_path):
    hold(lab, "a")
    try:
        child = _start(lab, hosts, tmp_path, "--apx-place", "a", "--apx-place", "b", "-k", "kvm-ymm-import")
        try:
            waiting = lambda: (observer.name, "waiting") in {(o, s) for o, _, s in observer.reservations()}
            assert _while_running(child, waiting), "the run never queued for the place"
            child.send_signal(signal.SIGTERM)
            output, _ = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 2, output[-3000:]
        assert observer.acquired() == {"a": f"{HOLDER[1]}/{HOLDER[0]}", "b": None}
        assert observer.reservations() == []
    finally:
        let_go(lab, "a")


@needs_lab
def test_cut_connection_fails_the_items_and_releases_the_place(lab, hosts, observer, tmp_path):
    first = hosts[0]
    slow = _slow_python(tmp_path)
    child = _start(lab, hosts, tmp_path, "--apx-place", "a", "-k", "kvm-ymm-import", "--apx-remote-python", str(slow))
    try:
        wrapper = f"/bin/sh {slow} "
        started = lambda: any(cmd.startswith(wrapper) for _, cmd in processes_matching("run-remote"))
        assert _while_running(child, started), "the agent never started"
        sessions = [pid for pid in first.session_pids() if os.path.realpath(f"/proc/{pid}/exe") == "/usr/sbin/sshd"]
        assert sessions
        for pid in sessions:  # the network goes away: the session's sshd dies
            os.kill(pid, signal.SIGKILL)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 1, output[-3000:]
    (line,) = [line for line in one_line_errors(output, "a") if " collect: " in line]
    assert line.startswith(f"apx-place a ({first.host_arg}): collect: connection lost before kvm-ymm-import")
    assert f"apx-place a ({first.host_arg}): acquired after " in output and "released" in output


@needs_lab
def test_killed_run_still_releases_its_place(lab, hosts, observer, tmp_path):
    """SIGKILL leaves pytest no chance: its labgrid helper sees its stdin close and
    releases the place itself (the agent goes the same way: sshd closes its stdin)."""
    slow = _slow_python(tmp_path)
    child = _start(lab, hosts, tmp_path, "--apx-place", "b", "-k", "kvm-ymm-import", "--apx-remote-python", str(slow))
    try:
        held = lambda: observer.acquired().get("b") == observer.name
        assert _while_running(child, held), "the place was never acquired"
        wrapper = f"/bin/sh {slow} "
        started = lambda: any(cmd.startswith(wrapper) for _, cmd in processes_matching("run-remote"))
        assert _while_running(child, started), "the agent never started"
        child.kill()
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _wait_until(lambda: observer.acquired().get("b")) is None, "the helper did not release the place"
    # nothing_left_behind: no reservation, no helper, no agent, no remote dir
