"""A fleet: two OpenSSH servers on 127.0.0.1 (different ports) given as two --apx-host.
`--apx-fleet split` (default) deals the cases round-robin: both hosts run cases, each case
runs once, the union is the full set with the local outcomes. `--apx-fleet each` runs the
full set on every host."""

from __future__ import annotations

import collections
import glob
import time
from pathlib import Path

import pytest

from apx_tests.cases import case_ids
from apx_tests.remote.testing import LocalSshd, junit_outcomes, processes_matching, run_apx_suite, sshd_unavailable_reason

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sshd_unavailable_reason() is not None,
                                reason=f"no test sshd: {sshd_unavailable_reason()}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    first = LocalSshd().start()
    second = None
    try:
        second = LocalSshd().start()
        second.authorize(Path(str(first.client_key) + ".pub").read_text())  # one client key for both
        known = tmp_path_factory.mktemp("fleet") / "known_hosts"
        known.write_text(first.known_hosts_line() + "\n" + second.known_hosts_line() + "\n")
        yield first, second, known
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
    assert not first.pids() and not second.pids()
    assert not first.dir.exists() and not second.dir.exists()


@pytest.fixture(scope="module")
def local_outcomes(tmp_path_factory):
    junit = tmp_path_factory.mktemp("local") / "local.xml"
    run_apx_suite(REPO, junit)
    return {o.case: o.outcome for o in junit_outcomes(junit) if o.host is None and o.case in set(case_ids())}


def _run(fleet, tmp_path, *more):
    first, second, known = fleet
    junit = tmp_path / "fleet.xml"
    before = set(glob.glob("/tmp/apx-remote.*"))
    proc = run_apx_suite(REPO, junit, "--apx-host", first.host_arg, "--apx-host", second.host_arg,
                         "--apx-known-hosts", str(known), "--apx-ssh-key", str(first.client_key), *more)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    deadline = time.monotonic() + 15
    while (processes_matching("run-remote") or set(glob.glob("/tmp/apx-remote.*")) - before) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_matching("run-remote") == []
    assert set(glob.glob("/tmp/apx-remote.*")) - before == set()
    return proc, [o for o in junit_outcomes(junit) if o.host is not None]


def test_split_spreads_the_cases_over_both_hosts(fleet, local_outcomes, tmp_path):
    first, second, _ = fleet
    proc, outcomes = _run(fleet, tmp_path)
    per_host = collections.Counter(o.host for o in outcomes)
    assert set(per_host) == {first.host_arg, second.host_arg}
    assert abs(per_host[first.host_arg] - per_host[second.host_arg]) <= 1, per_host  # round-robin
    cases = [o.case for o in outcomes]
    assert len(cases) == len(set(cases)), "a case ran twice"
    assert set(cases) == set(case_ids())
    assert {o.case: o.outcome for o in outcomes} == local_outcomes
    for server in (first, second):
        assert f"{server.host_arg}: {per_host[server.host_arg]}/{per_host[server.host_arg]} cases reported" \
            in proc.stdout


def test_each_runs_every_case_on_every_host(fleet, local_outcomes, tmp_path):
    first, second, _ = fleet
    _, outcomes = _run(fleet, tmp_path, "--apx-fleet", "each", "-k", "kvm-ymm- or kvm-apx-")
    by_host = collections.defaultdict(dict)
    for o in outcomes:
        by_host[o.host][o.case] = o.outcome
    want = {c: local_outcomes[c] for c in case_ids() if "-ymm-" in c or "-apx-" in c}
    assert by_host == {first.host_arg: want, second.host_arg: want}
