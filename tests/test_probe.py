"""apx_tests.probe: facts compared with independent sources, and every missing or failing
tool turned into a field (never a traceback)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from hostfacts import read_cpuinfo

from apx_tests import hostcpu, probe as probe_mod
from apx_tests.probe import CpuFacts, KvmFacts


@pytest.fixture(scope="module")
def result():
    return probe_mod.probe()




# --- CPU ------------------------------------------------------------------------------

def test_cpu_matches_proc_cpuinfo(result):
    info = read_cpuinfo()
    cpu = result.cpu
    assert cpu.error is None
    assert cpu.vendor == info["vendor_id"]
    assert (cpu.family, cpu.model, cpu.stepping) == (
        int(info["cpu family"]), int(info["model"]), int(info["stepping"]))
    assert cpu.model_name == info.get("model name")
    if "microcode" in info:
        assert cpu.microcode == int(info["microcode"], 16)
    flags = set(info["flags"].split())
    assert cpu.avx == ("avx" in flags)
    assert cpu.avx512f == ("avx512f" in flags)


def test_cpu_apx_bit_and_xsave_sizes_match_cpuid(result):
    # CPUID itself is checked against a C program in test_hostcpu.py.
    leaf7_1 = hostcpu.cpuid(7, 1)
    assert result.cpu.apx == bool(leaf7_1[3] >> 21 & 1)
    eax, ebx, ecx, edx = hostcpu.cpuid(0xD, 0)
    assert (result.cpu.xsave_size, result.cpu.xsave_max_size) == (ebx, ecx)
    assert result.cpu.xcr0_supported == eax | edx << 32
    assert result.cpu.xcr0 == hostcpu.xgetbv(0)


def test_host_layout_offsets_match_cpuid(result):
    assert result.cpu.layout is not None, result.cpu.layout_error
    for number, comp in result.cpu.layout.items():
        n = int(number)
        if n >= 2:
            size, offset, flags, _ = hostcpu.cpuid(0xD, n)
            assert (comp["size"], comp["offset"], comp["supervisor"]) == (size, offset, bool(flags & 1))
    assert result.cpu.layout["0"] == {"name": "x87", "offset": 0, "size": 160, "supervisor": False}


def test_kernel_release(result):
    assert result.kernel_release == os.uname().release == open("/proc/sys/kernel/osrelease").read().strip()


# --- KVM, checked with raw ioctls that do not use apx_tests.kvm -------------------------

KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION = 0xAE00, 0xAE01, 0xAE03
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CAP_XSAVE2 = 208


def test_kvm_facts_match_raw_ioctls(result):
    if not os.path.exists("/dev/kvm"):
        assert not result.kvm.present
        assert "/dev/kvm" in result.kvm.error and "\n" not in result.kvm.error
        return
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert result.kvm.present and result.kvm.error is None
        assert result.kvm.api_version == fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        try:
            assert result.kvm.xsave2_size == max(fcntl.ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2), 4096)
        finally:
            os.close(vm)
        nent = 256
        buf = bytearray(8 + 40 * nent)
        buf[0:4] = nent.to_bytes(4, "little")
        fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf)
        count = int.from_bytes(buf[0:4], "little")
        entries = [tuple(int.from_bytes(buf[8 + 40 * i + 4 * k: 12 + 40 * i + 4 * k], "little")
                         for k in range(7)) for i in range(count)]
        leaf_d0 = [e for e in entries if e[0] == 0xD and e[1] == 0]
        assert leaf_d0, "KVM_GET_SUPPORTED_CPUID has no leaf 0xD.0"
        _, _, _, eax, _, _, edx = leaf_d0[0]
        assert result.kvm.supported_xcr0 == eax | edx << 32
        leaf7_1 = [e for e in entries if e[0] == 7 and e[1] == 1]
        assert result.kvm.apx_cpuid == bool(leaf7_1 and leaf7_1[0][6] >> 21 & 1)
    finally:
        os.close(fd)


def test_kvm_missing_is_a_field(tmp_path):
    facts = probe_mod.probe_kvm(str(tmp_path / "no-kvm"))
    assert not facts.present
    assert facts.api_version is None and facts.supported_xcr0 is None
    assert facts.error == f"{tmp_path / 'no-kvm'}: No such file or directory"


def test_kvm_not_a_kvm_device_is_a_field():
    facts = probe_mod.probe_kvm("/dev/null")  # opens fine, every KVM ioctl fails
    assert not facts.present or facts.error
    assert facts.error and "\n" not in facts.error


# --- QEMU, gdb, LLVM: parsed here independently --------------------------------------

def test_qemu_version_matches_its_own_output(result):
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 not found: ci/bootstrap installs qemu-system-x86"
    first = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    version = first.split("version", 1)[1].split()[0]
    assert result.qemu.error is None
    assert (result.qemu.path, result.qemu.version) == (qemu, version)
    assert int(version.split(".")[0]) >= 10  # ci/bootstrap installs >= 10 from bookworm-backports
    cpu_help = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, check=True).stdout
    assert result.qemu.apxf == (" apxf" in cpu_help or "\napxf" in cpu_help)
    assert "tcg" in result.qemu.accelerators


def test_every_qemu_of_the_run_is_listed(result):
    """The default QEMUs (PATH's, then ci/bootstrap's side QEMUs), each under the name its
    case ids carry, with the -cpu of its KVM guests and APX per accelerator."""
    from apx_tests.qemu import binaries as qb
    want = qb.resolve_qemus(None)
    assert [(q.path, q.version, q.tag) for q in result.qemus] == [(b.path, b.version, b.tag) for b in want]
    assert result.qemu is result.qemus[0]
    lines = result.report_lines()
    keys = [line.split(":", 1)[0] for line in lines]
    assert len(keys) == len(set(keys)), "a fact printed twice"
    for q in result.qemus:
        assert any(line.startswith(f"{q.name}: {q.path} version {q.version}") for line in lines), q.name
        assert f"{q.name} -cpu apxf: {'yes' if q.apxf else 'no'}" in lines
        choice = qb.kvm_cpu_model(q.path)
        assert (q.kvm_cpu, q.kvm_cpu_why) == (choice.cpu, choice.why)
        assert f"{q.name} kvm -cpu: {choice.cpu} ({choice.why})" in lines
        assert set(q.apx) == {"kvm", "tcg"}
        assert f"{q.name} APX under tcg: {q.apx['tcg']}" in lines
        assert ("too old for APX" in q.apx["tcg"]) == (not q.apxf)
    if len(result.qemus) > 1:
        assert [q.name for q in result.qemus] == [f"qemu{b.tag}" for b in want] and all(b.tag for b in want)


def test_a_side_qemu_that_does_not_run_is_listed_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("APX_DEBIAN13_CACHE", str(tmp_path))
    monkeypatch.delenv("APX_QEMU", raising=False)
    (tmp_path / "qemu11" / "bin").mkdir(parents=True)
    broken = _script(tmp_path / "qemu11" / "bin" / "qemu-system-x86_64", "echo 'ld.so: not found' >&2; exit 127\n")
    p = probe_mod.probe()
    assert [b.path for b in p.side_qemus_broken] == [broken]
    assert f"side QEMU {broken}: not used: {broken} --version: exit 127: ld.so: not found" in p.report_lines()
    assert all(q.path != broken for q in p.qemus)


def test_gdb_version_matches_its_own_output(result):
    gdb = shutil.which("gdb")
    assert gdb, "gdb not found: ci/bootstrap installs it"
    first = subprocess.run([gdb, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    assert result.gdb.version == first.rsplit(" ", 1)[1]
    assert result.gdb.error is None


def test_llvm_mc_facts_match_its_own_output(result):
    mc = shutil.which("llvm-mc-19")
    assert mc, "llvm-mc-19 not found: ci/bootstrap installs llvm-19"
    assert result.llvm.path == mc
    out = subprocess.run([mc, "--version"], capture_output=True, text=True, check=True).stdout
    assert result.llvm.version == re.search(r"version (\S+)", out).group(1)
    # apx-facts.md: movq %rax, %r31 -> d5 19 89 c7; llvm-mc 19 knows APX.
    enc = subprocess.run([mc, "--triple=x86_64", "--show-encoding"], input="movq %rax, %r31\n",
                         capture_output=True, text=True, check=True).stdout
    assert "[0xd5,0x19,0x89,0xc7]" in enc
    assert result.llvm.apx is True and result.llvm.apx_encoding.startswith("0xd5,")


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_fake_qemu_with_apxf(tmp_path):
    qemu = _script(tmp_path / "qemu", """
