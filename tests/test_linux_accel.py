"""Which accelerator the Linux-guest cases boot under (apx_tests.qemu.linux_accel.choose_accel),
and that the suite says which one ran.

The choice is a check, not a constant: TCG where /dev/kvm does not open, TCG on kvm_pvm (the
known case: no stock kernel boots under it, docs/linux-guests.md), otherwise a probe boot of
the guest kernel under -accel kvm decides.  The real probe boot runs here too, so the known
case is checked against the machine rather than taken on trust.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from apx_tests.guests import build, linux_kernel
from apx_tests.kvm.system import kvm_flavour
from apx_tests.qemu.linux_accel import PROBE_TIMEOUT, choose_accel, probe_boot
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.machine import live_machines
from apx_tests.qemu.spec import find_qemu, kvm_usable, our_temp_dirs


def _guest_or_skip():
    """(qemu, kernel) for a real boot, or a skip naming what is missing."""
    try:
        qemu = find_qemu()
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    if not build.have_llvm_mc() or shutil.which("gcc") is None:
        pytest.skip("the Linux guest programs need llvm-mc >= 18 and gcc (ci/bootstrap installs them)")
    try:
        return qemu, linux_kernel.find_kernel(fetch=False)
    except linux_kernel.KernelUnavailable as exc:
        pytest.skip(str(exc))


def test_without_a_usable_kvm_device_it_is_tcg(tmp_path):
    choice = choose_accel(dev=str(tmp_path / "kvm"))
    assert (choice.accel, choice.why) == ("tcg", f"KVM is not usable ({tmp_path / 'kvm'}: No such file or directory)")


def test_kvm_pvm_is_tcg_without_a_probe_boot(tmp_path):
    """A sysfs where kvm_pvm serves /dev/kvm: TCG at once (no QEMU is started)."""
    if kvm_usable() is not None:
        pytest.skip(f"KVM: {kvm_usable()}")
    (tmp_path / "kvm_pvm").mkdir()
    choice = choose_accel(sysfs=str(tmp_path))
    assert choice.accel == "tcg" and choice.why.startswith("KVM here is kvm_pvm (nested, paravirtual), under which "
                                                           "no stock kernel boots"), choice
    assert live_machines() == []


def test_the_probe_boot_agrees_with_the_known_case():
    """The check behind the choice, for real: the guest kernel under -accel kvm.  On kvm_pvm
    it must not reach /init (what choose_accel assumes there without trying; 2 s is plenty,
    /init starts in about 1 s under a KVM that boots Linux); on any other KVM it must, and
    then choose_accel picks KVM.  Nothing is left behind either way."""
    if kvm_usable() is not None:
        pytest.skip(f"KVM: {kvm_usable()}")
    qemu, kernel = _guest_or_skip()
    before = set(our_temp_dirs())
    pvm = kvm_flavour() == "kvm_pvm"
    problem, _ = probe_boot("kvm", qemu, kernel, timeout=2.0 if pvm else PROBE_TIMEOUT)
    if pvm:
        assert problem is not None and "no /init's started line on the serial console within 2 s" in problem, problem
    else:
        assert problem is None
        assert choose_accel(qemu, kernel).accel == "kvm"
    assert set(our_temp_dirs()) == before and live_machines() == []


def test_each_linux_case_records_its_accelerator(tmp_path):
    """The shipped suite, run as CI runs it: a Linux case (here one that skips on every host
    with a stock kernel: APX) carries apx.accel and apx.accel.why in the JUnit report, and
    on kvm_pvm the accelerator is TCG."""
    qemu, kernel = _guest_or_skip()
    junit = tmp_path / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "--pyargs",
            "apx_tests.suite.test_linux", "-k", "qemu-tcg-linux-apx-ctxswitch", f"--junitxml={junit}", "-q"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (case,) = ET.parse(junit).getroot().iter("testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert case.get("name") == "test_linux_ctxswitch[qemu-tcg-linux-apx-ctxswitch]"
    assert props["apx.accel"] in ("kvm", "tcg") and props["apx.accel.why"], props
    if kvm_usable() is not None or kvm_flavour() == "kvm_pvm":
        assert props["apx.accel"] == "tcg"
    skipped = case.find("skipped")
    assert skipped is not None and "APX" in skipped.get("message", ""), ET.tostring(case)
