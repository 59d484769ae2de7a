"""Facts of this host as the probe reports them, checked against the rules they must obey.

Marked ``apx``: part of the main job (``pytest -m apx``). Whatever this host cannot do is
skipped with the probe's reason, or fails under ``--apx-require`` (lab mode).
"""

from __future__ import annotations

import pytest

from apx_tests import hostcpu
from apx_tests.pytest.options import apx_skip_or_fail
from apx_tests.probe import BANK_ORDER

pytestmark = pytest.mark.apx

KVM_API_VERSION = 12  # the only version KVM has ever had; Kvm.open insists on it


@pytest.fixture(scope="module")
def kvm(apx_probe):
    if not apx_probe.kvm.present:
        apx_skip_or_fail(f"KVM unavailable: {apx_probe.kvm.error}")
    return apx_probe.kvm


def test_kvm_api_version(kvm):
    assert kvm.api_version == KVM_API_VERSION


def test_kvm_supported_xcr0_has_x87_and_sse(kvm):
    assert kvm.supported_xcr0 is not None, kvm.error
    assert kvm.supported_xcr0 & 0b11 == 0b11, f"KVM supported XCR0 {kvm.supported_xcr0:#x}"


def test_kvm_supported_xcr0_within_host_xcr0(kvm, apx_probe):
    """KVM never lets a guest enable state the host kernel has not enabled."""
    host = apx_probe.cpu.xcr0
    if host is None:
        pytest.skip(f"host XCR0 unknown: {apx_probe.cpu.error}")
    assert kvm.supported_xcr0 & ~host == 0, f"KVM {kvm.supported_xcr0:#x} vs host XCR0 {host:#x}"


def test_kvm_xsave2_size_covers_the_standard_image(kvm, apx_probe):
    from apx_tests.kvm import Kvm
    from apx_tests.xsave import Layout

    assert kvm.xsave2_size is not None, kvm.error
    assert kvm.xsave2_size >= 4096  # struct kvm_xsave's fixed region is the floor
    assert kvm.xsave2_size % 4 == 0  # a __u32 array
    # The largest standard image of any state KVM supports: CPUID 0xD.0 ECX as KVM reports it.
    with Kvm.open(kvm.path) as k:
        leaf_d = {e.index: e for e in k.supported_cpuid() if e.function == 0xD}
    assert 0 in leaf_d, "KVM_GET_SUPPORTED_CPUID has no leaf 0xD"
    assert kvm.xsave2_size >= leaf_d[0].ecx
    # And the standard size of exactly the KVM-supported XCR0 in the host's layout.
    host_layout = Layout.from_cpuid(hostcpu.cpuid, "host CPUID")
    assert kvm.xsave2_size >= host_layout.standard_size_for(kvm.supported_xcr0)


def test_host_xsave_layout_matches_cpuid(apx_probe):
    cpu = apx_probe.cpu
    if cpu.error or not cpu.osxsave:
        pytest.skip(f"no XSAVE on this host: {cpu.error or 'CPUID.1:ECX.OSXSAVE=0'}")
    assert cpu.layout is not None, cpu.layout_error
    assert cpu.xsave_size is not None and cpu.xsave_size >= 576  # legacy region + header
    assert cpu.xsave_max_size >= cpu.xsave_size
    user = {int(n): c for n, c in cpu.layout.items() if not c["supervisor"]}
    assert {0, 1} <= set(user)
    for n, comp in user.items():
        assert n < 2 or cpu.xcr0_supported >> n & 1, (n, comp)  # listed => supported
        assert comp["offset"] + comp["size"] <= cpu.xsave_max_size, (n, comp)
        if n >= 2 and cpu.xcr0 >> n & 1:  # enabled => inside the size for the current XCR0
            assert comp["offset"] + comp["size"] <= cpu.xsave_size, (n, comp)
    for n in range(2, 64):
        if cpu.xcr0_supported >> n & 1:
            assert n in user, f"supported component {n} missing from the layout"


def test_apx_available(apx_probe):
    """APX (R16-R31) can be tested through KVM here; the reason names every missing piece."""
    bank = apx_probe.bank("apx")
    if not bank.kvm_runnable:
        apx_skip_or_fail(f"apx: {bank.reason}")
    assert apx_probe.cpu.apx
    assert apx_probe.kvm.supported_xcr0 >> 19 & 1


@pytest.mark.parametrize("name", [b for b in BANK_ORDER if b != "apx"])
def test_stand_in_bank_available(apx_probe, name):
    bank = apx_probe.bank(name)
    if not bank.kvm_runnable:
        # Stand-in banks only stand in for APX: their absence is a skip even in lab mode.
        pytest.skip(f"{name}: {bank.reason}")
    assert apx_probe.kvm.supported_xcr0 & bank.xcr0_mask == bank.xcr0_mask