case "$1" in
  --version) echo "QEMU emulator version 11.0.50 (v11.0.0-123)"; echo "Copyright";;
  -cpu) printf 'Available CPUs:\\nx86 DiamondRapids\\n\\nRecognized CPUID flags:\\n  amx-tile apxf avx10\\n';;
  -accel) printf 'Accelerators supported in QEMU binary:\\ntcg\\nkvm\\n';;
esac
""")
    facts = probe_mod.probe_qemu(qemu)
    assert (facts.version, facts.apxf, facts.accelerators, facts.error) == ("11.0.50", True, ["tcg", "kvm"], None)


def test_failing_qemu_is_a_field(tmp_path):
    qemu = _script(tmp_path / "qemu", "echo 'qemu: broken library' >&2; exit 3\n")
    facts = probe_mod.probe_qemu(qemu)
    assert facts.version is None
    assert facts.error == f"{qemu} --version: exit 3: qemu: broken library"


def test_qemu_without_version_line_is_a_field(tmp_path):
    facts = probe_mod.probe_qemu(_script(tmp_path / "qemu", "echo hello\n"))
    assert facts.version is None and "no 'QEMU emulator version'" in facts.error


def test_llvm_mc_without_apx(tmp_path, monkeypatch):
    mc = _script(tmp_path / "llvm-mc", """
