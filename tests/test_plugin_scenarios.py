"""The generated scenario cases, run through pytest itself (pytester, in-process): ids,
real passes on this host's banks, the apx skip that --apx-require turns into a failure."""

from __future__ import annotations

import pytest

from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.xsave import BANKS

SUITE = """
import pytest
pytestmark = pytest.mark.apx

def test_scenario(apx_case):
    apx_case.execute()
"""


@pytest.fixture(autouse=True)
def _quiet_rewrite_warning(pytester):
    pytester.makeini("[pytest]\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n")


@pytest.fixture(scope="module")
def kvm_backend():
    host = KvmHost()
    yield KvmBackend(host)
    host.close()


def _runnable(backend, bank):
    return backend.unavailable_reason(BANKS[bank]) is None


# The KVM cases, written out by hand (docs/scenarios.md): every bank gets these seven;
# debugger_import needs QEMU's gdbstub, xcr0_cycle is APX's alone.
KVM_SCENARIOS = ("export", "import", "round_trip", "fresh_vm", "init_state", "gprs", "negative")


def test_case_ids_cover_banks_and_scenarios(pytester):
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("--collect-only", "-q", "--apx-backend", "kvm")
    ids = {line.split("[", 1)[1].rstrip("]") for line in result.outlines if "test_scenario[" in line}
    want = {f"kvm-{bank}-{name}" for bank in ("apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87", "pkru")
            for name in KVM_SCENARIOS} | {"kvm-apx-xcr0_cycle"}
    assert len(want) == 8 * 7 + 1
    assert ids == want


def test_richest_bank_passes_every_scenario(pytester, kvm_backend):
    bank = next(b for b in ("hi16_zmm", "ymm", "xmm") if _runnable(kvm_backend, b))
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", f"kvm-{bank}-", "-q")
    result.assert_outcomes(passed=len(KVM_SCENARIOS))


def test_apx_skips_here_and_fails_with_apx_require(pytester, kvm_backend):
    pytester.makepyfile(SUITE)
    args = ("-m", "apx", "--apx-backend", "kvm", "-k", "kvm-apx-import", "-ra")
    if _runnable(kvm_backend, "apx"):  # an APX host: the real case must pass either way
        pytester.runpytest_inprocess(*args).assert_outcomes(passed=1)
        pytester.runpytest_inprocess(*args, "--apx-require").assert_outcomes(passed=1)
        return
    skipped = pytester.runpytest_inprocess(*args)
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*kvm-apx-import: *APX*"])
    failed = pytester.runpytest_inprocess(*args, "--apx-require")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*--apx-require: kvm-apx-import: *APX*"])


def test_unavailable_stand_in_bank_skips_even_in_lab_mode(pytester, kvm_backend):
    missing = [b for b in ("hi16_zmm", "zmm_hi256", "opmask") if not _runnable(kvm_backend, b)]
    if not missing:
        pytest.skip("this host runs every stand-in bank")
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_inprocess("-m", "apx", "--apx-backend", "kvm", "-k", f"kvm-{missing[0]}-export",
                                          "--apx-require")
    result.assert_outcomes(skipped=1)


def test_inprocess_run_leaves_one_asyncio(pytester):
    """A run in-process that imports asyncio first (labgrid's plugin did, in the runs above)
    must leave the asyncio that tasks cancel with: pytester drops the modules such a run
    imported, the next import builds a second asyncio, and the C tasks (_asyncio, set up
    once per process) still raise the first one's CancelledError, which no
    `except asyncio.CancelledError` then catches (qemu.qmp's reader failed on it, and
    QmpConnection.close raised it in tests/test_faults.py after this module)."""
    pytester.makepyfile("import asyncio\n\n\ndef test_imports_asyncio():\n    assert asyncio.sleep\n")
    pytester.runpytest_inprocess("-q").assert_outcomes(passed=1)

    import asyncio

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(asyncio.sleep(3600))
        loop.call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(task)
    finally:
        loop.close()
