"""Fixtures shared by the framework's own tests."""

from __future__ import annotations

# Imported here, before any pytester snapshot, so asyncio is never among the modules an
# in-process run (pytester.runpytest_inprocess) first imports and pytester then drops:
# the next import would build a second asyncio while the C tasks (_asyncio, set up once
# per process) keep raising the first one's CancelledError, which qemu.qmp's
# `except asyncio.CancelledError` then misses (test_inprocess_run_leaves_one_asyncio).
import asyncio  # noqa: F401
import os
import uuid

import pytest

from apx_tests.remote.testing import RUN_TAG

# Every process this run starts inherits the tag: leak checks count only this run's
# processes, not another run's on the same host (processes_matching(this_run=True)).
os.environ.setdefault(RUN_TAG, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")

# The shipped scenario suite in miniature: one generated test per case (apx_case).
SUITE = """
import pytest
pytestmark = pytest.mark.apx

def test_scenario(apx_case):
    apx_case.execute()
"""


@pytest.fixture(scope="module")
def kvm_host():
    """One KvmHost (/dev/kvm, KVM's supported CPUID and XSAVE facts) per test module;
    the module is skipped where KVM is unavailable."""
    from apx_tests.kvm.backend import KvmHost
    from apx_tests.kvm.system import KvmUnavailable

    try:
        host = KvmHost()
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    yield host
    host.close()


@pytest.fixture
def suite(pytester):
    """A pytester tree holding SUITE, for running the plugin's cases in-process."""
    # apx_tests is already imported by the outer session: the inner one cannot rewrite it.
    pytester.makeini("[pytest]\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n")
    pytester.makepyfile(SUITE)
    return pytester
