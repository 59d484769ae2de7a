"""Run the payloads for real, as a Linux process, with a C harness as the "VMM".

The structural tests read the code; these execute it - the sync handshake,
the load/store sequences and the compare routine - on whichever banks this
CPU and kernel enable (here: xmm, ymm, x87; AVX-512 and APX banks skip unless
the machine has them).  See tests/guests_harness.c for how "out" is emulated.
"""

from __future__ import annotations

import random
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
    if bank == "x87":  # 64-bit significand with the integer bit set, biased exponent 1..0x7ffe, any sign
        return b"".join(
            struct.pack("<QH", rng.getrandbits(63) | 1 << 63, rng.randrange(1, 0x7FFF) | rng.getrandbits(1) << 15)
            for _ in range(count)
        )
    return rng.randbytes(count * width)


def run(harness: Path, code: bytes, mailbox: bytes, tmp_path: Path):
    (tmp_path / "payload.bin").write_bytes(code)
    (tmp_path / "mailbox.in").write_bytes(mailbox)
    out = tmp_path / "mailbox.out"
    result = subprocess.run([str(harness), str(tmp_path / "payload.bin"), str(tmp_path / "mailbox.in"), str(out)],
                            capture_output=True, text=True, timeout=10)  # fmt: skip
    if result.returncode == BANK_NOT_ENABLED:
        pytest.skip(f"this CPU/kernel does not enable the bank ({result.stderr.strip()})")
    assert result.returncode in (protocol.STATUS_OK, protocol.STATUS_MISMATCH), result.stderr
    return result.returncode, result.stdout.strip(), out.read_bytes()


@pytest.mark.parametrize("bank", sorted(protocol.BANK_LAYOUT))
def test_payload_stores_what_it_loaded(harness, payloads, tmp_path, bank):
    values = bank_values(bank, 1)
    exit_status, log, mailbox = run(harness, payloads[bank], initial_mailbox(values), tmp_path)
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
    exit_status, _, mailbox = run(harness, payloads[bank], initial_mailbox(values, bytes(expect)), tmp_path)
    box = read_mailbox(mailbox)
    assert exit_status == box.status == protocol.STATUS_MISMATCH
    assert box.mismatch_offset == offset


def test_compare_never_reads_past_the_areas(harness, payloads, tmp_path):
    """A huge bank_bytes is clamped to one area (the harness maps only 16 KiB)."""
    mailbox = initial_mailbox(bank_values("xmm", 3))
    mailbox[protocol.OFF_BANK_BYTES : protocol.OFF_BANK_BYTES + 4] = (0x10000).to_bytes(4, "little")
    exit_status, _, _ = run(harness, payloads["xmm"], bytes(mailbox), tmp_path)
    assert exit_status == protocol.STATUS_OK  # past the bank both STORE and EXPECT are zero


def test_zero_bank_bytes_compares_nothing(harness, payloads, tmp_path):
    values = bank_values("xmm", 4)
    mailbox = initial_mailbox(values, bytes(len(values)))
    mailbox[protocol.OFF_BANK_BYTES : protocol.OFF_BANK_BYTES + 4] = bytes(4)
    exit_status, _, out = run(harness, payloads["xmm"], bytes(mailbox), tmp_path)
    assert exit_status == protocol.STATUS_OK
    assert protocol.store_area(out, len(values)) == values  # stored all the same
