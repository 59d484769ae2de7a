"""XsaveImage: parse/build round trips, register views, init rule, validation."""

import pytest
from hypothesis import given, settings, strategies as st

from apx_tests.xsave import (
    BANKS,
    REFERENCE_CPUID,
    ApxMpxConflict,
    CompactedInStandard,
    ImageTooShort,
    Layout,
    MalformedImage,
    ReservedHeaderBits,
    UnknownComponent,
    UnsupportedComponent,
    XsaveError,
    XsaveImage,
)

APX = Layout.reference("intel-apx")
SKX = Layout.reference("intel-skx-mpx")
ZEN3 = Layout.reference("amd-zen3")
ZEN4 = Layout.reference("amd-zen4")


def u64(x):
    return x.to_bytes(8, "little")


def raw_image(size, xstate_bv=0, xcomp_bv=0):
    buf = bytearray(size)
    buf[512:520] = u64(xstate_bv)
    buf[520:528] = u64(xcomp_bv)
    return buf


# ---- round trips -------------------------------------------------------------

def footprint(reg):
    return {(slot.component, slot.offset + k) for slot in reg.slots for k in range(slot.size)}


@st.composite
def layout_and_values(draw):
    """A reference layout and values for registers that do not overlap each other
    (at most one of xmmN / ymmN / zmmN), so every value must read back as written."""
    name = draw(st.sampled_from(sorted(REFERENCE_CPUID)))
    layout = Layout.reference(name)
    usable = [b for b in BANKS.values() if b.available(layout.supported_xcr0)]
    banks = draw(st.lists(st.sampled_from(usable), unique_by=lambda b: b.name, min_size=1))
    values, used = {}, set()
    for bank in banks:
        for reg in bank.registers:
            if draw(st.booleans()) and not footprint(reg) & used:
                used |= footprint(reg)
                values[reg.name] = draw(st.binary(min_size=reg.width, max_size=reg.width))
    return layout, values


@settings(max_examples=40, deadline=None)
@given(layout_and_values(), st.booleans())
def test_parse_build_round_trip(lv, compacted):
    layout, values = lv
    built = XsaveImage.build(layout, {}, compacted=compacted)
    built.write_registers(values)
    parsed = XsaveImage(layout, built.to_bytes(), where="round trip")
    assert parsed.compacted == compacted
    assert parsed == built
    assert parsed.read_registers(values) == values
    other = parsed.converted(not compacted)
    assert other.compacted != compacted
    assert XsaveImage(layout, other.to_bytes()).read_registers(values) == values
    assert other.converted(compacted) == parsed


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["apx", "hi16_zmm", "opmask", "pkru", "x87"]), st.booleans(), st.data())
def test_non_overlapping_bank_round_trip(bank_name, compacted, data):
    # banks whose registers do not overlap each other: every written value reads back
    layout = APX
    bank = BANKS[bank_name]
    values = {r.name: data.draw(st.binary(min_size=r.width, max_size=r.width)) for r in bank.registers}
    image = XsaveImage.build(layout, {}, compacted=compacted)
    image.write_registers(values)
    parsed = XsaveImage(layout, image.to_bytes())
    assert parsed.read_registers(bank.names) == values
    assert bank.unpack(bank.pack(parsed.read_registers(bank.names))) == values


def test_standard_offsets_in_the_buffer():
    image = XsaveImage.build(APX, {})
    image.write("r16", u64(0xABCD))
    image.write("r31", u64(0xABCD + 15))
    image.write("zmm17", bytes([0x5A]) * 64)
    image.write("k1", u64(0x1234))
    raw = image.to_bytes()
    assert len(raw) == 11008
    assert raw[960:968] == u64(0xABCD) and raw[960 + 120:960 + 128] == u64(0xABCD + 15)
    assert raw[1664 + 64:1664 + 128] == bytes([0x5A]) * 64  # measured: zmm17 @ 1664+64
    assert raw[1088 + 8:1088 + 16] == u64(0x1234)  # measured: k1 @ 1088+8
    assert int.from_bytes(raw[512:520], "little") == (1 << 19) | (1 << 7) | (1 << 5)


