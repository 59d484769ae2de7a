"""apx_tests.procfs and the leak checks built on it: a check scoped to this run sees this
run's processes, even re-parented ones, and not another run's on the same host."""

from __future__ import annotations

import os
import subprocess
import sys

from apx_tests import procfs
from apx_tests.remote.testing import RUN_TAG, processes_matching

MARK = "apx-procfs-test-sleeper"


def _sleeper(env: dict[str, str]) -> subprocess.Popen:
    # The mark is an argument, so the command line can be matched.  Returned once the
    # child says it runs: right after fork, /proc/PID/cmdline is still this process's
    # (seen: a freshly spawned sleeper missing from the match on a loaded machine).
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)", MARK],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    return proc


def test_a_check_for_this_run_sees_only_this_runs_processes():
    assert os.environ.get(RUN_TAG), "tests/conftest.py sets the run tag"
    ours = _sleeper(dict(os.environ))
    theirs = _sleeper({**os.environ, RUN_TAG: "another-run-on-this-host"})
    untagged = _sleeper({k: v for k, v in os.environ.items() if k != RUN_TAG})
    try:
        every = {pid for pid, _ in processes_matching(MARK)}
        mine = {pid for pid, _ in processes_matching(MARK, this_run=True)}
        assert {ours.pid, theirs.pid, untagged.pid} <= every
        assert mine == {ours.pid}
        assert procfs.has_env(ours.pid, RUN_TAG, os.environ[RUN_TAG])
        assert not procfs.has_env(theirs.pid, RUN_TAG, os.environ[RUN_TAG])
        # A prefix of the tag is not the tag.
        assert not procfs.has_env(ours.pid, RUN_TAG, os.environ[RUN_TAG][:-1])
    finally:
        for proc in (ours, theirs, untagged):
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert processes_matching(MARK) == []


def test_environ_of_a_process_that_is_gone_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procfs.environ(proc.pid) is None and not procfs.has_env(proc.pid, RUN_TAG, "x")
