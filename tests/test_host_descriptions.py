"""Host descriptions (tests/hosts/*.json): loading, the XSAVE layout each gives, and the banks
the probe would run on each host.

The expected numbers below are written out by hand from the sources the files name (CPUID
dumps, the Intel SDM / APX spec table of /work/shared/reference/apx-facts.md, Linux's and KVM's
rules), not computed with apx_tests; a wrong file or a wrong layout/probe rule makes them fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apx_tests import hostcpu
from apx_tests import probe as probe_mod
from apx_tests.hostdesc import HostDescription, HostDescriptionError, KvmDescription, record_this_host
from apx_tests.probe import BankFacts, cpu_facts_from_description, kvm_facts_from_description, \
    probe_from_description

HOSTS = Path(__file__).parent / "hosts"
FILES = sorted(HOSTS.glob("*.json"))
NAMES = [f.stem for f in FILES]

ALL_BANKS = {"apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87", "pkru"}

# Intel standard-format offsets/sizes (apx-facts.md table, Intel SDM vol. 1 13-1; APX spec).
INTEL = {2: (576, 256), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024), 9: (2688, 8),
         17: (2752, 64), 18: (2816, 8192), 19: (960, 128)}
MPX = {3: (960, 64), 4: (1024, 64)}

# name -> what the file must give.  comps: user components >= 2 -> (standard offset, size);
# size: CPUID.(0xD,0).ECX; kvm_layout_xcr0: leaf 0xD.0 of KVM's supported CPUID (AMX filtered
# without ARCH_REQ_XCOMP_GUEST_PERM); runnable: banks bank_facts() says can run on KVM there.
EXPECTED = {
    "amd-zen2": dict(
        vendor="AuthenticAMD", fms=(0x17, 0x31, 0), host_xcr0=0x7, cpu_xcr0=0x207, size=0x380, xss=0,
        comps={2: (576, 256), 9: (0x340, 0x40)},  # Zen 2's PKRU: 64 bytes at 832 (dump + qemu-devel)
        kvm_xcr0=0x7, kvm_layout_xcr0=0x7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"ymm", "xmm", "x87"}),
    "amd-zen3": dict(
        vendor="AuthenticAMD", fms=(0x19, 0x21, 0), host_xcr0=0x207, cpu_xcr0=0x207, size=0x988, xss=0x1800,
        comps={2: (576, 256), 9: (0x980, 8)},
        kvm_xcr0=0x207, kvm_layout_xcr0=0x207, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"ymm", "xmm", "x87", "pkru"}),
    "amd-zen4": dict(
        vendor="AuthenticAMD", fms=(0x19, 0x11, 1), host_xcr0=0x2E7, cpu_xcr0=0x2E7, size=0x988, xss=0x1800,
        comps={2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024), 9: (0x980, 8)},  # packed, no MPX hole
        kvm_xcr0=0x2E7, kvm_layout_xcr0=0x2E7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable=ALL_BANKS - {"apx"}),
    "intel-sapphire-rapids": dict(
        vendor="GenuineIntel", fms=(6, 143, 4), host_xcr0=0x602E7, cpu_xcr0=0x602E7, size=11008,
        xss=(1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 15),  # PT PASID CET_U CET_S UINTR LBR
        comps={n: INTEL[n] for n in (2, 5, 6, 7, 9, 17, 18)},
        kvm_xcr0=0x602E7, kvm_layout_xcr0=0x2E7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable=ALL_BANKS - {"apx"}),
    "intel-diamond-rapids": dict(
        vendor="GenuineIntel", fms=(19, 1, 0), host_xcr0=0xE02E7, cpu_xcr0=0xE02E7, size=11008, xss=0x1800,
        comps={n: INTEL[n] for n in (2, 5, 6, 7, 9, 17, 18, 19)},
        kvm_xcr0=0xE02E7, kvm_layout_xcr0=0x802E7, xsave2=4096, apx_cpu=True, kvm_apx=True,
        runnable=ALL_BANKS),
    # Recorded on a machine of our kind (2026-12-02): CPUID.(0xD,0).EAX 0x600e7 (no PKRU, no
    # MPX), XSS 0 (CPUID.(0xD,1).ECX), PKU absent (7.0 ECX[3] = 0); family 6 model 0xA7.
    "kind-intel-xeon-pvm": dict(
        vendor="GenuineIntel", fms=(6, 167, 1), host_xcr0=0x600E7, cpu_xcr0=0x600E7, size=11008, xss=0,
        comps={n: INTEL[n] for n in (2, 5, 6, 7, 17, 18)},
        kvm_xcr0=0xE7, kvm_layout_xcr0=0xE7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87"}),
    "kind-amd-epyc-pvm": dict(
        vendor="AuthenticAMD", fms=(25, 1, 1), host_xcr0=0x207, cpu_xcr0=0x207, size=2440, xss=0x1800,
        comps={2: (576, 256), 9: (2432, 8)},
        kvm_xcr0=0x207, kvm_layout_xcr0=0x207, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"ymm", "xmm", "x87", "pkru"}),
    # Zen 5 (family 26): AVX-512 at Intel's offsets, no PKU (leaf 7 ECX[3] = 0), so no
    # component 9; seen as a machine of our kind on 2026-12-02.
    "kind-amd-epyc-zen5-pvm": dict(
        vendor="AuthenticAMD", fms=(26, 2, 1), host_xcr0=0xE7, cpu_xcr0=0xE7, size=2432, xss=0x1800,
        comps={2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024)},
        kvm_xcr0=0xE7, kvm_layout_xcr0=0xE7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87"}),
    "kind-amd-epyc-pvm-xcr0-7": dict(
        vendor="AuthenticAMD", fms=(25, 1, 1), host_xcr0=0x7, cpu_xcr0=0x7, size=832, xss=0x1800,
        comps={2: (576, 256)},
        kvm_xcr0=0x7, kvm_layout_xcr0=0x7, xsave2=4096, apx_cpu=False, kvm_apx=False,
        runnable={"ymm", "xmm", "x87"}),
}


@pytest.fixture(scope="module")
def descs() -> dict[str, HostDescription]:
    return {f.stem: HostDescription.load(f) for f in FILES}


def user_comps(layout) -> dict[int, tuple[int, int]]:
    return {n: (c.offset, c.size) for n, c in layout.components.items() if n >= 2 and not c.supervisor}


def test_every_file_has_expectations_and_the_required_kinds_exist():
    assert set(NAMES) == set(EXPECTED), "each tests/hosts file needs its expected facts here (and vice versa)"
    assert {"amd-zen2", "amd-zen3", "amd-zen4", "intel-sapphire-rapids", "intel-diamond-rapids",
            "kind-amd-epyc-pvm", "kind-intel-xeon-pvm"} <= set(NAMES)


# --- loading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_file_round_trips(path):
    raw = json.loads(path.read_text())
    desc = HostDescription.load(path)
    assert desc.name == path.stem
    assert desc.to_dict() == raw  # the file is in the canonical form to_dict() writes
    again = HostDescription.from_dict(json.loads(desc.to_json()), str(path))
    assert again == desc
    assert again.kvm == desc.kvm


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_sources_say_where_the_values_came_from(path):
    desc = HostDescription.load(path)
    text = " ".join(desc.sources).lower()
    assert desc.sources and all(len(s) > 40 for s in desc.sources), desc.sources
    # Each description names a dump, a model, a spec/kernel rule or a recording.
    assert any(word in text for word in ("instlatx64", "qemu", "recorded on", "reconstructed")), text
    if desc.kvm is not None:
        assert "kvm" in text
    if "recorded on" not in text:
        # Anything not dumped or recorded is said to be derived (or reconstructed) and from what.
        assert "derived" in text or "reconstructed" in text


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_cpu_identity(path):
    desc, want = HostDescription.load(path), EXPECTED[path.stem]
    assert desc.vendor == want["vendor"]
    assert desc.family_model_stepping == want["fms"]
    assert desc.host_xcr0 == want["host_xcr0"]
    assert desc.apx_cpu is want["apx_cpu"]


# --- layouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_host_layout(path):
    desc, want = HostDescription.load(path), EXPECTED[path.stem]
    layout = desc.layout()
    assert user_comps(layout) == want["comps"]
    assert layout.supported_xcr0 == want["cpu_xcr0"]
    assert layout.standard_size == want["size"]
    assert layout.supported_xss == want["xss"]
    # the host kernel can only enable what the CPU supports, and always x87/SSE here
    assert desc.host_xcr0 & ~layout.supported_xcr0 == 0 and desc.host_xcr0 & 0x3 == 0x3


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_kvm_facts_and_layout(path):
    desc, want = HostDescription.load(path), EXPECTED[path.stem]
    kvm = desc.kvm
    assert isinstance(kvm, KvmDescription)
    assert (kvm.supported_xcr0, kvm.xsave2_size, kvm.api_version) == (want["kvm_xcr0"], want["xsave2"], 12)
    assert kvm.apx_cpu is want["kvm_apx"]
    # KVM cannot offer a guest what the host kernel did not enable
    assert kvm.supported_xcr0 & ~desc.host_xcr0 == 0
    layout = kvm.layout()
    assert layout.supported_xcr0 == want["kvm_layout_xcr0"]
    # KVM passes the host's sub-leaves through: the same offsets and sizes for what it lists
    host = user_comps(desc.layout())
    assert user_comps(layout) == {n: host[n] for n in user_comps(layout)}
    # ... and its 0xD.0 size is the end of the last component it lists (xstate_required_size)
    assert layout.standard_size == max(off + size for off, size in user_comps(layout).values())
    entries = kvm.entries()
    assert [(e.function, e.index) for e in entries] == sorted(kvm.supported_cpuid)
    assert all(e.flags == 1 for e in entries if e.function in (7, 0xD))


def test_dmr_xsave_layout_with_apx_and_amx(descs):
    layout = descs["intel-diamond-rapids"].layout()
    apx = layout.component("apx")
    # APX lives where MPX's BNDREGS+BNDCSR were: 960..1087
    assert (apx.offset, apx.end) == (MPX[3][0], MPX[4][0] + MPX[4][1]) == (960, 1088)
    assert not layout.has(3) and not layout.has(4)
    assert not apx.aligned and not apx.supervisor
    assert layout.component("xtilecfg").aligned and layout.component("xtiledata").aligned
    assert layout.standard_size_for(0x3) == 576
    assert layout.standard_size_for(0x80003) == 1088        # APX alone ends at 960 + 128
    assert layout.standard_size_for(0x802E7) == 2696        # PKRU 2688 + 8 is last without AMX
    assert layout.standard_size_for(0xE02E7) == 11008       # XTILEDATA 2816 + 8192
    # compacted: 576 avx 832 opmask 896 zmm_hi256 1408 hi16 2432 pkru 2440 -> 2496 (64-aligned)
    # xtilecfg 2560 xtiledata 10752 apx 10880
    offs = layout.compacted_offsets((1 << 63) | 0xE02E7)
    assert offs == {0: 0, 1: 160, 2: 576, 5: 832, 6: 896, 7: 1408, 9: 2432, 17: 2496, 18: 2560, 19: 10752}
    assert layout.compacted_size(0xE02E7) == 10880
    # with CET_U (16) and CET_S (24) after PKRU: 2440 + 40 = 2480, still aligned up to 2496
    with_xss = layout.compacted_offsets(0xE02E7 | 0x1800)
    assert (with_xss[11], with_xss[12], with_xss[17], with_xss[19]) == (2440, 2456, 2496, 10752)
    # the file's CPUID.(0xD,1).EBX is that compacted size of XCR0|XSS
    assert descs["intel-diamond-rapids"].cpuid(0xD, 1)[1] == 10880
    # APX's XSAVE area without AMX permission (what KVM's leaf 0xD shows apx-tests)
    kvm = descs["intel-diamond-rapids"].kvm.layout()
    assert user_comps(kvm) == {n: INTEL[n] for n in (2, 5, 6, 7, 9, 19)}
    assert kvm.standard_size == 2696


def _with_mpx(table: dict[str, list[str]]) -> dict[str, list[str]]:
    table = copy.deepcopy(table)
    eax = int(table["0xd.0"][0], 16) | 0x18
    table["0xd.0"][0] = f"{eax:#010x}"
    table["0xd.3"] = ["0x00000040", "0x000003c0", "0x00000000", "0x00000000"]
    table["0xd.4"] = ["0x00000040", "0x00000400", "0x00000000", "0x00000000"]
    return table


def test_apx_with_mpx_is_rejected_naming_the_file_and_key():
    path = HOSTS / "intel-diamond-rapids.json"
    data = json.loads(path.read_text())
    data["cpuid"] = _with_mpx(data["cpuid"])
    with pytest.raises(HostDescriptionError) as err:
        HostDescription.from_dict(data, str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: cpuid: leaf 0xD: ") and "APX (bit 19) and MPX (bit 3 4)" in msg
    assert "\n" not in msg
    data = json.loads(path.read_text())
    data["kvm"]["supported_cpuid"] = _with_mpx(data["kvm"]["supported_cpuid"])
    with pytest.raises(HostDescriptionError, match=r": kvm\.supported_cpuid: leaf 0xD: .*APX .*MPX"):
        HostDescription.from_dict(data, str(path))


def test_mpx_without_apx_and_apx_without_mpx_are_fine(descs):
    spr = descs["intel-sapphire-rapids"].to_dict()
    spr["cpuid"] = _with_mpx(spr["cpuid"])  # a Skylake-like part: MPX, no APX
    layout = HostDescription.from_dict(spr).layout()
    assert {n: user_comps(layout)[n] for n in (3, 4)} == MPX
    assert not layout.has("apx")
    assert not descs["intel-diamond-rapids"].layout().has(3)


# --- banks: what the probe would run or skip on each host ---------------------------------------

@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_runnable_banks(path):
    desc, want = HostDescription.load(path), EXPECTED[path.stem]
    banks = probe_mod.bank_facts(cpu_facts_from_description(desc), kvm_facts_from_description(desc), desc.cpuid)
    runnable = {name for name, b in banks.items() if b.kvm_runnable}
    assert runnable == want["runnable"]
    for name, b in banks.items():
        assert (b.reason is None) == b.kvm_runnable, b
        assert b.reason is None or "\n" not in b.reason
    assert probe_from_description(desc).banks == banks


def _banks(descs, name) -> dict[str, BankFacts]:
    return probe_from_description(descs[name]).banks


def test_sapphire_rapids_skips_apx_naming_apx_f_and_xcr0_bit_19(descs):
    banks = _banks(descs, "intel-sapphire-rapids")
    assert banks["apx"].reason == ("CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0); host XCR0 0x602e7 lacks "
                                   "bit 19 (APX); KVM supported XCR0 0x602e7 lacks bit 19 (APX)")
    assert banks["hi16_zmm"].kvm_runnable and banks["opmask"].kvm_runnable


def test_zen3_skips_avx512_banks_naming_avx512f(descs):
    banks = _banks(descs, "amd-zen3")
    for name in ("hi16_zmm", "zmm_hi256", "opmask"):
        assert banks[name].reason.startswith("CPU lacks AVX512F (CPUID.(EAX=7,ECX=0):EBX[16]=0)"), banks[name]
        assert "host XCR0 0x207 lacks bits 5-7" in banks[name].reason
    assert banks["pkru"].kvm_runnable  # Zen 3 has PKU, and XCR0 bit 9


def test_zen2_pkru_is_not_runnable_because_the_cpu_lacks_pku(descs):
    # CPUID.(0xD,0) lists PKRU on Zen 2, but PKU is absent, so Linux leaves it off
    assert descs["amd-zen2"].layout().has("pkru")
    assert _banks(descs, "amd-zen2")["pkru"].reason == (
        "CPU lacks PKU (CPUID.(EAX=7,ECX=0):ECX[3]=0); host XCR0 0x7 lacks bit 9 (PKRU); "
        "KVM supported XCR0 0x7 lacks bit 9 (PKRU)")


def test_diamond_rapids_runs_apx(descs):
    banks = _banks(descs, "intel-diamond-rapids")
    assert banks["apx"].kvm_runnable and banks["apx"].reason is None
    assert descs["intel-diamond-rapids"].kvm.apx_cpu


def test_intel_kind_skips_pkru_and_apx_on_its_kvm(descs):
    banks = _banks(descs, "kind-intel-xeon-pvm")
    assert banks["pkru"].reason == ("CPU lacks PKU (CPUID.(EAX=7,ECX=0):ECX[3]=0); host XCR0 0x600e7 lacks "
                                    "bit 9 (PKRU); KVM supported XCR0 0xe7 lacks bit 9 (PKRU)")
    assert banks["apx"].reason.endswith("KVM supported XCR0 0xe7 lacks bit 19 (APX)")


def test_pku_cpu_whose_kernel_left_pkru_off_names_only_xcr0(descs):
    """A CPU with PKU whose kernel did not enable it (CR4.PKE clear, XCR0[9] = 0): the CPU is
    not blamed, only the two XCR0s are."""
    data = descs["kind-intel-xeon-pvm"].to_dict()
    eax, ebx, ecx, edx = data["cpuid"]["0x7.0"]
    data["cpuid"]["0x7.0"] = [eax, ebx, f"0x{int(ecx, 16) | 1 << 3:08x}", edx]
    desc = HostDescription.from_dict(data)
    assert _banks({"x": desc}, "x")["pkru"].reason == (
        "host XCR0 0x600e7 lacks bit 9 (PKRU); KVM supported XCR0 0xe7 lacks bit 9 (PKRU)")


def test_dmr_without_apx_in_kvm_names_only_kvm(descs):
    """The CPU and kernel have APX but a KVM without the APX series does not: only KVM is named."""
    data = descs["intel-diamond-rapids"].to_dict()
    data["kvm"]["supported_xcr0"] = "0x602e7"
    desc = HostDescription.from_dict(data)
    assert _banks({"x": desc}, "x")["apx"].reason == "KVM supported XCR0 0x602e7 lacks bit 19 (APX)"


def test_description_without_kvm(descs):
    data = descs["amd-zen4"].to_dict()
    data["kvm"] = None
    desc = HostDescription.from_dict(data, "zen4-no-kvm.json")
    banks = probe_from_description(desc).banks
    assert not any(b.kvm_runnable for b in banks.values())
    assert banks["x87"].reason == "KVM unavailable (host description amd-zen4 has no KVM)"


def test_probe_from_description_reports_like_the_live_probe(descs):
    p = probe_from_description(descs["intel-diamond-rapids"])
    lines = p.report_lines()
    assert "cpu: GenuineIntel family 19 model 1 stepping 0" in lines[0]
    assert "cpu APX_F (CPUID.(7,1).EDX[21]): yes" in lines
    assert "host XCR0: 0xe02e7" in lines
    assert "kvm supported CPUID APX_F: yes" in lines
    assert "bank apx: runnable on KVM" in lines
    assert p.cpu.layout["19"] == {"name": "apx", "offset": 960, "size": 128, "supervisor": False}
    json.dumps(p.to_dict())


# --- malformed files: one line naming the file and the key ------------------------------------

def _mutations():
    def drop(key):
        return lambda d: d.pop(key)

    def setter(path, value):
        def f(d):
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value
        return f

    return [
        ("missing-cpuid", drop("cpuid"), "cpuid: missing"),
        ("unknown-key", setter(["cpu"], {}), "cpu: unknown key"),
        ("bad-cpuid-key", setter(["cpuid", "0xd-1"], ["0x0"] * 4), "cpuid.0xd-1: a CPUID key is 0xLEAF.SUBLEAF"),
        ("three-registers", setter(["cpuid", "0xd.2"], ["0x100", "0x240", "0x0"]),
         "cpuid.0xd.2: expected [eax, ebx, ecx, edx]"),
        ("bad-hex", setter(["cpuid", "0x1.0"], ["0x00a20f10", "0x0", "0xzz", "0x0"]),
         "cpuid.0x1.0[2]: expected an integer or a \"0x...\" hex string"),
        ("too-wide", setter(["cpuid", "0x1.0"], ["0x100000000", "0x0", "0x0", "0x0"]),
         "cpuid.0x1.0[0]: '0x100000000' does not fit in 32 bits"),
        ("duplicate", setter(["cpuid", "0xd.0x9"], ["0x8", "0x980", "0x0", "0x0"]), "cpuid.0xd.0x9: CPUID 0xd.9 is given twice"),
        ("xcr0-unsupported", setter(["host_xcr0"], "0x80207"), "host_xcr0: 0x80207 enables 0x80000"),
        ("xcr0-decimal-string", setter(["host_xcr0"], "519"), "host_xcr0: expected an integer or a \"0x...\" hex string"),
        ("kvm-missing-xcr0", lambda d: d["kvm"].pop("supported_xcr0"), "kvm.supported_xcr0: missing"),
        ("kvm-small-xsave2", setter(["kvm", "xsave2_size"], 512), "kvm.xsave2_size: 512 is below 4096"),
        ("overlap", setter(["cpuid", "0xd.9"], ["0x8", "0x300", "0x0", "0x0"]),
         "cpuid: leaf 0xD: component 2 avx (576..831) overlaps component 9 pkru (768..775)"),
        ("no-sources", setter(["sources"], []), "sources: expected a non-empty list"),
        ("bad-name", setter(["name"], "Zen 3"), "name: expected a lower-case name"),
        ("no-leaf-1", lambda d: d["cpuid"].pop("0x1.0"), "cpuid.0x1.0: missing"),
    ]


@pytest.mark.parametrize("mutate, message", [m[1:] for m in _mutations()], ids=[m[0] for m in _mutations()])
def test_malformed_description_is_one_line_naming_file_and_key(tmp_path, mutate, message):
    data = json.loads((HOSTS / "amd-zen3.json").read_text())
    mutate(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HostDescriptionError) as err:
        HostDescription.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {message}"), msg
    assert "\n" not in msg


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"name": "x",\n  "title": }')
    with pytest.raises(HostDescriptionError, match=r"^.*x\.json: not JSON: Expecting value at line 2 column 12$"):
        HostDescription.load(path)
    with pytest.raises(HostDescriptionError, match=r"nope\.json: No such file or directory$"):
        HostDescription.load(tmp_path / "nope.json")
    path.write_text("[]")
    with pytest.raises(HostDescriptionError, match=r"x\.json: expected a JSON object, got list$"):
        HostDescription.load(path)


def test_subleaf_keys_are_decimal_or_0x():
    from apx_tests.hostdesc import cpuid_key, parse_cpuid_key
    assert parse_cpuid_key("0xd.19") == parse_cpuid_key("0xd.0x13") == parse_cpuid_key("0xD.19") == (0xD, 19)
    assert parse_cpuid_key("0x1") == (1, 0)
    assert cpuid_key(0xD, 19) == "0xd.19" and cpuid_key(0x80000001, 0) == "0x80000001.0"


# --- this machine ---------------------------------------------------------------------------

def _live_differences(desc: HostDescription) -> list[str]:
    from apx_tests.xsave import Layout
    diffs = []
    live_layout = Layout.from_cpuid(hostcpu.cpuid, "host CPUID")
    if live_layout != desc.layout():
        diffs.append(f"layout {user_comps(live_layout)} size {live_layout.standard_size} xss "
                     f"{live_layout.supported_xss:#x} != {user_comps(desc.layout())} size "
                     f"{desc.layout().standard_size} xss {desc.layout().supported_xss:#x}")
    xcr0 = hostcpu.xgetbv(0)
    if xcr0 != desc.host_xcr0:
        diffs.append(f"XCR0 {xcr0:#x} != {desc.host_xcr0:#x}")
    return diffs


def test_this_host_matches_its_kind_description(descs):
    """A host whose CPU (vendor, family, model) is described must look like one of those
    descriptions (leaf-0xD layout and XCR0). Only recorded descriptions make a mismatch a
    failure: a derived or reconstructed one is not a measurement of a machine."""
    vendor = hostcpu.vendor()
    family, model, _ = hostcpu.family_model_stepping(hostcpu.cpuid(1, 0)[0], vendor)
    same_cpu = [d for d in descs.values() if d.vendor == vendor and d.family_model_stepping[:2] == (family, model)]
    if not same_cpu:
        pytest.skip(f"no description in tests/hosts matches this host's CPU ({vendor} family {family} model "
                    f"{model}); record one with `apx-tests probe --describe-host NAME`")
    diffs = {d.name: _live_differences(d) for d in same_cpu}
    if any(not v for v in diffs.values()):
        return
    summary = "; ".join(f"{name}: {', '.join(v)}" for name, v in diffs.items())
    recorded = [d.name for d in same_cpu if any(s.startswith("recorded on") for s in d.sources)]
    if not recorded:
        pytest.skip(f"only derived descriptions match this CPU and none equals it ({summary}); "
                    "record this host with `apx-tests probe --describe-host NAME`")
    pytest.fail(f"this host ({vendor} family {family} model {model}) differs from every description of its "
                f"CPU: {summary}; if it is a new variant of our kind, record it with "
                "`apx-tests probe --describe-host NAME` into tests/hosts")


def test_recording_gives_the_live_probe_facts():
    """record_this_host + the *_from_description helpers agree with probe_cpu/probe_kvm here."""
    desc = record_this_host("this-host", "this host")
    desc = HostDescription.from_dict(desc.to_dict(), "this-host.json")
    live_cpu = probe_mod.probe_cpu()
    cpu = cpu_facts_from_description(desc)
    for name in ("vendor", "family", "model", "stepping", "apx", "avx", "avx512f", "osxsave", "xcr0",
                 "xsave_size", "xsave_max_size", "xcr0_supported", "layout"):
        assert getattr(cpu, name) == getattr(live_cpu, name), name
    live_kvm = probe_mod.probe_kvm()
    kvm = kvm_facts_from_description(desc)
    assert kvm.present == live_kvm.present
    if live_kvm.present:
        for name in ("api_version", "supported_xcr0", "xsave2_size", "apx_cpuid"):
            assert getattr(kvm, name) == getattr(live_kvm, name), name
        assert probe_from_description(desc).banks == probe_mod.bank_facts(live_cpu, live_kvm)
    else:
        assert desc.kvm is None and "KVM: none" in desc.sources[1]
    # leaf 0xD comes out whole: each recorded sub-leaf is the live one, and none of the live
    # non-zero ones is missing
    for sub in range(64):
        assert desc.cpuid(0xD, sub) == hostcpu.cpuid(0xD, sub), f"CPUID.0xD.{sub}"


def test_describe_host_command_prints_a_loadable_description(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apx_tests.cli", "probe", "--describe-host", "lab-1"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    path = tmp_path / "lab-1.json"
    path.write_text(proc.stdout)
    desc = HostDescription.load(path)
    assert desc.name == "lab-1"
    assert desc.sources[0].startswith("recorded on ") and "--describe-host lab-1" in desc.sources[0]
    # leaf 1 EBX holds the APIC ID of whichever CPU ran it: compare the rest
    eax, _, ecx, edx = hostcpu.cpuid(1, 0)
    assert (desc.cpuid(1, 0)[0], desc.cpuid(1, 0)[2], desc.cpuid(1, 0)[3]) == (eax, ecx, edx)
    assert desc.cpuid(0xD, 0)[0] == hostcpu.cpuid(0xD, 0)[0] and desc.host_xcr0 == hostcpu.xgetbv(0)
    assert (desc.kvm is not None) == os.path.exists("/dev/kvm")


def test_describe_host_bad_name_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "apx_tests.cli", "probe", "--describe-host", "Lab 1"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("apx-tests probe: --describe-host Lab 1: host description Lab 1: name: expected a "
                           "lower-case name like amd-zen3, got 'Lab 1'\n")
