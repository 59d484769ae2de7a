"""The mailbox protocol: Python constants == assembler constants, and helpers."""

from __future__ import annotations

import re

import pytest

from apx_tests.guests import build, protocol
from apx_tests.guests.protocol import Mailbox, initial_mailbox, pack_mailbox_header, read_mailbox

# common.S name -> the protocol.py value it must equal
SHARED_CONSTANTS = {
    "MB_MAGIC": protocol.OFF_MAGIC,
    "MB_STAGE": protocol.OFF_STAGE,
    "MB_GO": protocol.OFF_GO,
    "MB_STATUS": protocol.OFF_STATUS,
    "MB_MISMATCH_OFFSET": protocol.OFF_MISMATCH_OFFSET,
    "MB_BANK_BYTES": protocol.OFF_BANK_BYTES,
    "LOAD_AREA": protocol.LOAD_AREA,
    "EXPECT_AREA": protocol.EXPECT_AREA,
    "STORE_AREA": protocol.STORE_AREA,
    "AREA_SIZE": protocol.AREA_SIZE,
    "STAGE_STARTED": protocol.STAGE_STARTED,
    "STAGE_LOADED": protocol.STAGE_LOADED,
    "STAGE_VERIFIED": protocol.STAGE_VERIFIED,
    "STATUS_OK": protocol.STATUS_OK,
    "STATUS_MISMATCH": protocol.STATUS_MISMATCH,
    "NO_MISMATCH": protocol.NO_MISMATCH,
    "SYNC_PORT": protocol.SYNC_PORT,
    "EXIT_PORT": protocol.EXIT_PORT,
}


def assembler_constants() -> dict[str, int]:
    text = (build.payload_dir() / "common.S").read_text()
    return {name: int(value, 0) for name, value in re.findall(r"^\s*\.set\s+(\w+),\s*(\w+)", text, re.MULTILINE)}


def test_common_s_agrees_with_protocol_py():
    assert assembler_constants() == SHARED_CONSTANTS


def test_layout_fits_the_mailbox():
    header_fields = [protocol.OFF_MAGIC, protocol.OFF_STAGE, protocol.OFF_GO, protocol.OFF_STATUS,
                     protocol.OFF_MISMATCH_OFFSET, protocol.OFF_BANK_BYTES]  # fmt: skip
    assert header_fields == list(range(0, protocol.HEADER_SIZE, 4))
    assert protocol.MAGIC.to_bytes(4, "little") == b"APXM"
    assert protocol.STORE_AREA + protocol.AREA_SIZE == protocol.MAILBOX_SIZE
    for bank in protocol.BANK_LAYOUT:
        assert 0 < protocol.bank_bytes(bank) <= protocol.AREA_SIZE


def test_every_bank_layout_has_a_payload():
    assert sorted(protocol.BANK_LAYOUT) == build.available_banks()
    assert protocol.bank_bytes("apx") == 128  # = XSAVE component 19's size
    assert protocol.bank_bytes("x87") == 80


def test_header_round_trip():
    packed = pack_mailbox_header(bank_bytes=128, stage=1, go=1, status=2, mismatch_offset=17)
    assert len(packed) == protocol.HEADER_SIZE
    assert read_mailbox(packed) == Mailbox(protocol.MAGIC, 1, 1, 2, 17, 128)
    assert read_mailbox(packed).valid and not read_mailbox(packed).ok


def test_fresh_header_holds_the_guest_at_stage_0():
    box = read_mailbox(pack_mailbox_header(bank_bytes=8))
    assert (box.stage, box.go, box.status) == (0, protocol.GO_HOLD, protocol.STATUS_NOT_VERIFIED)
    assert box.go not in protocol.STAGES


def test_initial_mailbox_places_the_areas():
    load, expect = bytes(range(1, 129)), bytes(range(2, 130))
    image = initial_mailbox(load, expect)
    assert len(image) == protocol.MAILBOX_SIZE
    assert image[protocol.LOAD_AREA : protocol.LOAD_AREA + 128] == load
    assert image[protocol.EXPECT_AREA : protocol.EXPECT_AREA + 128] == expect
    assert read_mailbox(image).bank_bytes == 128
    assert protocol.store_area(image, 128) == bytes(128)
    assert initial_mailbox(load)[protocol.EXPECT_AREA : protocol.EXPECT_AREA + 128] == load


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        pack_mailbox_header(bank_bytes=protocol.AREA_SIZE + 1)
    with pytest.raises(ValueError):
        initial_mailbox(bytes(protocol.AREA_SIZE + 1))
    with pytest.raises(ValueError):
        read_mailbox(bytes(8))


def test_port_helpers():
    assert b"".join(protocol.sync_char(s) for s in protocol.STAGES) == b"012"
    assert protocol.qemu_exit_code(protocol.STATUS_OK) == 3
    assert protocol.qemu_exit_code(protocol.STATUS_MISMATCH) == 5
