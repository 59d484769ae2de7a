"""The QEMU boot image (guests/boot/multiboot.S + apx_tests/guests/boot.py), booted for real.

The image must carry the SAME payload bytes the KVM micro-VMM runs, reach stages 0, 1
and 2 under TCG and under KVM with the mailbox protocol of docs/guests.md, and exit
through isa-debug-exit with the guest's verdict.  The stub's own failures exit with a
BOOT_FAIL status the host can name.
"""

from __future__ import annotations

import struct

import pytest

from apx_tests.guests import boot, build, protocol
from apx_tests.guests.build import build_payload
from apx_tests.qemu.errors import QemuError, QemuUnavailable
from apx_tests.qemu.machine import Machine
from apx_tests.qemu.spec import MachineSpec, kvm_usable
from apx_tests.xsave import BANKS

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(kvm_usable() is not None,
                                                               reason=f"KVM: {kvm_usable()}"))]


def _spec(accel, image, **kw):
    try:
        return MachineSpec.create(accel=accel, kernel=image.path, timeout=kw.pop("timeout", 10.0), **kw)
    except QemuUnavailable as exc:
        pytest.skip(str(exc))


# --- the image ------------------------------------------------------------------------------

def test_stub_constants_and_layout():
    stub = boot.boot_stub()
    assert stub["IMAGE_BASE"] == 0x100000
    assert len(stub.code) == stub["PAYLOAD_ADDR"] - stub["IMAGE_BASE"]
    header = struct.unpack_from("<8I", stub.code, 0)
    magic, flags, checksum, header_addr, load_addr, load_end, bss_end, entry = header
    assert magic == 0x1BADB002 and flags & (1 << 16)  # multiboot v1, a.out kludge
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert header_addr == load_addr == stub["IMAGE_BASE"]
    assert load_end == stub["IMAGE_END"] and bss_end == stub["BSS_END"]
    assert stub["IMAGE_BASE"] < entry < stub["PAYLOAD_ADDR"]
    assert boot.DEFAULT_MAILBOX_GPA >= stub["BSS_END"]


def test_image_embeds_the_kvm_payload_bytes_unchanged():
    code = build_payload("ymm").code
    image = boot.build_boot_image(code, xcr0=0x7)
    data = image.path.read_bytes()
    stub = image.stub
    at = stub["PAYLOAD_ADDR"] - stub["IMAGE_BASE"]
    assert data[at:at + len(code)] == code
    assert len(data) == stub["IMAGE_END"] - stub["IMAGE_BASE"]
    params = stub["PARAMS_ADDR"] - stub["IMAGE_BASE"]
    assert struct.unpack_from("<Q", data, params + stub["PARAM_MAILBOX"])[0] == boot.DEFAULT_MAILBOX_GPA
    assert struct.unpack_from("<Q", data, params + stub["PARAM_XCR0"])[0] == 0x7


def test_image_cache_is_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    boot._stub_for.cache_clear()
    code = build_payload("xmm").code
    first = boot.build_boot_image(code)
    assert first.path.is_relative_to(tmp_path)
    again = boot.build_boot_image(code)
    assert again.path == first.path and again.digest == first.digest
    other = boot.build_boot_image(code + b"\x90")
    assert other.digest != first.digest
    assert boot.build_boot_image(code, mailbox_gpa=0x300000).digest != first.digest
    boot._stub_for.cache_clear()


def test_image_refuses_bad_inputs():
    with pytest.raises(build.GuestBuildError, match="empty payload"):
        boot.build_boot_image(b"")
    with pytest.raises(build.GuestBuildError, match="room for"):
        boot.build_boot_image(b"\x90" * 0x10001)
    with pytest.raises(build.GuestBuildError, match="4 KiB aligned"):
        boot.build_boot_image(b"\x90", mailbox_gpa=0x200010)