def test_compacted_offsets_with_aligned_components():
    tiles = bytes(range(256)) * 32
    image = XsaveImage.build(APX, {"xtiledata": tiles}, compacted=True,
                             xcomp_bv=(1 << 63) | APX.supported_xcr0)
    image.write("r16", u64(0x1122334455667788))
    raw = image.to_bytes()
    assert len(raw) == 10880
    assert raw[2560:2560 + 8192] == tiles  # 64-byte aligned after pkru ends at 2440
    assert raw[10752:10760] == u64(0x1122334455667788)
    assert int.from_bytes(raw[520:528], "little") == (1 << 63) | APX.supported_xcr0
    parsed = XsaveImage(APX, raw)
    assert parsed.compacted and parsed.component_bytes(18) == tiles
    assert parsed.converted(False).to_bytes()[2816:2816 + 8192] == tiles


def test_compacted_only_has_room_for_xcomp_bv_components():
    image = XsaveImage.build(APX, {}, compacted=True, xcomp_bv=(1 << 63) | 0x7)
    assert image.read("r16") == bytes(8)  # absent = init
    with pytest.raises(MalformedImage, match="XCOMP_BV"):
        image.write("r16", bytes(8))


# ---- register views ----------------------------------------------------------

def test_zmm_write_gives_xmm_and_ymm_prefix():
    image = XsaveImage.build(APX, {})
    value = bytes(range(1, 65))
    image.write("zmm5", value)
    assert image.read("xmm5") == value[:16]
    assert image.read("ymm5") == value[:32]
    assert image.read("zmm5") == value
    raw = image.to_bytes()
    assert raw[160 + 80:160 + 96] == value[:16]
    assert raw[576 + 80:576 + 96] == value[16:32]
    assert raw[1152 + 160:1152 + 192] == value[32:]


def test_ymm_write_sets_bits_1_and_2_only():
    image = XsaveImage.build(APX, {})
    assert image.xstate_bv == 0
    image.write("ymm3", bytes([7]) * 32)
    assert image.xstate_bv == 0b110
    image.write("zmm20", bytes([1]) * 64)
    assert image.xstate_bv == 0b110 | 0x80
    image.write("st2", bytes([1]) * 10)
    assert image.xstate_bv & 1


def test_xmm_write_keeps_upper_halves():
    image = XsaveImage.build(APX, {})
    image.write("zmm2", bytes([0xEE]) * 64)
    image.write("xmm2", bytes([0x11]) * 16)
    assert image.read("zmm2") == bytes([0x11]) * 16 + bytes([0xEE]) * 48


def test_register_the_layout_lacks():
    image = XsaveImage.build(ZEN3, {})
    with pytest.raises(UnknownComponent, match="component 19"):
        image.read("r16")
    with pytest.raises(UnknownComponent):
        image.write("k1", bytes(8))
    with pytest.raises(ValueError):
        image.write("xmm0", bytes(15))


# ---- init rule -----------------------------------------------------------------

def test_init_rule_zero_for_clear_bit():
    buf = raw_image(11008, xstate_bv=0x3)
    buf[960:1088] = bytes([0xAA]) * 128  # stale APX bytes, bit 19 clear
    image = XsaveImage(APX, buf)
    assert image.raw_component_bytes(19) == bytes([0xAA]) * 128
    assert image.component_bytes("apx") == bytes(128)
    assert image.read("r20") == bytes(8)
    image.write("r20", u64(5))  # making it live must not revive stale neighbours
    assert image.read("r21") == bytes(8) and image.read("r20") == u64(5)
    assert image.present(19)


def test_init_rule_x87_and_mxcsr():
    buf = raw_image(832, xstate_bv=0)
    buf[0:160] = bytes([0x77]) * 160
    buf[24:28] = (0x1F80).to_bytes(4, "little")
    image = XsaveImage(ZEN3, buf)
    x87 = image.component_bytes(0)
    assert x87[0:2] == (0x037F).to_bytes(2, "little")  # FCW init
    assert x87[2:24] == bytes(22) and x87[32:] == bytes(128)
    assert x87[24:32] == bytes(buf[24:32])  # MXCSR is not x87 state: literal
    assert image.mxcsr == 0x1F80  # not governed by XSTATE_BV bit 1
    assert image.component_bytes(1) == bytes(256)
    assert image.read("st0") == bytes(10)


def test_set_component_bytes_mark():
    image = XsaveImage.build(ZEN4, {})
    image.set_component_bytes("opmask", bytes([3]) * 64, mark=False)
    assert image.xstate_bv == 0 and image.read("k0") == bytes(8)
    image.set_component_bytes("opmask", bytes([3]) * 64)
    assert image.xstate_bv == 1 << 5 and image.read("k0") == bytes([3]) * 8
    with pytest.raises(MalformedImage, match="64 bytes"):
        image.set_component_bytes(5, bytes(8))


