"""Run the payloads for real, as a Linux process, with a C harness as the "VMM".

The structural tests read the code; these execute it - the sync handshake,
the load/store sequences and the compare routine - on whichever banks this
CPU and kernel enable (here: xmm, ymm, x87; AVX-512 and APX banks skip unless
the machine has them).  See tests/guests_harness.c for how "out" is emulated.

Whether a bank is there is asked of CPUID and XGETBV before the payload runs: a
skip names the missing bit; a SIGILL where both say the bank is enabled fails.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from apx_tests.guests import build, protocol
from apx_tests.guests.protocol import initial_mailbox, read_mailbox

pytestmark = pytest.mark.skipif(not build.have_llvm_mc(), reason="llvm-mc ≥ 18 not installed (Debian: llvm-19)")

HARNESS_SOURCE = Path(__file__).with_name("guests_harness.c")
BANK_NOT_ENABLED = 77
SIGILL_ALTHOUGH_ENABLED = 105


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler for the user-space harness")
    binary = tmp_path_factory.mktemp("harness") / "guests_harness"
    argv = [compiler, "-O1", "-Wall", "-Werror", "-pthread", "-o", str(binary), str(HARNESS_SOURCE)]
    subprocess.run(argv, check=True)
    return binary


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        return {bank: build.build_payload(bank).code for bank in protocol.BANK_LAYOUT}


def bank_values(bank: str, seed: int) -> bytes:
    """Distinct random register values; x87 gets well-formed normal numbers."""
    rng = random.Random(f"{bank}-{seed}")
    count, width = protocol.BANK_LAYOUT[bank]
    if bank == "pkru":  # keys 1-15 only: AD/WD for key 0 (bits 0-1) would fault the mailbox stores
        return (rng.getrandbits(32) & ~0x3).to_bytes(4, "little")
    if bank == "x87":  # 64-bit significand with the integer bit set, biased exponent 1..0x7ffe, any sign
        return b"".join(
            struct.pack("<QH", rng.getrandbits(63) | 1 << 63, rng.randrange(1, 0x7FFF) | rng.getrandbits(1) << 15)
            for _ in range(count)
        )
    return rng.randbytes(count * width)


def _harness(harness: Path, code: bytes, mailbox: bytes, tmp_path: Path, bank: str):
    (tmp_path / "payload.bin").write_bytes(code)
    (tmp_path / "mailbox.in").write_bytes(mailbox)
    out = tmp_path / "mailbox.out"
    result = subprocess.run([str(harness), str(tmp_path / "payload.bin"), str(tmp_path / "mailbox.in"), str(out),
                             bank], capture_output=True, text=True, timeout=10)  # fmt: skip
    return result, out


def run(harness: Path, code: bytes, mailbox: bytes, tmp_path: Path, bank: str):
    result, out = _harness(harness, code, mailbox, tmp_path, bank)
    if result.returncode == BANK_NOT_ENABLED:
        # Only where CPUID or XCR0 says so, and the reason names the bit.
        assert re.search(r"CPUID\.\(EAX=\w+,ECX=\d\):E[BCD]X\[\d+\]|XCR0 0x[0-9a-f]+ lacks bit", result.stderr), \
            result.stderr
        pytest.skip(result.stderr.strip().removeprefix("harness: "))
    assert result.returncode in (protocol.STATUS_OK, protocol.STATUS_MISMATCH), result.stderr
    return result.returncode, result.stdout.strip(), out.read_bytes()


@pytest.mark.parametrize("bank", sorted(protocol.BANK_LAYOUT))
def test_payload_stores_what_it_loaded(harness, payloads, tmp_path, bank):
    values = bank_values(bank, 1)
    exit_status, log, mailbox = run(harness, payloads[bank], initial_mailbox(values), tmp_path, bank)
    box = read_mailbox(mailbox)
    assert log == "log=012 waited=1"  # three syncs, and it held still at stage 1
    assert exit_status == box.status == protocol.STATUS_OK
    assert box.mismatch_offset == protocol.NO_MISMATCH
    assert (box.stage, box.go) == (protocol.STAGE_VERIFIED, protocol.STAGE_VERIFIED)
    assert protocol.store_area(mailbox, len(values)) == values


@pytest.mark.parametrize("bank", sorted(protocol.BANK_LAYOUT))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_payload_reports_the_first_mismatch(harness, payloads, tmp_path, bank, where):
    values = bank_values(bank, 2)
    offset = {"first": 0, "middle": len(values) // 2 + 1, "last": len(values) - 1}[where]
    expect = bytearray(values)
    expect[offset] ^= 0x5A
    expect[-1] ^= 0x01 if offset != len(values) - 1 else 0  # a later difference must not win
    exit_status, _, mailbox = run(harness, payloads[bank], initial_mailbox(values, bytes(expect)), tmp_path, bank)
    box = read_mailbox(mailbox)
    assert exit_status == box.status == protocol.STATUS_MISMATCH
    assert box.mismatch_offset == offset


def test_compare_never_reads_past_the_areas(harness, payloads, tmp_path):
    """A huge bank_bytes is clamped to one area (the harness maps only 16 KiB)."""
    mailbox = initial_mailbox(bank_values("xmm", 3))
    mailbox[protocol.OFF_BANK_BYTES : protocol.OFF_BANK_BYTES + 4] = (0x10000).to_bytes(4, "little")
    exit_status, _, _ = run(harness, payloads["xmm"], bytes(mailbox), tmp_path, "xmm")
    assert exit_status == protocol.STATUS_OK  # past the bank both STORE and EXPECT are zero


def test_zero_bank_bytes_compares_nothing(harness, payloads, tmp_path):
    values = bank_values("xmm", 4)
    mailbox = initial_mailbox(values, bytes(len(values)))
    mailbox[protocol.OFF_BANK_BYTES : protocol.OFF_BANK_BYTES + 4] = bytes(4)
    exit_status, _, out = run(harness, payloads["xmm"], bytes(mailbox), tmp_path, "xmm")
    assert exit_status == protocol.STATUS_OK
    assert protocol.store_area(out, len(values)) == values  # stored all the same


# --- the skip decision itself ---------------------------------------------------------------

UD2 = bytes.fromhex("0f0b")  # raises #UD -> SIGILL, whatever the CPU


def _cpu_flags() -> set[str]:
    """The kernel's feature flags (/proc/cpuinfo): what CPUID and XCR0 allow user space."""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