def test_tss_io_bitmap_allows_exactly_the_two_ports():
    """Under paravirtual KVM (kvm_pvm) IRETQ cannot raise IOPL, so the payload's `out`
    is allowed through the TSS I/O bitmap instead: exactly 0xE9 and 0xF4."""
    stub = boot.boot_stub()
    tss = stub["TSS_ADDR"] - stub["IMAGE_BASE"]
    iomap = struct.unpack_from("<H", stub.code, tss + 0x66)[0]
    bitmap = stub.code[tss + iomap:tss + iomap + 32]
    allowed = [port for port in range(256) if not bitmap[port // 8] >> (port % 8) & 1]
    assert allowed == [protocol.SYNC_PORT, protocol.EXIT_PORT]
    assert stub.code[tss + iomap + 32] == 0xFF


# --- booting for real ---------------------------------------------------------------------

@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("bank_name", ["xmm", "ymm", "x87"])
def test_boot_reaches_every_stage_and_exits_ok(accel, bank_name):
    bank = BANKS[bank_name]
    image = boot.build_boot_image(build_payload(bank_name).code)
    gpa = boot.DEFAULT_MAILBOX_GPA
    values = bank.pack(bank.pattern(1))
    with Machine(_spec(accel, image), preload={gpa: boot.mailbox_bytes(bank.size)}) as m:
        m.expect(b"0")
        assert bytes(m.debug_output) == b"blu0"  # stub entry, long mode, XCR0 set, payload
        info = boot.read_bootinfo(image.stub, m.read(image.stub["BOOTINFO_ADDR"], boot.bootinfo_size(image.stub)))
        assert info.valid and info.fail == 0
        assert info.xcr0 & bank.xcr0_mask == bank.xcr0_mask
        user_but_amx = 0xFFFFFFFF & ~(1 << 8) & ~(1 << 10) & ~(0x3F << 11) & ~(3 << 17)
        assert info.xcr0 == info.supported_xcr0 & user_but_amx
        assert info.layout().supported_xcr0 == info.supported_xcr0 | 3
        assert protocol.read_mailbox(m.read(gpa, protocol.HEADER_SIZE)).stage == 0
        m.write(gpa + protocol.LOAD_AREA, values)
        m.write(gpa + protocol.EXPECT_AREA, values)
        m.write(gpa + protocol.OFF_GO, struct.pack("<I", 0))
        m.expect(b"1")
        m.write(gpa + protocol.OFF_GO, struct.pack("<I", 1))
        m.expect(b"2")
        mailbox = protocol.read_mailbox(m.read(gpa, protocol.HEADER_SIZE))
        assert (mailbox.stage, mailbox.status, mailbox.mismatch_offset) == (2, protocol.STATUS_OK,
                                                                              protocol.NO_MISMATCH)
        assert m.read(gpa + protocol.STORE_AREA, bank.size) == values
        m.write(gpa + protocol.OFF_GO, struct.pack("<I", 2))
        assert m.wait_exit() == protocol.qemu_exit_code(protocol.STATUS_OK) == 3
    assert bytes(m.debug_output) == b"blu012"


@pytest.mark.parametrize("accel", ACCELS)
def test_guest_mismatch_exits_with_status_2(accel):
    bank = BANKS["xmm"]
    image = boot.build_boot_image(build_payload("xmm").code)
    gpa = boot.DEFAULT_MAILBOX_GPA
    values = bytearray(bank.pack(bank.pattern(1)))
    with Machine(_spec(accel, image), preload={gpa: boot.mailbox_bytes(bank.size)}) as m:
        m.write(gpa + protocol.LOAD_AREA, bytes(values))
        values[37] ^= 1
        m.write(gpa + protocol.EXPECT_AREA, bytes(values))
        for stage in (0, 1, 2):
            m.expect(str(stage).encode())
            m.write(gpa + protocol.OFF_GO, struct.pack("<I", stage))
        assert m.wait_exit() == 5
        assert protocol.read_mailbox(m.read(gpa, protocol.HEADER_SIZE)).mismatch_offset == 37


@pytest.mark.parametrize("accel", ACCELS)
def test_stub_failure_is_named(accel):
    """Asking for an XCR0 bit the guest CPU lacks (APX here): the stub writes 'X' and
    exits with BOOT_FAIL_XCR0; the error says so in one line."""
    image = boot.build_boot_image(build_payload("xmm").code, xcr0=(1 << 19) | (1 << 17) | 0x3)
    spec = _spec(accel, image, timeout=5.0)
    with pytest.raises(QemuError) as err:  # the guest may exit while QMP is still connecting
        with Machine(spec, preload={boot.DEFAULT_MAILBOX_GPA: boot.mailbox_bytes(256)}) as m:
            m.expect(b"0")
    message = str(err.value)
    assert "\n" not in message
    code = (0x41 << 1) | 1
    assert f"QEMU exited with status {code} (isa-debug-exit status {0x41})" in message
    assert "debugcon 'blX'" in message
    assert boot.describe_boot_failure(code >> 1).startswith("the requested XCR0")
