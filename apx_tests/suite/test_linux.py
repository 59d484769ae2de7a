"""Linux guests under QEMU: a register holder snapshotted mid-spin, restored in a fresh QEMU.

Cases (ids as in the scenario matrix):

- ``qemu-tcg-linux-<bank>-restore``: boot the Debian kernel with a holder that loaded
  ``pattern(1)``; stop inside its spin loop (CPL3, RIP in ``spin=``); migrate to file; the
  stream (MigrationStream) and HMP ``info registers`` must both show ``pattern(1)``; kill
  that QEMU; a fresh QEMU restores the file, the holder is released and must report ``ok``.
  The same snapshot with one byte flipped (e.g. ymm13 byte 21) must make the guest report
  ``not ok`` naming that register and byte.  Then the edit path: a holder expecting
  ``pattern(2)``, its snapshot rewritten to ``pattern(2)`` (``with_register``), reports ``ok``.
- ``qemu-tcg-linux-<bank>-ctxswitch``: two holders (``pattern(1)`` and ``pattern(2)``) pinned
  to one vCPU yield to each other thousands of times before and after the snapshot; both
  report ``ok`` after the restore in a fresh QEMU.

The accelerator is chosen once per session from a check of this host
(linux_accel.choose_accel: KVM where a probe boot of the guest kernel under -accel kvm
reaches /init; TCG where /dev/kvm is unusable, where KVM is kvm_pvm, which boots no stock
kernel, or where the probe fails).  Each case records it as the JUnit properties
``apx.accel`` (kvm or tcg) and ``apx.accel.why``; the ids keep the backend name
``qemu-tcg-linux`` that --apx-backend and -k select by (docs/linux-guests.md says why).

Banks the chosen accelerator cannot run (under TCG: APX, the AVX-512 banks) skip with the
reason; so does everything when no guest kernel is cached (KernelUnavailable, one line:
run ci/bootstrap or set APX_KERNEL), when QEMU is missing, or when --apx-backend leaves
qemu-tcg-linux out.

The boot is shared (linux_ready.ReadyGuest, from conftest.py's linux_env: started in the
background before the session's first item, these items running last): the guest boots
once to /init's waiting state and saves it; every run (a restore case has two, a
ctxswitch case one) restores that 'ready' snapshot in a fresh QEMU and sends its item as
a console command; the guest must say it is its first command (tests/test_linux_shared_boot.py
proves a used state is refused).  See docs/linux-guests.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from apx_tests.cases import LINUX_BACKEND
from apx_tests.guests import linux, linux_kernel
from apx_tests.pytest.options import apx_cpu_profile, apx_skip_or_fail
from apx_tests.profiles import PROFILES, exclusion
from apx_tests.qemu.linux_accel import unavailable_reason
from apx_tests.qemu.linux_session import LinuxHolderRun, flip_target
from apx_tests.xsave import BANKS

BACKEND = LINUX_BACKEND
pytestmark = [pytest.mark.apx, pytest.mark.apx_backend(BACKEND)]

BANK_ORDER = ("xmm", "ymm", "x87", "opmask", "zmm_hi256", "hi16_zmm", "apx")


def _case_id(kind: str):
    return lambda bank: f"{BACKEND}-{bank}-{kind}"


def _kernel_apx(bank: str, kernel) -> str | None:
    """Under KVM the CPU may have APX; the guest kernel must enable XCR0[19] too."""
    if bank == "apx" and linux_kernel.kernel_knows_apx(kernel) is False:
        return (f"guest kernel {linux_kernel.kernel_release(kernel)} has no APX state support (no XSAVE component 19 "
                f"in its xfeature names), so it would not enable XCR0[19]")
    return None


def _env(request, bank: str, case_id: str) -> dict:
    env = request.getfixturevalue("linux_env")
    # Which accelerator runs (or would run) this case, and the check that chose it.
    request.node.user_properties += [("apx.accel", env["accel"]), ("apx.accel.why", env["accel_why"])]
    profile = PROFILES[apx_cpu_profile(request.config)]
    if env["backend"] is not None:  # KVM: what the guest CPU offers, as the QEMU backend sees it
        host_reasons = (env["backend"].unavailable_reason(BANKS[bank]), _kernel_apx(bank, env["kernel"]))
    else:
        host_reasons = (env["profile_unavailable"], exclusion(profile, BANKS[bank].xcr0_mask))
    reasons = [why for why in (*host_reasons, unavailable_reason(bank, env["accel"], qemu=env["qemu"], kernel=env["kernel"]))
               if why]
    if reasons:
        message = f"{case_id}: {'; '.join(reasons)}"
        if bank == "apx" or env["profile_unavailable"]:
            apx_skip_or_fail(message, request.config)  # lab mode: APX / the asked-for profile must run
        try:  # reported at the test, not at this helper (what skipif markers do)
            exc = pytest.skip.Exception(message, _use_item_location=True)
        except TypeError:  # a pytest without that keyword
            exc = pytest.skip.Exception(message)
        raise exc
    # Artifacts go to this test's own folder (kept only if it fails: apx_tests.pytest.reporting).
    artifacts = request.getfixturevalue("apx_test_artifacts")
    request.getfixturevalue("apx_progress")(f"booting Linux guest ({env['accel'].upper()}) for {bank}…")
    return {"qemu": env["qemu"], "kernel": env["kernel"], "cpu": env["cpu"], "accel": env["accel"],
            "artifacts": None if artifacts is None else str(artifacts), "ready": env["ready"]}


def _recorder(request):
    """A JUnit property recorder: item.user_properties, as apx_tests.pytest.reporting writes
    them (pytest's record_property fixture warns under the default junit_family xunit2)."""
    return lambda name, value: request.node.user_properties.append((name, value))


def _record(record_property, prefix: str, run: LinuxHolderRun) -> None:
    for phase, seconds in run.seconds.items():
        record_property(f"{prefix}_{phase}", round(seconds, 3))


@pytest.mark.parametrize("bank", BANK_ORDER, ids=_case_id("restore"))
def test_linux_restore(bank, request):
    record_property = _recorder(request)
    env = _env(request, bank, _case_id("restore")(bank))
    pattern = BANKS[bank].pattern(1)
    register, byte = flip_target(bank)

    # 2a runs on the other core while 1 and 2b run here: the two runs share nothing but the
    # ready snapshot they start from (each restores it into a RAM file of its own).  Each
    # run starts, uses and ends its QEMUs in its own thread (a QEMU's parent-death signal
    # follows the thread that spawned it).
    with ThreadPoolExecutor(max_workers=1) as pool:
        edit_path = pool.submit(_edit_path, bank, env)

        # 1. snapshot -> both observers see pattern(1) -> fresh QEMU -> the holder says ok
        with LinuxHolderRun(bank, load=1, expect=1, **env) as run:
            run.boot()
            snap = run.snapshot()
            snap.check()
            restored = run.restore().check_ok()
            assert restored.report.ready == [] and restored.report.started_uptime is None, \
                f"the restored guest must continue, not boot again: {restored.console}"
            assert "# apx-init: released" in restored.report.lines

            # 2b. the self-test: one byte flipped in the stream -> the guest names it
            flipped = run.restore(run.flipped(register, byte))
            want = f"{bank} {register} byte {byte}: want 0x{pattern[register][byte]:02x} " \
                   f"got 0x{pattern[register][byte] ^ 0xFF:02x} (1 differing byte"
            assert not flipped.result.ok and flipped.result.directive.startswith(want), flipped.result
            assert flipped.exit_code == (linux.EXIT_STATUS_FAIL << 1) | 1
            _record(record_property, "expect1", run)
        _record(record_property, "expect2", edit_path.result())


def _edit_path(bank: str, env: dict) -> LinuxHolderRun:
    """2a. the edit path: the holder expects pattern(2); the stream is rewritten to it."""
    with LinuxHolderRun(bank, load=1, expect=2, **env) as run:
        run.boot()
        run.snapshot().check()  # still pattern(1): the holder loaded stage 1
        edited = run.restore(run.edited(2)).check_ok()
        assert edited.exit_code == (linux.EXIT_STATUS_PASS << 1) | 1
    return run


@pytest.mark.parametrize("bank", BANK_ORDER, ids=_case_id("ctxswitch"))
def test_linux_ctxswitch(bank, request):
    record_property = _recorder(request)
    env = _env(request, bank, _case_id("ctxswitch")(bank))
    with LinuxHolderRun(bank, ctx=True, **env) as run:
        ready = run.boot()
        assert sorted(r.fields["load"] for r in ready) == ["1", "2"]
        snap = run.snapshot()
        snap.check()  # the vCPU held one of the two holders' patterns
        result = run.restore().check_ok()
        lines = result.holder_lines
        assert len(lines) == 2 and all(": ok spins=" in line for line in lines), result.console
        spins = [int(line.rsplit("spins=", 1)[1].split()[0]) for line in lines]
        assert all(s > 100 for s in spins), f"each holder must have yielded many times: {lines}"
        record_property("ctx_spins", spins)
        record_property("ctx_snapshot_stage", snap.matching_stage())
        _record(record_property, "ctx", run)
