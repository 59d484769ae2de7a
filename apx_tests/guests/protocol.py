"""The guest/host sync protocol: the one mailbox layout every backend speaks.

The guest payloads (guests/payload/*.S) and every host side (the KVM
micro-VMM, the QEMU stub, ...) agree on this page.  guests/payload/common.S
defines the same numbers for the assembler; tests/test_guests_protocol.py
checks that the two agree.  See docs/guests.md for the full story.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# --- mailbox geometry -------------------------------------------------------
MAILBOX_SIZE = 0x4000  # 16 KiB, 4 KiB aligned, identity mapped, base in %rdi
MAGIC = 0x4D585041  # b"APXM" read as a little-endian u32

# Header fields: byte offsets from the mailbox base, all u32 little endian.
OFF_MAGIC = 0x00  # host writes MAGIC
OFF_STAGE = 0x04  # guest writes the stage it reached, before each sync
OFF_GO = 0x08  # host writes the stage it releases; guest spins until go == stage
OFF_STATUS = 0x0C  # guest writes the verdict (STATUS_*) after the compare
OFF_MISMATCH_OFFSET = 0x10  # guest: first STORE byte that differs from EXPECT
OFF_BANK_BYTES = 0x14  # host writes: how many bytes the bank occupies
HEADER_SIZE = 0x18

# Data areas: offsets from the mailbox base; each at most AREA_SIZE bytes.
LOAD_AREA = 0x1000  # values the payload loads into the bank
EXPECT_AREA = 0x2000  # what the host expects the payload to store back
STORE_AREA = 0x3000  # where the payload stores the bank after stage 1
AREA_SIZE = 0x1000

# --- stages -----------------------------------------------------------------
STAGE_STARTED = 0  # payload entered, nothing loaded: the host's baseline
STAGE_LOADED = 1  # bank holds the LOAD values; the host may read/edit it here
STAGE_VERIFIED = 2  # bank stored and compared; status/mismatch_offset valid
STAGES = (STAGE_STARTED, STAGE_LOADED, STAGE_VERIFIED)

# --- verdicts ---------------------------------------------------------------
STATUS_NOT_VERIFIED = 0
STATUS_OK = 1
STATUS_MISMATCH = 2
NO_MISMATCH = 0xFFFFFFFF  # mismatch_offset when status is STATUS_OK
GO_HOLD = 0xFFFFFFFF  # a go value that releases no stage: the guest waits at 0

# --- I/O ports --------------------------------------------------------------
SYNC_PORT = 0xE9  # KVM: exit to the VMM; QEMU: isa-debugcon (log reads "012")
EXIT_PORT = 0xF4  # KVM VMM: guest done; QEMU: isa-debug-exit (value = status)

# --- store layouts ------------------------------------------------------------
# Bank name -> (register count, bytes per register).  The payload loads and
# stores the registers packed in this order (apx: r16..r31, hi16_zmm:
# zmm16..zmm31, zmm_hi256: zmm0..zmm15 in full, opmask: k0..k7, ymm: ymm0..15,
# xmm: xmm0..15, x87: st0..st7, pkru: PKRU).  This order is an ABI shared with the XSAVE
# model (apx_tests.xsave); guests/payload/<bank>.S implements each line.
BANK_LAYOUT: dict[str, tuple[int, int]] = {
    "apx": (16, 8),
    "hi16_zmm": (16, 64),
    "zmm_hi256": (16, 64),
    "opmask": (8, 8),
    "ymm": (16, 32),
    "xmm": (16, 16),
    "x87": (8, 10),
    "pkru": (1, 4),
}

_HEADER = struct.Struct("<6I")


def bank_bytes(bank: str) -> int:
    """Bytes the bank occupies in the LOAD/EXPECT/STORE areas."""
    count, width = BANK_LAYOUT[bank]
    return count * width


def sync_char(stage: int) -> bytes:
    """What the payload writes to SYNC_PORT at `stage` (b"0", b"1", b"2")."""
    return bytes([ord("0") + stage])


def qemu_exit_code(status: int) -> int:
    """QEMU's exit code when the payload writes `status` to isa-debug-exit."""
    return (status << 1) | 1


@dataclass(frozen=True)
class Mailbox:
    """The mailbox header as read back from guest memory."""

    magic: int
    stage: int
    go: int
    status: int
    mismatch_offset: int
    bank_bytes: int

    @property
    def valid(self) -> bool:
        return self.magic == MAGIC

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


def pack_mailbox_header(
    *,
    bank_bytes: int,
    magic: int = MAGIC,
    stage: int = STAGE_STARTED,
    go: int = GO_HOLD,
    status: int = STATUS_NOT_VERIFIED,
    mismatch_offset: int = 0,
) -> bytes:
    """The HEADER_SIZE bytes at the start of the mailbox.

    `go` defaults to GO_HOLD, so the guest waits at stage 0 until the host
    releases it.  (A zero-filled mailbox would pre-release stage 0: harmless
    under KVM, where every sync is an exit anyway, but under QEMU's debugcon
    the guest would run past the baseline unobserved.)
    """
    if not 0 <= bank_bytes <= AREA_SIZE:
        raise ValueError(f"bank_bytes {bank_bytes} does not fit an area of {AREA_SIZE} bytes")
    return _HEADER.pack(magic, stage, go, status, mismatch_offset, bank_bytes)


def read_mailbox(data: bytes) -> Mailbox:
    """Decode the header from the first HEADER_SIZE bytes of `data`."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"mailbox header needs {HEADER_SIZE} bytes, got {len(data)}")
    return Mailbox(*_HEADER.unpack_from(data))


def initial_mailbox(load: bytes, expect: bytes | None = None, *, go: int = GO_HOLD) -> bytearray:
    """A full MAILBOX_SIZE image ready to hand to a guest.

    LOAD gets `load`; EXPECT gets `expect` (default: the same bytes, i.e. the
    host plans no edit); bank_bytes is len(expect).
    """
    expect = load if expect is None else expect
    for name, area in (("load", load), ("expect", expect)):
        if len(area) > AREA_SIZE:
            raise ValueError(f"{name} is {len(area)} bytes; an area holds {AREA_SIZE}")
    image = bytearray(MAILBOX_SIZE)
    image[:HEADER_SIZE] = pack_mailbox_header(bank_bytes=len(expect), go=go)
    image[LOAD_AREA : LOAD_AREA + len(load)] = load
    image[EXPECT_AREA : EXPECT_AREA + len(expect)] = expect
    return image


def store_area(data: bytes, length: int) -> bytes:
    """The first `length` bytes the payload stored (STORE area)."""
    return bytes(data[STORE_AREA : STORE_AREA + length])