case "$1" in
  --version) echo "  LLVM version 17.0.6";;
  *) echo "<stdin>:1:13: error: invalid register name" >&2; exit 1;;
esac
""")
    monkeypatch.setenv("APX_LLVM_MC", mc)
    facts = probe_mod.probe_llvm()
    assert (facts.path, facts.version, facts.apx) == (mc, "17.0.6", False)
    assert "invalid register name" in facts.error
    assert "is LLVM 17" in facts.error  # the guest builder's verdict on it, too


def test_missing_tools_are_fields_not_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing in it
    monkeypatch.setenv("APX_DEBIAN13_CACHE", str(tmp_path))  # and no side QEMU of ci/bootstrap
    monkeypatch.delenv("APX_QEMU", raising=False)
    monkeypatch.delenv("APX_LLVM_MC", raising=False)
    p = probe_mod.probe(kvm_path=str(tmp_path / "kvm"))
    assert p.qemu.error == "qemu-system-x86_64: not found in PATH"
    assert p.gdb.error == "gdb: not found in PATH"
    assert p.llvm.path is None and "not found (install llvm-19)" in p.llvm.error
    assert not p.kvm.present
    json.dumps(p.to_dict())
    lines = p.report_lines()
    assert "qemu: unavailable: qemu-system-x86_64: not found in PATH" in lines
    assert any(ln.startswith("kvm: unavailable: ") for ln in lines)


def test_timeout_is_a_field(tmp_path, monkeypatch):
    monkeypatch.setattr(probe_mod, "TOOL_TIMEOUT", 0.5)
    facts = probe_mod.probe_qemu(_script(tmp_path / "qemu", "exec sleep 30\n"))
    assert "timed out after 0.5 s" in facts.error


# --- banks ------------------------------------------------------------------------------

def _cpuid_table(table):
    return lambda leaf, sub=0: table.get((leaf, sub), (0, 0, 0, 0))


AMD_NO_AVX512 = {(0, 0): (0xD, 0, 0, 0), (1, 0): (0, 0, (1 << 27) | (1 << 28), (1 << 0) | (3 << 25))}


def test_bank_reasons_name_every_missing_piece():
    cpu = CpuFacts(xcr0=0x7)
    kvm = KvmFacts(present=True, supported_xcr0=0x7, xsave2_size=4096, api_version=12)
    banks = probe_mod.bank_facts(cpu, kvm, _cpuid_table(AMD_NO_AVX512))
    assert banks["apx"].reason == (
        "CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0); host XCR0 0x7 lacks bit 19 (APX); "
        "KVM supported XCR0 0x7 lacks bit 19 (APX)")
    assert banks["hi16_zmm"].reason == (
        "CPU lacks AVX512F (CPUID.(EAX=7,ECX=0):EBX[16]=0); host XCR0 0x7 lacks bits 5-7 "
        "(opmask, ZMM_Hi256, Hi16_ZMM); KVM supported XCR0 0x7 lacks bits 5-7 (opmask, ZMM_Hi256, Hi16_ZMM)")
    assert "AVX512BW (CPUID.(EAX=7,ECX=0):EBX[30]=0)" in banks["opmask"].reason
    for name in ("ymm", "xmm", "x87"):
        assert banks[name].kvm_runnable and banks[name].reason is None, banks[name]
    assert list(banks)[:len(probe_mod.BANK_ORDER)] == list(probe_mod.BANK_ORDER)


def test_bank_reason_when_only_kvm_lacks_apx():
    full = {(0, 0): (0x29, 0, 0, 0), (1, 0): (0, 0, 0xFFFFFFFF, 0xFFFFFFFF),
            (7, 0): (1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (7, 1): (0, 0, 0, 1 << 21)}
    cpu = CpuFacts(xcr0=0x802E7)
    kvm = KvmFacts(present=True, supported_xcr0=0x2E7, xsave2_size=11008)
    banks = probe_mod.bank_facts(cpu, kvm, _cpuid_table(full))
    assert banks["apx"].reason == "KVM supported XCR0 0x2e7 lacks bit 19 (APX)"
    assert all(b.kvm_runnable for n, b in banks.items() if n != "apx")
    kvm.supported_xcr0 = 0x802E7
    assert probe_mod.bank_facts(cpu, kvm, _cpuid_table(full))["apx"].kvm_runnable


def test_bank_reason_without_kvm():
    cpu = CpuFacts(xcr0=0x7)
    kvm = KvmFacts(present=False, error="/dev/kvm: No such file or directory")
    banks = probe_mod.bank_facts(cpu, kvm, _cpuid_table(AMD_NO_AVX512))
    assert banks["x87"].reason == "KVM unavailable (/dev/kvm: No such file or directory)"


def test_every_bank_requirement_parses_to_cpuid_bits():
    from apx_tests.xsave import BANKS
    for bank in BANKS.values():
        assert probe_mod.parse_cpuid_requirement(bank.cpuid_requirement), bank.name
    apx = probe_mod.parse_cpuid_requirement(BANKS["apx"].cpuid_requirement)
    assert apx == [probe_mod.CpuidBit(7, 1, "edx", 21, "APX_F")]


def test_requirement_parser_forms():
    bits = probe_mod.parse_cpuid_requirement(
        "CPUID.(EAX=7,ECX=0):EBX[16] (AVX512F) and EBX[30] (AVX512BW, for kmovq), CPUID.1:EDX[25..26] "
        "(SSE, SSE2), CPUID.(EAX=0xd,ECX=1):EAX[2] (XGETBV_ECX1); CR4.PKE (OSPKE ECX[4])")
    assert [(b.leaf, b.subleaf, b.register, b.bit, b.name) for b in bits] == [
        (7, 0, "ebx", 16, "AVX512F"), (7, 0, "ebx", 30, "AVX512BW"), (1, 0, "edx", 25, "SSE"),
        (1, 0, "edx", 26, "SSE2"), (0xD, 1, "eax", 2, "XGETBV_ECX1")]
    assert bits[4].describe(0) == "XGETBV_ECX1 (CPUID.(EAX=0xd,ECX=1):EAX[2]=0)"
    assert bits[2].describe(1) == "SSE (CPUID.1:EDX[25]=1)"


@pytest.mark.parametrize("mask, text", [
    (1 << 19, "bit 19 (APX)"), (0xE0, "bits 5-7 (opmask, ZMM_Hi256, Hi16_ZMM)"),
    (0x7, "bits 0-2 (x87, SSE, AVX)"), (0x80005, "bits 0, 2, 19 (x87, AVX, APX)"), (0, "no bits"),
])
def test_xcr0_bits_text(mask, text):
    assert probe_mod.xcr0_bits_text(mask) == text


def test_to_dict_is_json(result):
    d = json.loads(json.dumps(result.to_dict()))
    assert set(d) == {"cpu", "kernel_release", "kvm", "qemu", "gdb", "llvm", "banks", "qemus", "side_qemus_broken"}
    assert d["qemus"][0] == d["qemu"]  # the primary QEMU first
    assert d["banks"]["apx"]["name"] == "apx"
    assert d["cpu"]["xcr0"] == result.cpu.xcr0


def test_probe_runs_in_a_fresh_interpreter_without_errors_on_stderr():
    proc = subprocess.run([sys.executable, "-c", "from apx_tests.probe import probe; probe()"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
