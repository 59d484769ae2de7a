"""CPU profiles (--apx-cpu): the guest CPU a profile gives, on real KVM and QEMU, and the
suite's verdicts under every profile this host can provide.

Expected bits are written out from the SDM's CPUID tables, not computed by the code under
test.  The matrix at the end runs the shipped suite once per profile in a child pytest
and holds the outcomes against the host profile's: a profile only takes away, so nothing
may fail, nothing that skips under `host` may pass, and every skip names its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from apx_tests import profiles
from apx_tests.cases import CaseRunner
from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.kvm.system import CpuidEntry, KvmUnavailable
from apx_tests.kvm.vmm import guest_cpuid
from apx_tests.profiles import PROFILES, exclusion, qemu_cpu, restrict_cpuid, unavailable
from apx_tests.xsave import BANKS

# Leaf 1 ECX with XSAVE(26), OSXSAVE(27), AVX(28), FMA(12), F16C(29), SSE4.2(20).
LEAF1_ECX = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29) | (1 << 20)
# Leaf 7.0 EBX with AVX2(5), AVX512F(16), AVX512BW(30), BMI2(8); ECX with PKU(3).
LEAF7_EBX = (1 << 5) | (1 << 16) | (1 << 30) | (1 << 8)


def test_sse_profile_clears_avx_and_avx512_but_keeps_the_rest():
    sse = PROFILES["sse"]
    _, _, ecx, _ = restrict_cpuid(sse, 1, 0, (0, 0, LEAF1_ECX, 0))
    assert ecx == (1 << 26) | (1 << 27) | (1 << 20)
    _, ebx, ecx7, _ = restrict_cpuid(sse, 7, 0, (0, LEAF7_EBX, 1 << 3, 0))
    assert ebx == 1 << 8 and ecx7 == 1 << 3  # BMI2 and PKU are not vector state


def test_avx2_profile_keeps_avx_and_clears_avx512_and_apx():
    avx2 = PROFILES["avx2"]
    assert restrict_cpuid(avx2, 1, 0, (0, 0, LEAF1_ECX, 0))[2] == LEAF1_ECX
    assert restrict_cpuid(avx2, 7, 0, (0, LEAF7_EBX, 0, 0))[1] == (1 << 5) | (1 << 8)
    assert restrict_cpuid(avx2, 7, 1, (0, 0, 0, 1 << 21))[3] == 0


def test_leaf_d_limited_to_the_profile():
    avx2 = PROFILES["avx2"]
    # Sapphire Rapids-like leaf 0xD.0: XCR0 0x602e7.
    assert restrict_cpuid(avx2, 0xD, 0, (0x602E7, 0x988, 0x2B00, 0)) == (0x207, 0x988, 0x2B00, 0)
    assert restrict_cpuid(avx2, 0xD, 7, (1024, 1664, 0, 0)) == (0, 0, 0, 0)     # Hi16_ZMM gone
    assert restrict_cpuid(avx2, 0xD, 2, (256, 576, 0, 0)) == (256, 576, 0, 0)    # AVX stays
    assert restrict_cpuid(PROFILES["host"], 0xD, 7, (1024, 1664, 0, 0)) == (1024, 1664, 0, 0)


def test_guest_cpuid_max_size_follows_the_profile():
    supported = [CpuidEntry(0xD, 0, 1, 0xE7, 0x988, 0xA80, 0), CpuidEntry(0xD, 2, 1, 256, 576, 0, 0),
                 CpuidEntry(0xD, 7, 1, 1024, 1664, 0, 0), CpuidEntry(1, 0, 0, 0, 0, LEAF1_ECX, 0)]
    entries = {(e.function, e.index): e for e in guest_cpuid(supported, 0x7, PROFILES["avx2"])}
    assert entries[(0xD, 0)].regs[0] == 0x7 and entries[(0xD, 0)].regs[2] == 576 + 256
    assert entries[(0xD, 7)].regs == (0, 0, 0, 0)


def test_qemu_cpu_names_only_features_this_qemu_knows():
    known = frozenset({"avx512f", "avx512bw", "amx-tile"})
    assert qemu_cpu("max", PROFILES["avx2"], known) == "max,-avx512f,-avx512bw,-amx-tile"
    assert qemu_cpu("max", PROFILES["host"], known) == "max"


def test_reasons_name_the_profile_and_the_bits():
    assert unavailable(PROFILES["avx512"], 0x207, "KVM") == \
        "CPU profile avx512 (--apx-cpu) needs XCR0 bits 5-7 (opmask, zmm_hi256, hi16_zmm): KVM offers 0x207"
    assert unavailable(PROFILES["avx512"], 0x2E7, "KVM") is None
    assert exclusion(PROFILES["avx2"], BANKS["hi16_zmm"].xcr0_mask) == \
        "CPU profile avx2 (--apx-cpu) excludes XCR0 bits 5-7 (opmask, zmm_hi256, hi16_zmm)"
    assert exclusion(PROFILES["avx2"], BANKS["ymm"].xcr0_mask) is None
    assert exclusion(PROFILES["sse"], BANKS["apx"].xcr0_mask) == "CPU profile sse (--apx-cpu) excludes XCR0 bit 19 (apx)"


# --- on this host's KVM -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvm_hosts():
    hosts = {}
    try:
        for name in ("host", "sse"):
            hosts[name] = KvmHost(profile=PROFILES[name])
    except KvmUnavailable as exc:
        pytest.skip(f"KVM unavailable: {exc}")
    yield hosts
    for host in hosts.values():
        host.close()


def _load_ymm(host: KvmHost):
    """Boot the ymm payload on `host`'s guest CPU and run it to the point where it has
    loaded ymm0-15 (stage LOADED): the exit, or the GuestError that stopped it."""
    from apx_tests.guests import protocol
    from apx_tests.guests.build import build_payload
    from apx_tests.kvm.vmm import MAILBOX, GuestError, MicroVm
    bank = BANKS["ymm"]
    with MicroVm(host.kvm, host.guest_cpu) as vm:
        vm.boot(build_payload("ymm").code, protocol.pack_mailbox_header(bank_bytes=bank.size))
        vm.run()
        vm.write(MAILBOX + protocol.LOAD_AREA, bank.pack(bank.pattern(1)))
        vm.release(protocol.STAGE_STARTED)
        try:
            return vm.run()
        except GuestError as exc:
            return exc


def test_kvm_guest_under_sse_cannot_use_avx(kvm_hosts):
    """Under `sse` the guest runs with XCR0 = x87|SSE (plus PKRU where KVM has it), so the
    ymm payload's first vmovdqu raises #UD (no IDT: the VM shuts down) where the same
    payload under `host` loads its registers.  (A standard KVM also refuses KVM_SET_XCRS
    with AVX, as guest CPUID leaf 0xD now lacks it; kvm_pvm was seen to accept it.)"""
    from apx_tests.kvm.system import kvm_flavour
    host, sse = kvm_hosts["host"], kvm_hosts["sse"]
    assert sse.guest_cpu.xcr0 & ~(1 << 9) == 0x3
    if not host.supported_xcr0 & 0x4:
        pytest.skip(f"KVM supported XCR0 {host.supported_xcr0:#x} has no AVX to take away")
    loaded = _load_ymm(host)
    assert getattr(loaded, "kind", None) == "sync" and loaded.value == 1, loaded
    if kvm_flavour() == "kvm_pvm":
        pytest.skip("kvm_pvm runs guest CPL3 code with the host's XCR0: a guest XCR0 without AVX "
                    "does not make vmovdqu #UD there (measured); the profile still limits what runs")
    refused = _load_ymm(sse)
    assert "SHUTDOWN" in str(refused) and "last stage 0" in str(refused), refused


def test_kvm_guest_xcr0_is_the_profiles(kvm_hosts):
    """KVM_GET_XCRS after boot: the XCR0 our VMM gave the guest is KVM's supported XCR0
    limited by the profile (and without AMX, which needs a permission we never ask)."""
    from apx_tests.guests import protocol
    from apx_tests.guests.build import build_payload
    from apx_tests.kvm.vmm import MicroVm
    for name, host in kvm_hosts.items():
        with MicroVm(host.kvm, host.guest_cpu) as vm:
            vm.boot(build_payload("xmm").code, protocol.pack_mailbox_header(bank_bytes=256))
            xcrs = vm.vcpu.get_xcrs()
            xcr0 = next(x.value for x in xcrs.xcrs[: xcrs.nr_xcrs] if x.xcr == 0)
        want = host.supported_xcr0 & ~0x60000 & (PROFILES[name].xcr0)
        assert xcr0 == want, (name, hex(xcr0), hex(want))
    assert kvm_hosts["sse"].guest_cpu.xcr0 & 0x4 == 0


def test_kvm_profile_reasons_keep_the_hosts_own(kvm_hosts):
    """A bank the host lacks keeps the host's reason under a profile, with the profile's added."""
    host_reason = KvmBackend(kvm_hosts["host"]).unavailable_reason(BANKS["apx"])
    sse_reason = KvmBackend(kvm_hosts["sse"]).unavailable_reason(BANKS["apx"])
    assert host_reason and sse_reason.startswith("CPU profile sse (--apx-cpu) excludes XCR0 bit 19 (apx)")
    assert sse_reason.endswith(host_reason)


# --- the suite under every profile -------------------------------------------------------------

MATRIX_BACKENDS = ("kvm", "qemu-kvm", "qemu-tcg")


def _suite_outcomes(tmp_path, profile: str) -> dict[str, tuple[str, str]]:
    """case id -> (outcome, message) from a child `pytest -m apx` under --apx-cpu PROFILE."""
    junit = tmp_path / f"{profile}.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "apx", "--pyargs", "apx_tests.suite.test_scenarios",
            "-p", "no:cacheprovider", "-q", f"--apx-cpu={profile}", f"--junitxml={junit}",
            *(f"--apx-backend={b}" for b in MATRIX_BACKENDS)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-2000:]
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name").split("[", 1)[1].rstrip("]")
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                out[name] = ({"skipped": "skip"}.get(kind, "fail"), node.get("message", ""))
                break
        else:
            out[name] = ("pass", "")
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiles")
    return {name: _suite_outcomes(tmp, name) for name in PROFILES}


@pytest.mark.parametrize("name", [n for n in PROFILES if n != "host"])
def test_suite_under_profile_has_no_failure_and_only_takes_away(matrix, name):
    host, under = matrix["host"], matrix[name]
    assert set(under) == set(host)  # the same cases exist under every profile
    failures = {case: msg for case, (outcome, msg) in under.items() if outcome == "fail"}
    assert not failures and not [c for c, (o, m) in host.items() if o == "fail"], failures
    marker = f"CPU profile {name} (--apx-cpu)"
    for case, (outcome, message) in under.items():
        host_outcome, host_message = host[case]
        bank = next(b for b in BANKS if f"-{b}-" in f"-{case}-")
        if PROFILES[name].excluded(BANKS[bank].xcr0_mask):
            # A bank the profile takes away never runs under it, whatever the host has.
            assert outcome == "skip" and f"{marker} excludes" in message, (case, message)
        if host_outcome == "skip":
            # What the host cannot run stays a skip, for the host's reason or the profile's.
            reason = host_message.split(": ", 1)[1]
            assert outcome == "skip" and (reason in message or marker in message), (case, message)
        elif outcome == "skip":
            # What ran under `host` may only skip because of the profile.
            assert marker in message, (case, message)


def test_host_profile_matches_a_plain_run(matrix):
    """--apx-cpu host is the default: its outcomes are a plain run's (no profile text)."""
    assert not any("--apx-cpu" in message for _, message in matrix["host"].values())


def test_profiles_this_host_can_provide_run_their_banks(matrix):
    """A profile KVM can provide runs every KVM case whose bank it allows and the host has."""
    with CaseRunner(profile="host") as runner:
        kvm, error = runner.backend("kvm")
        if kvm is None:
            pytest.skip(error)
        supported = kvm.host.supported_xcr0
    for name, profile in PROFILES.items():
        if supported & profile.requires != profile.requires:
            assert all(o == "skip" and f"CPU profile {name}" in m
                       for c, (o, m) in matrix[name].items() if c.startswith("kvm-")), name
            continue
        for case, (outcome, message) in matrix[name].items():
            bank = case.split("-")[1]
            if case.startswith("kvm-") and matrix["host"][case][0] == "pass" and not profile.excluded(BANKS[bank].xcr0_mask):
                assert outcome == "pass", (name, case, message)
