"""apx_tests.qemu.hmp: HMP ``info registers`` from real QEMU 10 processes, parsed.

Every parser test works on text captured from a QEMU started by the test itself (reset
state and the long-mode guest of tests/test_qemu_gdb.py, under TCG and KVM).  ZMM/Opmask
lines (AVX-512 in the guest XCR0) and R16-R31 (a QEMU and KVM with APX) come from a real
capture wherever a QEMU here can make one (test_qemu_migration.RealCaptures: the
project's payload loads the bank, HMP is read at that point).  Only on hosts where none
can is captured text rewritten into the format of QEMU's target/i386/cpu-dump.c; those
synthetic tests skip, saying so, where the real capture runs.
"""

from __future__ import annotations

import os
import re

import pytest

from apx_tests.qemu.hmp import HmpParseError, hmp_command, parse_info_registers, read_info_registers
from apx_tests.xsave import register
from test_qemu_gdb import (  # shared QEMU launcher, guest and fixtures (same tests/ dir)
    GUEST_GPRS,
    GUEST_ST0,
    GUEST_ST1,
    GUEST_YMM5,
    QBOOT,
    QEMU,
    SPAWNED_PIDS,
    TEMP_DIRS,
    XMM3,
    _alive,
    accel,  # noqa: F401  (fixture)
    children_named,
    guest,  # noqa: F401  (fixture)
    long_vm,  # noqa: F401  (fixture)
    stage2_vm,  # noqa: F401  (fixture)
    vm,  # noqa: F401  (fixture)
)

from test_qemu_migration import AVX512_BANKS, real_capture  # noqa: F401,E402  (fixture: real captures)

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (ci/bootstrap installs it)"),
    pytest.mark.skipif(not os.path.exists(QBOOT), reason=f"{QBOOT} missing (package qemu-system-data)"),
]

u64 = lambda v: v.to_bytes(8, "little")  # noqa: E731


def test_reset_state_real_mode(vm):
    text = read_info_registers(vm.qmp)
    regs = parse_info_registers(text)
    # real mode at the reset vector: 32-bit GPR format, no R8-R15, XCR0 = 1 -> XMM lines, 8 of them
    assert regs["eip"] == (0xFFF0).to_bytes(4, "little")
    assert regs["eflags"] == (2).to_bytes(4, "little")
    assert "rax" not in regs and "r8" not in regs and "rip" not in regs
    assert sorted(n for n in regs if n.startswith("xmm")) == sorted(f"xmm{i}" for i in range(8))
    assert not [n for n in regs if n.startswith(("ymm", "zmm", "k"))]
    assert regs["fcw"] == (0x37F).to_bytes(2, "little") and regs["mxcsr"] == (0x1F80).to_bytes(4, "little")
    assert regs["cr0"] == u64(0x60000010)
    assert int.from_bytes(regs["edx"], "little") != 0         # CPUID family/model signature at reset
    assert {len(regs[f"st{i}"]) for i in range(8)} == {10}
    assert text.count("XMM") == 8 and "YMM" not in text and "XCR0" not in text


def test_long_mode_ymm_lines(long_vm):
    """XCR0 = 7 (the guest's xsetbv): QEMU prints 16 YMM lines and the 64-bit GPR format."""
    text = read_info_registers(long_vm.qmp)
    regs = parse_info_registers(text)
    for name, value in GUEST_GPRS.items():
        assert regs[name] == u64(value), name
    assert len(regs["rip"]) == 8 and len(regs["rflags"]) == 8
    assert sorted(n for n in regs if n.startswith("ymm")) == sorted(f"ymm{i}" for i in range(16))
    assert all(len(regs[f"ymm{i}"]) == register(f"ymm{i}").width for i in range(16))
    assert all(regs[f"xmm{i}"] == regs[f"ymm{i}"][:16] for i in range(16))
    assert not [n for n in regs if n.startswith(("zmm", "k"))]    # no AVX-512 in XCR0 here
    assert re.search(r"^YMM15=", text, re.M) and "XMM00" not in text
    assert int.from_bytes(regs["cr4"], "little") & (1 << 18)      # OSXSAVE
    assert int.from_bytes(regs["efer"], "little") & (1 << 10)     # LMA


def test_values_written_through_gdb_appear(long_vm):
    rax = u64(0x1122334455667788)
    with long_vm.gdb() as g:
        g.write_register("xmm3", XMM3)
        g.write_register("rax", rax)
        g.write_register("r9", u64(0x0102030405060708))
    regs = parse_info_registers(read_info_registers(long_vm.qmp))
    assert regs["rax"] == rax and regs["r9"] == u64(0x0102030405060708)
    assert regs["xmm3"] == XMM3 and regs["ymm3"] == XMM3 + bytes(16)