def test_build_defaults():
    image = XsaveImage.build(ZEN3, {})
    assert image.size == 0x340 and not image.compacted
    assert image.mxcsr == 0x1F80 and image.to_bytes()[0:2] == b"\x7f\x03"
    copy = image.copy()
    copy.write("xmm0", bytes([1]) * 16)
    assert image.read("xmm0") == bytes(16)  # copies are independent


# ---- validation errors -----------------------------------------------------------

def one_line(err, where):
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(where + ": ")
    return msg


def test_image_too_short():
    full = XsaveImage.build(APX, {})
    full.write("zmm31", bytes([1]) * 64)
    with pytest.raises(ImageTooShort) as err:
        XsaveImage(APX, full.to_bytes()[:2000], where="KVM_GET_XSAVE2 vcpu0")
    msg = one_line(err, "KVM_GET_XSAVE2 vcpu0")
    assert "buffer is 2000 bytes" in msg and "2688" in msg and "hi16_zmm" in msg
    with pytest.raises(ImageTooShort) as err:
        XsaveImage(ZEN3, bytes(100), where="f.bin")
    assert "100 bytes" in one_line(err, "f.bin")
    # a truncated buffer is fine when the missing components are in init state
    XsaveImage(APX, full.to_bytes()[:2688])


def test_reserved_header_bits():
    buf = raw_image(832)
    buf[530] = 1
    with pytest.raises(ReservedHeaderBits) as err:
        XsaveImage(ZEN3, buf, where="dump.bin")
    assert "byte 530" in one_line(err, "dump.bin")


def test_compacted_in_standard():
    buf = raw_image(832, xstate_bv=0x7, xcomp_bv=(1 << 63) | 0x7)
    with pytest.raises(CompactedInStandard) as err:
        XsaveImage(ZEN3, buf, compacted=False, where="KVM_GET_XSAVE vcpu1")
    assert "bit 63" in one_line(err, "KVM_GET_XSAVE vcpu1")
    with pytest.raises(CompactedInStandard):
        XsaveImage(ZEN3, raw_image(832, xcomp_bv=0x4))  # non-zero without bit 63
    assert XsaveImage(ZEN3, buf).compacted  # auto-detects


def test_unsupported_component():
    buf = raw_image(832, xstate_bv=(1 << 19) | 0x3)
    with pytest.raises(UnsupportedComponent) as err:
        XsaveImage(ZEN3, buf, where="migration stream")
    msg = one_line(err, "migration stream")
    assert "bit 19 (apx)" in msg and "0x7" in msg
    with pytest.raises(UnsupportedComponent, match="bit 11 .cet_u. is supervisor"):
        XsaveImage(APX, raw_image(11008, xstate_bv=1 << 11))


def test_unknown_component_on_image():
    image = XsaveImage.build(ZEN4, {})
    with pytest.raises(UnknownComponent) as err:
        image.component_bytes("xtiledata")
    msg = one_line(err, "built image")
    assert "'xtiledata'" in msg and "layout from CPUID table amd-zen4" in msg


def test_apx_mpx_conflict_in_xstate_bv():
    buf = raw_image(2696, xstate_bv=(1 << 19) | (1 << 3))
    with pytest.raises(ApxMpxConflict) as err:
        XsaveImage(SKX, buf, where="vcpu0")
    msg = one_line(err, "vcpu0")
    assert "19" in msg and "3" in msg


def test_malformed_compacted():
    buf = raw_image(1000, xstate_bv=0x7, xcomp_bv=(1 << 63) | 0x3)
    with pytest.raises(MalformedImage) as err:
        XsaveImage(ZEN3, buf, where="xsaves")
    assert "bit 2 (avx)" in one_line(err, "xsaves")
    with pytest.raises(MalformedImage, match="lacks bit 63"):
        XsaveImage(ZEN3, raw_image(832, xcomp_bv=0x7), compacted=True)


def test_header_edits_then_validate():
    image = XsaveImage.build(ZEN3, {})
    image.xstate_bv = 1 << 19  # raw edit for negative ABI tests
    assert int.from_bytes(image.to_bytes()[512:520], "little") == 1 << 19
    with pytest.raises(UnsupportedComponent):
        image.validate()
    image.xstate_bv = 0
    image.xcomp_bv = 1 << 63
    with pytest.raises(CompactedInStandard):
        image.validate()


def test_all_errors_are_value_errors():
    for cls in (ImageTooShort, ReservedHeaderBits, CompactedInStandard, UnsupportedComponent,
                UnknownComponent, ApxMpxConflict, MalformedImage):
        assert issubclass(cls, XsaveError) and issubclass(cls, ValueError)