# The /proc/cpuinfo flags that say a bank is usable (every x86-64 CPU has fpu and sse2).
PRESENT = {"x87": {"fpu"}, "xmm": {"sse2"}, "ymm": {"avx"}, "zmm_hi256": {"avx512f"},
           "hi16_zmm": {"avx512f"}, "opmask": {"avx512f", "avx512bw"}}


@pytest.mark.parametrize("bank", sorted(PRESENT))
def test_sigill_on_an_enabled_bank_is_a_failure(harness, tmp_path, bank):
    """A payload that raises SIGILL (ud2) on a bank the CPU and kernel enable is not "bank
    not enabled": the harness must say it failed, naming the bank."""
    if not PRESENT[bank] <= _cpu_flags():
        pytest.skip(f"/proc/cpuinfo lacks {', '.join(sorted(PRESENT[bank] - _cpu_flags()))}: {bank} is absent here")
    result, _ = _harness(harness, UD2, initial_mailbox(bank_values(bank, 5)), tmp_path, bank)
    assert result.returncode == SIGILL_ALTHOUGH_ENABLED, (result.returncode, result.stderr)
    assert result.stderr.startswith("harness: SIGILL at ") and f", yet bank {bank} is enabled (CPUID" in result.stderr


# (bank, /proc/cpuinfo flag, the bit the harness must name) for banks a CPU may lack.
ABSENT = [("hi16_zmm", "avx512f", "CPUID.(EAX=0x7,ECX=0):EBX[16] (AVX512F)=0"),
          ("opmask", "avx512bw", "CPUID.(EAX=0x7,ECX=0):EBX[30] (AVX512BW)=0"),
          ("ymm", "avx", "CPUID.(EAX=0x1,ECX=0):ECX[28] (AVX)=0")]


@pytest.mark.parametrize("bank,flag,named", ABSENT, ids=[a[0] for a in ABSENT])
def test_absent_bank_is_a_skip_naming_the_bit(harness, tmp_path, bank, flag, named):
    """Where /proc/cpuinfo lacks the feature, the harness exits 77 naming the CPUID bit,
    without running the payload (here a ud2 that would otherwise fail with 105)."""
    if flag in _cpu_flags():
        pytest.skip(f"this CPU has {flag}: the {bank} bank is present here (its SIGILL would fail)")
    result, _ = _harness(harness, UD2, initial_mailbox(bank_values(bank, 6)), tmp_path, bank)
    assert result.returncode == BANK_NOT_ENABLED, (result.returncode, result.stderr)
    assert result.stderr.startswith(f"harness: bank {bank} not enabled: ") and named in result.stderr, result.stderr