def test_hmp_and_gdb_agree_on_every_shared_register(long_vm):
    with long_vm.gdb() as g:
        g.write_register("xmm7", bytes(range(0xA0, 0xB0)))
        gdb_regs = g.read_registers()
    hmp = parse_info_registers(read_info_registers(long_vm.qmp))
    shared = ([f"r{n}" for n in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")] + [f"r{i}" for i in range(8, 16)]
              + ["rip"] + [f"xmm{i}" for i in range(16)] + [f"st{i}" for i in range(8)]
              + ["mxcsr", "cr0", "cr2", "cr3", "cr4", "efer"])
    for name in shared:
        assert hmp[name] == gdb_regs[name], name
    assert hmp["rflags"][:4] == gdb_regs["eflags"]
    assert hmp["fcw"] == gdb_regs["fctrl"][:2] and hmp["fsw"] == gdb_regs["fstat"][:2]


def test_ymm_upper_halves_and_x87_stack(stage2_vm):
    """TCG: the guest loaded ymm5 (32 distinct bytes) and pushed two x87 values (TOP = 6)."""
    text = read_info_registers(stage2_vm.qmp)
    regs = parse_info_registers(text)
    assert regs["ymm5"] == GUEST_YMM5 and regs["xmm5"] == GUEST_YMM5[:16]
    # QEMU prints the most significant quadword first
    assert re.search(r"^YMM05=5f5e5d5c5b5a5958 5756555453525150 4f4e4d4c4b4a4948 4746454443424140\r?$", text, re.M)
    assert (int.from_bytes(regs["fsw"], "little") >> 11) & 7 == 6
    # FPR6/FPR7 are the physical registers; st0/st1 are ST(i) relative to TOP
    assert "FPR6=c8a7a6a5a4a3a2a1 bffe" in text and "FPR7=8877665544332211 4001" in text
    assert regs["st0"] == GUEST_ST0 and regs["st1"] == GUEST_ST1
    assert regs["ftw"] == bytes([0xC0])                           # abridged tags: R6, R7 valid


def test_read_info_registers_callable_and_qmp_client(vm):
    via_client = read_info_registers(vm.qmp)
    via_callable = read_info_registers(lambda cmd: vm.qmp.cmd("human-monitor-command", **{"command-line": cmd}))
    assert via_client == via_callable
    assert via_client == hmp_command(vm.qmp, "info registers", cpu_index=0)
    with pytest.raises(TypeError):
        read_info_registers(lambda cmd: "", cpu_index=0)


# ---------------------------------------------------------------------------
# Formats this machine cannot print, built from captured text (cpu-dump.c formats)

def _zmm_text(ymm_text: str) -> str:
    """Captured 64-bit YMM text rewritten as QEMU prints it when XCR0 has AVX-512 (0xe7):
    ``Opmask%02d=%016x`` four per line, then ``ZMM%02d=`` with 8 quadwords, high first."""
    lines = [l for l in ymm_text.splitlines() if not l.startswith("YMM")]
    extra = []
    for row in range(2):
        extra.append(" ".join(f"Opmask{i:02d}={(0x1111111111111111 * (i + 1)) & (2**64 - 1):016x}"
                              for i in range(4 * row, 4 * row + 4)))
    for i in range(32):
        qwords = [f"{(i << 8) | q:016x}" for q in range(7, -1, -1)]
        extra.append(f"ZMM{i:02d}=" + " ".join(qwords))
    return "\n".join(lines + extra) + "\n"


def _apx_text(text: str) -> str:
    """Captured 64-bit text with the R16-R31 lines QEMU 11 prints for an APX CPU."""
    lines = text.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("R12="))
    apx = [" ".join(f"R{n}={0xABC0 + n:016x}" for n in range(r, r + 4)) for r in (16, 20, 24, 28)]
    return "\n".join(lines[:at + 1] + apx + lines[at + 1:]) + "\n"


