"""The shared Linux boot (apx_tests.qemu.linux_ready.ReadyGuest): one boot to /init's
waiting state, saved once, restored by every run; no state of one run reaches the next.

Without QEMU: the console command, the kernel command line, and the check a run makes of
the restored guest's first words (command 1, this run's item, nothing before it).

With QEMU and the cached Debian kernel (skipped with the one-line reason otherwise):

- the ready boot: /init started and waits; no holder ran, no result;
- two runs from the same ready snapshot: A loads pattern(1), B loads pattern(2); B's guest
  says it took its first command (B's), B's console has only B's holder, B's snapshot holds
  pattern(2) in every register and nothing of pattern(1), and both verdicts are ok; the
  ready file is byte-for-byte what it was before A ran;
- the planted leak: B restored from A's post-command state (A's mid-spin snapshot) instead
  of the ready snapshot is refused ("not the ready state"), so a sharing that leaked would
  fail the test above.
"""

from __future__ import annotations

import hashlib
import re
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from apx_tests import procfs
from apx_tests.guests import build, linux, linux_kernel
from apx_tests.guests.linux_kernel import KernelUnavailable
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.linux_ready import ReadyGuest
from apx_tests.qemu.linux_session import LinuxHolderRun, LinuxSessionError
from apx_tests.qemu.spec import find_qemu
from apx_tests.xsave import BANKS
from apx_tests.xsave.diff import diff_registers


# --- no QEMU ----------------------------------------------------------------------------------


def test_command_line():
    assert linux.command_line(["ymm"], load=1, expect=2) == "apx-run ymm load=1 expect=2"
    assert linux.command_line(["ctx-xmm"], load=1) == "apx-run ctx-xmm load=1"
    with pytest.raises(ValueError, match="want"):
        linux.command_line(["ymm x"])
    with pytest.raises(ValueError, match="stages 0..4"):
        linux.command_line(["ymm"], load=5)
    words = linux.kernel_cmdline([], release="console", wait=True, accel="kvm").split()
    assert "apx.wait=console" in words and "apx.release=console" in words
    assert "apx.wait=console" not in linux.kernel_cmdline(["ymm"], accel="kvm")


def _report(*lines: str) -> linux.ConsoleReport:
    return linux.parse_console("".join(line + "\n" for line in lines))


READY = "apx-holder: ready bank=ymm pid=80 load=1 expect=1 spin=401000-401100"


@pytest.mark.parametrize("lines, problem", [
    (["# apx-init: command 1 run=ymm load=1 expect=1", READY], None),
    (["# apx-init: busy: command 1 is running; ignoring apx-run ymm load=1 expect=1"],
     "the guest was already running a command"),
    (["# apx-init: command 2 run=ymm load=1 expect=1", READY], "the guest had taken 1 command(s) before this one"),
    (["# apx-init: command 1 run=xmm load=1 expect=1", READY], "the guest took '# apx-init: command 1 run=xmm"),
    (["# apx-init: command 1 run=ymm load=2 expect=2", READY], "the guest took"),
    ([READY, "# apx-init: command 1 run=ymm load=1 expect=1", READY], "holder output before the command"),
    ([READY], "the guest never took the command"),
])
def test_the_first_command_check(lines, problem):
    run = LinuxHolderRun("ymm", load=1, expect=1)
    try:
        if problem is None:
            run._check_first_command(_report(*lines), "apx-run ymm load=1 expect=1")
        else:
            with pytest.raises(LinuxSessionError, match="^" + re.escape("linux-tcg ymm boot: not the ready state: " + problem)):
                run._check_first_command(_report(*lines), "apx-run ymm load=1 expect=1")
    finally:
        run.close()


# --- real boots ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    try:
        qemu = find_qemu()
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    if not (build.have_llvm_mc() and shutil.which("gcc")):
        pytest.skip("needs llvm-mc >= 18 and gcc (ci/bootstrap installs them)")
    try:
        kernel = linux_kernel.find_kernel(fetch=False)
    except KernelUnavailable as exc:
        pytest.skip(str(exc))
    return {"qemu": qemu, "kernel": kernel, "accel": "tcg"}


@pytest.fixture(scope="module")
def ready(env):
    with ReadyGuest(**env) as guest:
        guest.boot()
        yield guest


_alive = procfs.alive


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_ready_boot_waits_for_a_command(ready):
    report = linux.parse_console(ready.console)
    assert report.started_uptime is not None and linux.WAITING_LINE in report.lines, ready.console
    assert report.ready == [] and report.results == [] and not report.done, ready.console
    assert ready.path.is_file() and isinstance(ready.seconds["boot_to_waiting"], float)
    assert ready.boot() == ready.path  # once per ReadyGuest


def test_a_background_boot_is_the_same_boot(env):
    """start() boots in a thread; boot() waits for it and gives the same ready state (the
    suite's conftest starts the shared boot this way, before the first item)."""
    with ReadyGuest(**env) as guest:
        guest.start()
        assert guest._thread is not None and guest.path is None  # it runs now, in the background
        path = guest.boot()
        assert path == guest.path and path.is_file() and guest.ram.is_file()
        assert guest._thread is None and guest.boot() == path
        report = linux.parse_console(guest.console)
        assert linux.WAITING_LINE in report.lines and report.ready == [], guest.console
        pids, dirs = list(guest.pids), guest.temp_paths
        assert pids and not any(_alive(pid) for pid in pids)  # the boot's QEMU is gone
    assert not any(os.path.exists(p) for p in dirs)


