"""diff_registers / diff_images: name the component, register and byte."""

import pytest

from apx_tests.xsave import (
    BANKS,
    Difference,
    Layout,
    UnknownRegister,
    XsaveImage,
    diff_images,
    diff_registers,
)

APX = Layout.reference("intel-apx")


def test_difference_str_single_and_range():
    d = Difference("hi16_zmm", "zmm23", (5, 6), b"\x8f", b"\x90")
    assert str(d) == "hi16_zmm zmm23 byte 5: want 0x8f got 0x90"
    d = Difference("apx", "r16", (0, 8), bytes(range(1, 9)), bytes(8))
    assert str(d) == ("apx r16 bytes 0..7: want 0x0102030405060708 got 0x0000000000000000"
                      " (hex, memory order)")
    assert "\n" not in str(Difference("xtiledata", "", (0, 8192), bytes(8192), b"\x01" * 8192))


def test_diff_registers_names_register_and_byte():
    want = BANKS["hi16_zmm"].pattern(1)
    image = XsaveImage.build(APX, {})
    image.write_registers(want)
    assert diff_registers(want, image) == []
    bad = bytearray(want["zmm23"])
    bad[5] ^= 0xFF
    image.write("zmm23", bytes(bad))
    (d,) = diff_registers(want, image)
    assert (d.component, d.register, d.byte_range) == ("hi16_zmm", "zmm23", (5, 6))
    assert d.want == want["zmm23"][5:6] and d.got == bytes(bad[5:6])
    assert str(d).startswith("hi16_zmm zmm23 byte 5: want 0x")


def test_diff_registers_groups_runs_and_splits_components():
    want = {"zmm4": bytes(range(1, 65))}
    got = {"zmm4": bytes(range(1, 11)) + bytes(40) + bytes(range(51, 65))}
    diffs = diff_registers(want, got)
    # bytes 10..49 differ: 10..15 in sse (xmm part), 16..31 avx, 32..49 zmm_hi256
    assert [(d.component, d.byte_range) for d in diffs] == [
        ("sse", (10, 16)), ("avx", (16, 32)), ("zmm_hi256", (32, 50))]
    assert all(d.register == "zmm4" for d in diffs)


def test_diff_registers_missing_value():
    (d,) = diff_registers({"r16": b"\x01" * 8}, {})
    assert d.got == b"" and "missing" in str(d)


def test_diff_images_init_rule_and_naming():
    expected = XsaveImage.build(APX, {})
    expected.write_registers(BANKS["apx"].pattern(0))
    actual = expected.copy()
    assert diff_images(expected, actual) == []
    # bit set with zeros == bit clear (QEMU's gdbstub writes the former)
    a = XsaveImage.build(APX, {"apx": bytes(128)})
    b = XsaveImage.build(APX, {})
    assert a.xstate_bv != b.xstate_bv and diff_images(a, b) == []
    # the export bug: APX area zeroed / XSTATE_BV[19] missing
    actual.xstate_bv &= ~(1 << 19)
    diffs = diff_images(expected, actual)
    assert [d.register for d in diffs] == [f"r{i}" for i in range(16, 32)]
    assert all(d.component == "apx" and d.byte_range == (0, 8) and d.got == bytes(8) for d in diffs)


def test_diff_images_names_narrowest_register_and_fields():
    expected = XsaveImage.build(APX, {})
    actual = expected.copy()
    actual.write("ymm9", bytes(16) + b"\x01" * 16)
    actual.mxcsr = 0x1FA0
    actual.set_component_bytes("xtiledata", b"\x00" * 64 + b"\x02" * 8 + bytes(8192 - 72))
    diffs = {(d.component, d.register, d.byte_range) for d in diff_images(expected, actual)}
    assert diffs == {("avx", "ymm9", (16, 32)), ("sse", "mxcsr", (0, 1)), ("xtiledata", "", (64, 72))}
    assert any(str(d).startswith("xtiledata bytes 64..71") for d in diff_images(expected, actual))


def test_diff_images_compacted_vs_standard():
    values = BANKS["zmm_hi256"].pattern(2)
    standard = XsaveImage.build(APX, {})
    standard.write_registers(values)
    compacted = standard.converted(True)
    assert diff_images(standard, compacted) == []
    compacted.write("zmm3", values["zmm3"][:40] + b"\xAA" + values["zmm3"][41:])
    (d,) = diff_images(standard, compacted)
    assert (d.component, d.register, d.byte_range, d.got) == ("zmm_hi256", "zmm3", (40, 41), b"\xAA")


def test_diff_images_ignore():
    before = XsaveImage.build(APX, {})
    after = before.copy()
    x87 = BANKS["x87"]
    after.write_registers(x87.pattern(0))
    after_bytes = bytearray(after.to_bytes())
    after_bytes[2:4] = b"\x00\x38"  # FSW.TOP moved by fld
    after_bytes[8:16] = b"\x34\x12" + bytes(6)  # FIP
    after = XsaveImage(APX, after_bytes)
    after.write("k1", b"\x01" * 8)
    # the "other components untouched" check: ignore the bank and its side effects
    left = diff_images(before, after, ignore=[x87, *x87.side_effects])
    assert [(d.component, d.register) for d in left] == [("opmask", "k1")]
    assert diff_images(before, after, ignore=[x87, *x87.side_effects, "opmask"]) == []
    assert diff_images(before, after, ignore=[x87, *x87.side_effects, 5]) == []
    assert diff_images(before, after, ignore=[x87, *x87.side_effects, "k1"]) == []
    assert {d.register for d in diff_images(before, after, ignore=["k1"])} >= {"fsw", "fip", "st0"}
    with pytest.raises(UnknownRegister):
        diff_images(before, after, ignore=["k9"])


def test_diff_names_an_apx_register():
    expected = XsaveImage.build(APX, {})
    actual = expected.copy()
    actual.write("r31", b"\x05" + bytes(7))
    assert [str(d) for d in diff_images(expected, actual)] == ["apx r31 byte 0: want 0x00 got 0x05"]