def _qwords_high_first(value: bytes) -> str:
    """How cpu-dump.c prints a vector register: its quadwords, most significant first."""
    return " ".join(value[8 * q:8 * q + 8][::-1].hex() for q in range(len(value) // 8 - 1, -1, -1))


@pytest.mark.parametrize("bank", [*AVX512_BANKS, "apx"])
def test_real_zmm_opmask_and_apx_lines(real_capture, bank):
    """HMP text from a real QEMU whose guest loaded pattern(1) into the bank (KVM on an
    AVX-512 or APX host): the lines are in cpu-dump.c's format (checked on the text, by
    hand) and the parser returns exactly the loaded bytes."""
    from apx_tests.xsave import BANKS
    capture = real_capture.get(bank)
    text, want = capture.hmp, BANKS[bank].pattern(1)
    regs = parse_info_registers(text)
    assert {name: regs.get(name) for name in want} == want
    for name, value in want.items():
        if name.startswith("zmm"):
            assert f"ZMM{int(name[3:]):02d}={_qwords_high_first(value)}" in text, name
        elif name.startswith("k"):
            assert f"Opmask{int(name[1:]):02d}={value[::-1].hex()}" in text, name
        else:
            assert re.search(rf"\bR{int(name[1:])}={value[::-1].hex()}\b", text, re.I), name
    if bank != "apx":
        assert sorted(n for n in regs if n.startswith("zmm")) == sorted(f"zmm{i}" for i in range(32))
        assert sorted(n for n in regs if re.fullmatch(r"k\d", n)) == [f"k{i}" for i in range(8)]
        assert all(regs[f"ymm{i}"] == regs[f"zmm{i}"][:32] and regs[f"xmm{i}"] == regs[f"zmm{i}"][:16]
                   for i in range(16))


def _no_real_capture(real_capture, banks) -> None:
    """Skip a synthetic-text test where every one of `banks` has a real capture here."""
    able = [real_capture.accel(bank)[0] for bank in banks]
    if all(able):
        pytest.skip(f"qemu-{able[0]} here prints real {'/'.join(banks)} lines: "
                    "test_real_zmm_opmask_and_apx_lines reads those instead")


def test_zmm_and_opmask_format(real_capture, accel, request):
    """Hosts whose QEMU cannot print ZMM/Opmask lines: captured text rewritten."""
    _no_real_capture(real_capture, AVX512_BANKS)
    long_vm = request.getfixturevalue("long_vm")
    regs = parse_info_registers(_zmm_text(read_info_registers(long_vm.qmp)))
    for i in range(32):
        expect = b"".join(u64((i << 8) | q) for q in range(8))
        assert regs[f"zmm{i}"] == expect and len(expect) == register(f"zmm{i}").width
        if i < 16:
            assert regs[f"ymm{i}"] == expect[:32] and regs[f"xmm{i}"] == expect[:16]
        else:
            assert f"ymm{i}" not in regs and f"xmm{i}" not in regs
    for i in range(8):
        assert regs[f"k{i}"] == u64((0x1111111111111111 * (i + 1)) & (2**64 - 1))


def test_apx_gpr_lines(real_capture, accel, request):
    """Hosts whose QEMU cannot print R16-R31: captured text rewritten."""
    _no_real_capture(real_capture, ("apx",))
    long_vm = request.getfixturevalue("long_vm")
    regs = parse_info_registers(_apx_text(read_info_registers(long_vm.qmp)))
    for n in range(16, 32):
        assert regs[f"r{n}"] == u64(0xABC0 + n) and len(regs[f"r{n}"]) == register(f"r{n}").width
    assert regs["r15"] == u64(GUEST_GPRS["r15"])


def test_xcr0_line_if_printed(vm):
    text = read_info_registers(vm.qmp).replace("EFER=", "XCR0=0000000000000007\nEFER=", 1)
    assert parse_info_registers(text)["xcr0"] == u64(7)


# ---------------------------------------------------------------------------
# malformed text: one-line HmpParseError naming the line

@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.replace("XMM03=", "XMM03=zz", 1), "XMM03"),
    (lambda t: re.sub(r"(FPR2=[0-9a-f]{16}) [0-9a-f]{4}", r"\1", t, count=1), "FPR2"),
    (lambda t: re.sub(r"MXCSR=[0-9a-f]+", "MXCSR=1f80", t, count=1), "MXCSR"),
    (lambda t: t + "this is not a register line\n", "this is not a register line"),
    (lambda t: t + t, "CPU#0"),
    (lambda t: t.replace("XMM00=", "YMM00=", 1), "YMM00"),
    (lambda t: re.sub(r"FCW=[0-9a-f]+ FSW=[0-9a-f]+ \[ST=\d\] ", "FCW=037f ", t, count=1), "FSW"),
])
def test_malformed_text(vm, mutate, needle):
    text = read_info_registers(vm.qmp)
    parse_info_registers(text)                                    # the real text parses
    with pytest.raises(HmpParseError) as e:
        parse_info_registers(mutate(text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_not_info_registers_text():
    with pytest.raises(HmpParseError, match="no registers"):
        parse_info_registers("")
    with pytest.raises(HmpParseError, match="unrecognised line"):
        parse_info_registers("unknown command: 'info registerz'\n")


# ---------------------------------------------------------------------------
# leaks (keep last)

def test_zz_no_leftover_processes_or_dirs():
    if not SPAWNED_PIDS:
        pytest.skip("no QEMU was started in this run (tests deselected or skipped)")
    assert [p for p in SPAWNED_PIDS if _alive(p)] == []
    assert children_named("gdb", "qemu-system") == []
    assert [d for d in TEMP_DIRS if os.path.exists(d)] == []
