"""Which KVM cases run, and why not, on the hosts of tests/hosts under every CPU profile.

The KVM backend answers from a host description (RecordedKvmHost) exactly as it would on
that host's /dev/kvm, so an AVX-512 Xeon's or an APX lab host's verdicts are exercised
here.  Expected sets and XCR0 values are written out by hand from each description's
facts (its KVM supported XCR0), not computed by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from apx_tests.cases import CaseId, CaseRunner
from apx_tests.hostdesc import HostDescription
from apx_tests.kvm.backend import KvmBackend, RecordedKvmHost
from apx_tests.profiles import PROFILES
from apx_tests.xsave import BANKS
from apx_tests.xsave.xcr0 import xcr0_problem, xcr0_without

HOSTS = Path(__file__).parent / "hosts"
SUITE_BANKS = ("apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87")
AVX512 = {"hi16_zmm", "zmm_hi256", "opmask"}
LEGACY = {"xmm", "x87"}

# description -> profile -> (guest XCR0 our VMM sets, banks that run); None: the profile
# is unavailable there (every case skips, naming what is missing).
EXPECTED = {
    "kind-amd-epyc-pvm": {"host": (0x207, LEGACY | {"ymm"}), "sse": (0x203, LEGACY),
                          "avx2": (0x207, LEGACY | {"ymm"}), "avx512": None},
    "kind-amd-epyc-pvm-xcr0-7": {"host": (0x7, LEGACY | {"ymm"}), "sse": (0x3, LEGACY),
                                 "avx2": (0x7, LEGACY | {"ymm"}), "avx512": None},
    "kind-amd-epyc-zen5-pvm": {"host": (0xE7, LEGACY | {"ymm"} | AVX512), "sse": (0x3, LEGACY),
                               "avx2": (0x7, LEGACY | {"ymm"}), "avx512": (0xE7, LEGACY | {"ymm"} | AVX512)},
    "kind-intel-xeon-pvm": {"host": (0xE7, LEGACY | {"ymm"} | AVX512), "sse": (0x3, LEGACY),
                            "avx2": (0x7, LEGACY | {"ymm"}), "avx512": (0xE7, LEGACY | {"ymm"} | AVX512)},
    "amd-zen3": {"host": (0x207, LEGACY | {"ymm"}), "sse": (0x203, LEGACY),
                 "avx2": (0x207, LEGACY | {"ymm"}), "avx512": None},
    "amd-zen2": {"host": (0x7, LEGACY | {"ymm"}), "sse": (0x3, LEGACY),
                 "avx2": (0x7, LEGACY | {"ymm"}), "avx512": None},
    "amd-zen4": {"host": (0x2E7, LEGACY | {"ymm"} | AVX512), "sse": (0x203, LEGACY),
                 "avx2": (0x207, LEGACY | {"ymm"}), "avx512": (0x2E7, LEGACY | {"ymm"} | AVX512)},
    # AMX (0x60000) is never enabled: it needs a permission request we do not make.
    "intel-sapphire-rapids": {"host": (0x2E7, LEGACY | {"ymm"} | AVX512), "sse": (0x203, LEGACY),
                              "avx2": (0x207, LEGACY | {"ymm"}), "avx512": (0x2E7, LEGACY | {"ymm"} | AVX512)},
    "intel-diamond-rapids": {"host": (0x802E7, LEGACY | {"ymm", "apx"} | AVX512), "sse": (0x203, LEGACY),
                             "avx2": (0x207, LEGACY | {"ymm"}), "avx512": (0x2E7, LEGACY | {"ymm"} | AVX512)},
}


def _host(name: str, profile: str) -> RecordedKvmHost:
    desc = HostDescription.load(HOSTS / f"{name}.json")
    return RecordedKvmHost(desc.kvm, PROFILES[profile], name=f"tests/hosts/{name}.json")


def test_every_description_with_kvm_facts_is_expected():
    with_kvm = {p.stem for p in HOSTS.glob("*.json") if HostDescription.load(p).kvm is not None}
    assert with_kvm == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("profile", list(PROFILES))
def test_runnable_banks_and_guest_xcr0(name, profile):
    host = _host(name, profile)
    backend = KvmBackend(host)
    reasons = {bank: backend.unavailable_reason(BANKS[bank]) for bank in SUITE_BANKS}
    expected = EXPECTED[name][profile]
    if expected is None:
        assert host.profile_unavailable() is not None
        assert all(r and r.startswith(f"CPU profile {profile} (--apx-cpu) needs XCR0") for r in reasons.values()), reasons
        return
    xcr0, runs = expected
    assert host.profile_unavailable() is None
    assert host.guest_cpu.xcr0 == xcr0, hex(host.guest_cpu.xcr0)
    assert {bank for bank, why in reasons.items() if why is None} == runs, reasons
    for bank, why in reasons.items():
        if why is not None and PROFILES[profile].excluded(BANKS[bank].xcr0_mask):
            assert f"CPU profile {profile} (--apx-cpu) excludes XCR0" in why, (bank, why)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("profile", list(PROFILES))
def test_xcr0_cycle_values_are_valid_for_every_bank(name, profile):
    """What xcr0_cycle would set on that host: a valid XCR0 (the Intel kind refused 0xe3)."""
    if EXPECTED[name][profile] is None:
        return
    xcr0 = _host(name, profile).guest_cpu.xcr0
    for bank in SUITE_BANKS:
        value = xcr0_without(xcr0, BANKS[bank].xcr0_mask)
        assert xcr0_problem(value) is None, (name, profile, bank, hex(value))


def test_apx_skip_on_sapphire_rapids_fails_under_lab_mode():
    """The apx cases skip on an AVX-512 host without APX, naming APX_F and XCR0 bit 19, and
    are the ones --apx-require turns into failures (require_applies)."""
    runner = CaseRunner()
    runner._backends["kvm"] = KvmBackend(_host("intel-sapphire-rapids", "host"))
    result = runner.run("kvm-apx-export")
    assert result.outcome == "skip" and result.require_applies
    assert result.message == ("kvm-apx-export: KVM_GET_SUPPORTED_CPUID lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0); "
                              "KVM supported XCR0 0x602e7 lacks 0x80000 (19 apx)")
    assert runner.unavailable(CaseId.parse("kvm-zmm_hi256-import")) is None  # AVX-512 runs there


def test_unavailable_profile_skips_every_case_and_fails_in_lab_mode():
    runner = CaseRunner(profile="avx512")
    runner._backends["kvm"] = KvmBackend(_host("kind-amd-epyc-pvm", "avx512"))
    result = runner.run("kvm-xmm-export")
    assert result.outcome == "skip" and result.require_applies
    assert result.message == ("kvm-xmm-export: CPU profile avx512 (--apx-cpu) needs XCR0 bits 5-7 "
                              "(opmask, zmm_hi256, hi16_zmm): KVM (supported XCR0) offers 0x207")


def test_diamond_rapids_runs_apx_everywhere_the_profile_allows():
    for profile in PROFILES:
        reason = KvmBackend(_host("intel-diamond-rapids", profile)).unavailable_reason(BANKS["apx"])
        assert (reason is None) == (profile == "host"), (profile, reason)


def test_the_probe_asks_the_kvm_backend_and_it_answers_under_a_profile():
    """probe.bank_facts is KvmBackend.facts_unavailable's answer; under a profile that
    answer names the profile as the live backend's unavailable_reason does."""
    from apx_tests import probe as probe_mod
    from apx_tests.probe import cpu_facts_from_description, kvm_facts_from_description

    for name in ("amd-zen2", "intel-sapphire-rapids"):
        desc = HostDescription.load(HOSTS / f"{name}.json")
        cpu, kvm = cpu_facts_from_description(desc), kvm_facts_from_description(desc)
        banks = probe_mod.bank_facts(cpu, kvm, desc.cpuid)
        for bank, facts in banks.items():
            assert facts.reason == KvmBackend.facts_unavailable(BANKS[bank], cpu, kvm, desc.cpuid), bank
        for profile in PROFILES:
            live = KvmBackend(_host(name, profile))
            for bank in ("xmm", "ymm"):
                why = KvmBackend.facts_unavailable(BANKS[bank], cpu, kvm, desc.cpuid, PROFILES[profile])
                # xmm and ymm lack nothing on these hosts: only the profile speaks, in the same words
                assert why == live.unavailable_reason(BANKS[bank]), (name, profile, bank, why)
    zen2 = HostDescription.load(HOSTS / "amd-zen2.json")
    why = KvmBackend.facts_unavailable(BANKS["xmm"], cpu_facts_from_description(zen2),
                                       kvm_facts_from_description(zen2), zen2.cpuid, PROFILES["avx512"])
    assert why == ("CPU profile avx512 (--apx-cpu) needs XCR0 bits 5-7 (opmask, zmm_hi256, hi16_zmm): "
                   "KVM (supported XCR0) offers 0x7")