def test_a_background_boot_that_fails_raises_in_boot_and_close_ends_one_running(env):
    with ReadyGuest(**env, timeout=0.3) as guest:
        guest.start()
        with pytest.raises(LinuxSessionError) as info:
            guest.boot()
        text = str(info.value)
        assert text.startswith("linux-tcg ready boot: qemu-tcg ready boot: no /init's") and "\n" not in text, text
    # close() while the boot runs: its QEMU is killed, the thread ends, nothing is left.
    guest = ReadyGuest(**env)
    guest.start()
    deadline = time.monotonic() + 10
    while guest._booting is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest._booting is not None, "the background boot never started its QEMU"
    thread = guest._thread
    guest.close()
    assert not thread.is_alive() and guest.path is None
    assert guest.pids and not any(_alive(pid) for pid in guest.pids)
    assert not any(os.path.exists(p) for p in guest.temp_paths)


def test_runs_side_by_side_share_one_boot_and_keep_their_own_state(env):
    """test_linux_restore runs two holders at once, each in its own thread, from one ready
    guest still booting in the background: both wait for that one boot (no second boot
    starts), and each run's guest holds its own pattern."""
    with ReadyGuest(**env) as guest:
        guest.start()

        def run(load: int):
            with LinuxHolderRun("ymm", load=load, expect=load, ready=guest, **env) as r:
                r.boot()
                seen = r.snapshot().observed["migration"]
                r.restore().check_ok()
            return seen, r.pids

        with ThreadPoolExecutor(max_workers=2) as pool:
            one, two = pool.map(run, (1, 2))
        assert len(guest.pids) == 1, f"one ready boot, not {len(guest.pids)}"
        assert one[0] == BANKS["ymm"].pattern(1) and two[0] == BANKS["ymm"].pattern(2)
        assert set(one[1]).isdisjoint(two[1])


def test_two_runs_from_one_boot_see_only_their_own_state(ready, env):
    before = _digest(ready.path)
    one, two = BANKS["ymm"].pattern(1), BANKS["ymm"].pattern(2)
    assert all(one[r] != two[r] for r in one)  # the patterns differ in every register

    with LinuxHolderRun("ymm", load=1, expect=1, ready=ready, **env) as a:
        a_ready = a.boot()
        a_snap = a.snapshot()
        assert a_snap.observed["migration"] == one and a_snap.observed["hmp"] == one
        a_result = a.restore().check_ok()
        assert a_ready[0].fields["load"] == "1"

    with LinuxHolderRun("ymm", load=2, expect=2, ready=ready, **env) as b:
        b_ready = b.boot()
        console = linux.parse_console(b.machine.read_console())
        commands = [ln.strip() for ln in console.lines if linux.COMMAND_RE.match(ln.strip())]
        assert commands == ["# apx-init: command 1 run=ymm load=2 expect=2"], console.lines
        assert [(r.bank, r.fields["load"], r.fields["expect"]) for r in b_ready] == [("ymm", "2", "2")]
        assert console.results == [] and console.started_uptime is None, console.lines  # restored, not booted
        b_snap = b.snapshot()
        for observer in ("migration", "hmp"):
            assert b_snap.observed[observer] == two, observer
            # not one register of A's pattern(1) is left anywhere in B's bank
            assert {d.register for d in diff_registers(one, b_snap.observed[observer])} == set(one), observer
        b_result = b.restore().check_ok()
        assert b_result.exit_code == (linux.EXIT_STATUS_PASS << 1) | 1
        assert set(a.pids).isdisjoint(b.pids)  # every QEMU its own
    assert a_result.ok and b_result.ok
    assert _digest(ready.path) == before, "a run changed the ready snapshot"


def test_a_planted_leak_is_detected(ready, env):
    """B restored from A's post-command state (A's mid-spin snapshot) instead of the ready
    snapshot: the guest is busy with A's command, and B's boot refuses it."""
    with LinuxHolderRun("ymm", load=1, expect=1, ready=ready, **env) as a:
        a.boot()
        a.snapshot().check()
        with ReadyGuest(**env) as leaky:  # the ready guest, but pointing at A's used state
            leaky.guest, leaky.spec = ready.guest, ready.spec
            leaky.path = leaky.workdir / "ready.mig"
            shutil.copyfile(a.snap.path, leaky.path)
            os.link(a.snap_ram, leaky.ram)  # the stream holds no RAM: A's RAM goes with it
            with LinuxHolderRun("ymm", load=2, expect=2, ready=leaky, **env) as b:
                with pytest.raises(LinuxSessionError) as info:
                    b.boot()
    text = str(info.value)
    assert text.startswith("linux-tcg ymm boot: not the ready state: the guest was already running a command "
                           "('# apx-init: busy: command 1 is running; ignoring apx-run ymm load=2 expect=2')"), text
    assert "\n" not in text
