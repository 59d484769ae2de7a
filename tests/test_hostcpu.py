"""apx_tests.hostcpu against independent sources: /proc/cpuinfo, a C program built with
gcc at test time, and llvm-mc's encoding of the documented assembly."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hostfacts import read_cpuinfo

from apx_tests import hostcpu

C_PROGRAM = r"""
#include <cpuid.h>
#include <stdio.h>
#include <stdint.h>
static const unsigned leaves[][2] = {
    {0, 0}, {1, 0}, {7, 0}, {7, 1}, {0xd, 0}, {0xd, 1}, {0xd, 2}, {0xd, 19},
    {0x80000000u, 0}, {0x80000001u, 0},
};
int main(void) {
    for (unsigned i = 0; i < sizeof leaves / sizeof leaves[0]; i++) {
        unsigned a, b, c, d;
        __cpuid_count(leaves[i][0], leaves[i][1], a, b, c, d);
        printf("cpuid %#x %u %#x %#x %#x %#x\n", leaves[i][0], leaves[i][1], a, b, c, d);
    }
    unsigned a, b, c, d;
    __cpuid_count(1, 0, a, b, c, d);
    if (c & (1u << 27)) {
        uint32_t lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        printf("xgetbv 0 %#llx\n", (unsigned long long)lo | (unsigned long long)hi << 32);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory):
    gcc = shutil.which("gcc")
    assert gcc, "gcc not found: ci/bootstrap installs it (Debian package gcc)"
    d = tmp_path_factory.mktemp("cpuid_c")
    (d / "cpuid.c").write_text(C_PROGRAM)
    subprocess.run([gcc, "-O1", "-o", str(d / "cpuid"), str(d / "cpuid.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "cpuid")], check=True, capture_output=True, text=True).stdout
    cpuid, xgetbv = {}, {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "cpuid":
            cpuid[(int(parts[1], 0), int(parts[2]))] = tuple(int(x, 0) for x in parts[3:])
        elif parts[0] == "xgetbv":
            xgetbv[int(parts[1])] = int(parts[2], 0)
    assert len(cpuid) == 10, out
    return cpuid, xgetbv


def _mask_apic_id(leaf, regs):
    """CPUID.1:EBX[31:24] is the initial APIC ID of the CPU that ran the instruction."""
    if leaf == (1, 0):
        return (regs[0], regs[1] & 0x00FFFFFF, regs[2], regs[3])
    return regs


def test_cpuid_agrees_with_c_program(c_facts):
    cpuid, _ = c_facts
    for (leaf, sub), want in cpuid.items():
        got = hostcpu.cpuid(leaf, sub)
        assert _mask_apic_id((leaf, sub), got) == _mask_apic_id((leaf, sub), want), f"leaf {leaf:#x}.{sub}"


def test_xgetbv_agrees_with_c_program(c_facts):
    _, xgetbv = c_facts
    if 0 not in xgetbv:
        pytest.skip("CPUID.1:ECX.OSXSAVE=0: the C program did not run xgetbv either")
    assert hostcpu.xgetbv(0) == xgetbv[0]
    assert xgetbv[0] & 0b11 == 0b11  # x87 and SSE are always enabled when XSAVE is




def test_vendor_family_model_stepping_match_procread_cpuinfo():
    info = read_cpuinfo()
    assert hostcpu.vendor() == info["vendor_id"]
    family, model, stepping = hostcpu.family_model_stepping()
    assert (family, model, stepping) == (int(info["cpu family"]), int(info["model"]), int(info["stepping"]))


def test_microcode_matches_procread_cpuinfo():
    info = read_cpuinfo()
    if "microcode" not in info:
        assert hostcpu.microcode() is None
    else:
        assert hostcpu.microcode() == int(info["microcode"], 16)


# flag in /proc/cpuinfo -> (leaf, subleaf, register index, bit)
FLAGS = {
    "fpu": (1, 0, 3, 0), "sse2": (1, 0, 3, 26), "xsave": (1, 0, 2, 26), "avx": (1, 0, 2, 28),
    "avx2": (7, 0, 1, 5), "avx512f": (7, 0, 1, 16), "bmi2": (7, 0, 1, 8), "lm": (0x80000001, 0, 3, 29),
}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_feature_bits_match_proc_cpuinfo_flags(flag):
    flags = set(read_cpuinfo()["flags"].split())
    leaf, sub, reg, bit = FLAGS[flag]
    assert bool(hostcpu.cpuid(leaf, sub)[reg] >> bit & 1) == (flag in flags)


def test_xcr0_consistent_with_kernel_flags():
    flags = set(read_cpuinfo()["flags"].split())
    if "xsave" not in flags:
        pytest.skip("no xsave flag")
    xcr0 = hostcpu.xgetbv(0)
    assert bool(xcr0 >> 2 & 1) == ("avx" in flags)      # the kernel enables YMM iff it reports avx
    assert bool(xcr0 & 0xE0 == 0xE0) == ("avx512f" in flags)


def test_documented_machine_code_matches_llvm_mc():
    """The bytes in hostcpu are what the assembly in its docstring assembles to."""
    llvm_mc = shutil.which("llvm-mc-19") or shutil.which("llvm-mc")
    assert llvm_mc, "llvm-mc-19 not found: ci/bootstrap installs llvm-19"
    rows = [m.groups() for m in re.finditer(r"^\s+((?:[0-9a-f]{2} )+)\s*([^;\n]*?)\s*(?:;[^\n]*)?$",
                                             hostcpu.__doc__, re.M)]
    assert len(rows) == 16, rows
    asm = [text for _, text in rows]
    out = subprocess.run([llvm_mc, "--triple=x86_64", "--show-encoding"], input="\n".join(asm) + "\n",
                         capture_output=True, text=True, check=True).stdout
    encoded = b"".join(bytes(int(x, 16) for x in m.split(","))
                       for m in re.findall(r"encoding: \[([^\]]*)\]", out))
    assert encoded == hostcpu.CPUID_CODE + hostcpu.XGETBV_CODE
    documented = b"".join(bytes.fromhex(hexbytes.replace(" ", "")) for hexbytes, _ in rows)
    assert documented == encoded


@pytest.mark.parametrize("eax, vendor, want", [
    (0x00050654, "GenuineIntel", (6, 0x55, 4)),    # Skylake-SP
    (0x000906EA, "GenuineIntel", (6, 0x9E, 10)),   # Coffee Lake
    (0x000106A5, "GenuineIntel", (6, 0x1A, 5)),    # Nehalem: extended model counts for family 6
    (0x00000F29, "GenuineIntel", (15, 2, 9)),      # Pentium 4
    (0x00A00F11, "AuthenticAMD", (0x19, 0x01, 1)),  # Zen 3 Milan: extended family
    (0x00830F10, "AuthenticAMD", (0x17, 0x31, 0)),  # Zen 2 Rome: extended model with family 0xF
    (0x000106A0, "AuthenticAMD", (6, 0x0A, 0)),    # AMD family 6: extended model ignored
])
def test_family_model_stepping_rules(eax, vendor, want):
    assert hostcpu.family_model_stepping(eax, vendor) == want


def test_xgetbv_refuses_without_osxsave(monkeypatch):
    monkeypatch.setattr(hostcpu, "cpuid", lambda leaf, sub=0: (0, 0, 0, 0))
    with pytest.raises(hostcpu.HostCpuError, match="OSXSAVE"):
        hostcpu.xgetbv(0)


def test_xgetbv_refuses_undefined_index():
    if not hostcpu.osxsave():
        pytest.skip("no OSXSAVE")
    with pytest.raises(ValueError):
        hostcpu.xgetbv(7)


def test_cpuid_range_checked():
    with pytest.raises(ValueError):
        hostcpu.cpuid(1 << 32)


def test_cpuinfo_first_reads_only_the_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmicrocode\t: 0xa0011d1\n\nprocessor\t: 1\nmicrocode\t: 0x1\n")
    assert hostcpu.cpuinfo_first(str(f))["processor"] == "0"
    assert hostcpu.microcode(str(f)) == 0xA0011D1
    assert hostcpu.microcode(str(tmp_path / "missing")) is None
