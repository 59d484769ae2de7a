"""apx_tests.xsave: checks that ci/mutation showed missing (docs/mutation.md).

Every expected value here is written by hand from the SDM's XSAVE layout facts (legacy
region 0..511, XSTATE_BV at 512, XCOMP_BV at 520, reserved 528..575; x87 FCW init
0x037F, ST(i) at 32+16i, XMM(i) at 160+16i; component offsets and sizes from the saved
CPUID leaf 0xD tables) and from the documented message texts, never recomputed with the
function under test.
"""

from __future__ import annotations

import dataclasses

import pytest

from apx_tests.xsave import (
    BANKS,
    ApxMpxConflict,
    CompactedInStandard,
    Difference,
    ImageTooShort,
    Layout,
    MalformedImage,
    MalformedLayout,
    ReservedHeaderBits,
    UnknownComponent,
    UnknownRegister,
    UnsupportedComponent,
    XsaveError,
    XsaveImage,
    bank,
    diff_images,
    diff_registers,
    narrower_names,
    register,
)
from apx_tests.xsave.banks import Register, Slot, _make_legal, _regs, _xmm_slot
from apx_tests.xsave.layout import Component, component_name

APX = Layout.reference("intel-apx")   # XCR0 0xe02e7, 11008 bytes, XSS 0x1800 (cet_u, cet_s)
ZEN3 = Layout.reference("amd-zen3")   # XCR0 0x7, 832 bytes: avx 256 @ 576
ZEN4 = Layout.reference("amd-zen4")   # XCR0 0x2e7, 2440 bytes: opmask 64 @ 832
BIT63 = 1 << 63


def raw(size: int, xstate_bv: int = 0, xcomp_bv: int = 0, *, fcw: int = 0x037F, mxcsr: int = 0x1F80) -> bytearray:
    """A buffer laid out by hand: FCW at 0, MXCSR at 24, XSTATE_BV at 512, XCOMP_BV at 520."""
    buf = bytearray(size)
    buf[0:2] = fcw.to_bytes(2, "little")
    buf[24:28] = mxcsr.to_bytes(4, "little")
    buf[512:520] = xstate_bv.to_bytes(8, "little")
    buf[520:528] = xcomp_bv.to_bytes(8, "little")
    return buf


def message(exc_type, call, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        call(*args, **kwargs)
    return str(err.value)


# ---- planted bug 1: a partial write into an init-state component --------------------

def test_write_registers_into_init_state_apx_writes_init_values_not_stale_bytes():
    """XSTATE_BV bit 19 clear, stale 0xaa bytes at 960..1087 (APX's standard offset): after
    writing r16 alone, r17..r31 must read (and hold) their init value 0, not 0xaa."""
    buf = raw(11008, xstate_bv=0x3)
    buf[960:1088] = b"\xaa" * 128
    image = XsaveImage(APX, buf, where="img")
    assert image.read("r21") == bytes(8)  # bit clear: the init rule hides the stale bytes
    image.write_registers({"r16": bytes(range(1, 9))})
    assert image.xstate_bv == 0x3 | 1 << 19
    assert image.read("r16") == bytes(range(1, 9))
    assert image.read("r21") == bytes(8)
    data = image.to_bytes()
    assert data[960:968] == bytes(range(1, 9))      # r16 at 960 + 8*0
    assert data[1000:1008] == bytes(8)              # r21 at 960 + 8*5
    assert data[968:1088] == bytes(120)


def test_write_registers_checks_every_width_before_writing_anything():
    """A wrong width anywhere in the batch is a ValueError naming the register, and the
    image is left exactly as it was (no component made live, no earlier register written)."""
    buf = raw(832, xstate_bv=0x3)
    image = XsaveImage(ZEN3, buf)
    before = image.to_bytes()
    bad = {"ymm0": bytes(range(1, 33)), "ymm1": bytes(31)}
    assert message(ValueError, image.write_registers, bad) == "register ymm1 is 32 bytes, value has 31"
    assert image.to_bytes() == before
    image.write_registers({"ymm0": bytearray(range(1, 33)), "xmm2": memoryview(bytes(range(16)))})
    assert image.read("ymm0") == bytes(range(1, 33)) and image.read("xmm2") == bytes(range(16))


def test_write_into_init_state_x87_gets_fcw_0x037f_and_keeps_mxcsr():
    """x87's init value is not all zero: FCW 0x037F.  MXCSR (24..27) is SSE state and stays."""
    buf = raw(832, xstate_bv=0x2, fcw=0xAAAA, mxcsr=0x1F80)
    buf[2:24] = b"\xaa" * 22
    buf[32:160] = b"\xaa" * 128
    image = XsaveImage(ZEN3, buf)
    st0 = bytes(range(0x11, 0x1B))
    image.write_registers({"st0": st0})
    data = image.to_bytes()
    assert image.xstate_bv == 0x3
    assert data[0:2] == b"\x7f\x03"                # FCW init
    assert data[2:24] == bytes(22)
    assert data[24:28] == b"\x80\x1f\x00\x00"      # MXCSR untouched
    assert data[32:42] == st0                      # ST0 at 32
    assert data[48:58] == bytes(10)                # ST1 at 48: init, not 0xaa
    assert image.read("st1") == bytes(10)


def test_single_write_into_init_state_avx_zeroes_the_other_upper_halves():
    buf = raw(832, xstate_bv=0x3)
    buf[576:832] = b"\xaa" * 256
    image = XsaveImage(ZEN3, buf)
    value = bytes(range(1, 33))
    image.write(register("ymm0"), value)  # a Register object, not a name
    data = image.to_bytes()
    assert image.xstate_bv == 0x7
    assert data[160:176] == value[:16]    # xmm0 at 160
    assert data[576:592] == value[16:]    # ymm0's upper half at avx 576 + 0
    assert data[592:832] == bytes(240)    # ymm1..ymm15 upper halves: init
    assert image.read("ymm1")[16:] == bytes(16)


def test_write_registers_takes_register_objects():
    image = XsaveImage.build(ZEN3, {})
    image.write_registers({register("xmm1"): b"\x05" * 16})
    assert image.to_bytes()[176:192] == b"\x05" * 16  # xmm1 at 160 + 16


# ---- planted bug 2: a component only one side has ---------------------------------

def test_diff_images_compares_a_component_one_layout_lacks_as_its_init_value():
    k3 = bytes(range(0x11, 0x19))
    with_k = XsaveImage.build(ZEN4, {}, where="zen4")
    with_k.write("k3", k3)
    without = XsaveImage.build(ZEN3, {}, where="zen3")
    assert diff_images(with_k, without) == [Difference("opmask", "k3", (0, 8), k3, bytes(8))]
    assert diff_images(without, with_k) == [Difference("opmask", "k3", (0, 8), bytes(8), k3)]
    zero_k = XsaveImage.build(ZEN4, {5: bytes(64)})  # bit set, all zero: same as absent
    assert diff_images(zero_k, without) == []
    assert diff_images(without, zero_k) == []


def test_diff_images_compares_a_component_present_in_one_xstate_bv_only():
    upper = bytes(i % 255 + 1 for i in range(256))
    live = XsaveImage.build(ZEN3, {2: upper})
    init = XsaveImage.build(ZEN3, {})
    diffs = diff_images(live, init)
    assert len(diffs) == 16
    assert diffs[0] == Difference("avx", "ymm0", (16, 32), upper[0:16], bytes(16))
    assert diffs[15] == Difference("avx", "ymm15", (16, 32), upper[240:256], bytes(16))


def test_diff_images_layouts_that_disagree_on_a_size():
    half = Layout.from_table({(0xD, 0): (0x7, 704, 704, 0), (0xD, 2): (128, 576, 0, 0)}, "half")
    a = XsaveImage.build(half, {}, where="a")
    b = XsaveImage.build(ZEN3, {}, where="b")
    assert message(MalformedImage, diff_images, a, b) == \
        "a vs b: layouts disagree on component 2 avx: 128 vs 256 bytes"


def test_diff_images_ignore_forms():
    want = XsaveImage.build(ZEN3, {}, xstate_bv=0x3, legacy=raw(512, fcw=0x037F)[:512])
    got = XsaveImage.build(ZEN3, {}, xstate_bv=0x3, legacy=raw(512, fcw=0x1234)[:512])
    assert diff_images(want, got) == [Difference("x87", "fcw", (0, 2), b"\x7f\x03", b"\x34\x12")]
    assert diff_images(want, got, ignore=("fcw",)) == []
    # ymm1 and ymm2 upper halves differ: ignoring standard bytes 592..607 (ymm1's, avx 576+16)
    a = XsaveImage.build(ZEN3, {2: bytes(256)})
    b = XsaveImage.build(ZEN3, {2: bytes(16) + b"\x01" * 32 + bytes(208)})
    assert diff_images(a, b, ignore=(range(592, 608),)) == [Difference("avx", "ymm2", (16, 32), bytes(16), b"\x01" * 16)]
    assert diff_images(a, b, ignore=((592, 608),)) == [Difference("avx", "ymm2", (16, 32), bytes(16), b"\x01" * 16)]
    assert diff_images(a, b, ignore=(register("ymm1"),)) == [Difference("avx", "ymm2", (16, 32), bytes(16), b"\x01" * 16)]
    # ignoring a component does not stop the comparison of the ones after it
    assert diff_images(a, b, ignore=("sse",)) == diff_images(a, b)
    assert len(diff_images(b, a, ignore=("ymm1",))) == 1
    assert message(TypeError, diff_images, a, b, ignore=(True,)) == "cannot ignore True"
    assert message(UnknownRegister, diff_images, a, b, ignore=(3.5,)) == \
        "diff ignore: cannot ignore 3.5: give a component, register or (start, stop)"


def test_diff_images_ranges_do_not_reach_supervisor_components():
    """Supervisor components have no standard offset, so a standard-image range never hides them."""
    cet = bytes(range(1, 17))
    a = XsaveImage.build(APX, {"cet_u": bytes(16)}, compacted=True)
    b = XsaveImage.build(APX, {"cet_u": cet}, compacted=True)
    assert diff_images(a, b, ignore=((0, 16),)) == [Difference("cet_u", "", (0, 16), bytes(16), cet)]


def test_diff_registers_value_longer_than_the_register():
    assert diff_registers({"xmm1": bytes(16)}, {"xmm1": bytes(16) + b"\x05"}) == \
        [Difference("sse", "xmm1", (16, 17), b"", b"\x05")]


def test_difference_text_missing_and_length_limit():
    assert str(Difference("sse", "xmm1", (0, 16), b"\x01" * 16, b"")) == \
        "sse xmm1 bytes 0..15: want 0x" + "01" * 16 + " got nothing (missing) (hex, memory order)"
    full = bytes(range(32))
    assert str(Difference("avx", "ymm1", (0, 32), full, full)).endswith(f"got 0x{full.hex()} (hex, memory order)")
    long = bytes(range(33))
    assert f"want 0x{long[:32].hex()}...(33 bytes)" in str(Difference("x", "y", (0, 33), long, long))


# ---- XsaveImage: validation messages --------------------------------------------------

def test_default_where_and_minimum_size():
    assert message(ImageTooShort, XsaveImage, ZEN3, bytes(575)) == \
        "XSAVE image: buffer is 575 bytes, needs at least 576 (legacy region 512 + XSAVE header 64)"
    assert XsaveImage(ZEN3, bytes(576)).size == 576
    assert XsaveImage(ZEN3, raw(576, xcomp_bv=BIT63 | 0x3)).compacted  # detected at exactly 576 bytes
    assert XsaveError("", "p").where == "XSAVE image"
    assert str(XsaveError("", "a\nb")) == "XSAVE image: a b"


def test_header_messages():
    buf = raw(832)
    buf[530] = 5
    assert message(ReservedHeaderBits, XsaveImage, ZEN3, buf, where="img") == \
        "img: XSAVE header bytes 528..575 must be zero, byte 530 is 0x05"
    assert message(CompactedInStandard, XsaveImage, ZEN3, raw(832, 0x3, 0x4), compacted=False, where="img") == \
        "img: XCOMP_BV is 0x4 in a standard-format image; must be 0"
    assert message(CompactedInStandard, XsaveImage, ZEN3, raw(832, 0x3, BIT63 | 0x4), compacted=False,
                   where="img") == "img: XCOMP_BV is 0x8000000000000004 in a standard-format image (bit 63 = compacted)"
    assert message(MalformedImage, XsaveImage, ZEN3, raw(832, 0x3, 0x4), compacted=True, where="img") == \
        "img: compacted image but XCOMP_BV 0x4 lacks bit 63"


def test_apx_with_mpx_messages():
    assert message(ApxMpxConflict, XsaveImage, APX, raw(11008, 1 << 19 | 1 << 3), where="img") == \
        "img: XSTATE_BV 0x80008 has APX (bit 19) with MPX (bit 3); they share offsets 960..1087"
    assert message(ApxMpxConflict, XsaveImage, APX, raw(11008, 1 << 19 | 0x18), where="img") == \
        "img: XSTATE_BV 0x80018 has APX (bit 19) with MPX (bit 3,4); they share offsets 960..1087"
    # MPX only in XCOMP_BV of a compacted image: still the same area
    assert message(ApxMpxConflict, XsaveImage, APX, raw(11008, 1 << 19, BIT63 | 1 << 19 | 1 << 3), where="img") == \
        "img: XSTATE_BV 0x80000 has APX (bit 19) with MPX (bit 3); they share offsets 960..1087"


def test_unsupported_bits_messages_name_the_image():
    assert message(UnsupportedComponent, XsaveImage, ZEN3, raw(2000, 0x203), where="img") == \
        "img: XSTATE_BV bit 9 (pkru) is not in the supported XCR0 0x7"
    assert message(UnsupportedComponent, XsaveImage, APX, raw(11008, 0x3 | 1 << 12), where="img") == \
        "img: XSTATE_BV bit 12 (cet_s) is supervisor state, not in the standard format"
    assert message(UnsupportedComponent, XsaveImage, ZEN3, raw(2000, 0x3, BIT63 | 0x203), where="img") == \
        "img: XCOMP_BV bit 9 (pkru) is not in the supported XCR0 0x7"
    assert message(UnsupportedComponent, XsaveImage, ZEN3, raw(2000, 0x203, BIT63 | 0x7), where="img") == \
        "img: XSTATE_BV bit 9 (pkru) is not in the supported XCR0 0x7"
    assert message(MalformedImage, XsaveImage, ZEN3, raw(832, 0x7, BIT63 | 0x3), where="img") == \
        "img: XSTATE_BV bit 2 (avx) is set but XCOMP_BV 0x8000000000000003 has no room for it"


def test_compacted_image_may_hold_supervisor_state():
    """cet_u (11, 16 bytes, supervisor) in XCOMP_BV and XSTATE_BV of a compacted image is valid.
    Compacted offsets from 576 in number order: avx 576, opmask 832, zmm_hi256 896,
    hi16_zmm 1408, pkru 2432, cet_u 2440."""
    buf = raw(10880, 0x3 | 1 << 11, BIT63 | 0xE1AE7)
    buf[2440:2456] = bytes(range(1, 17))
    image = XsaveImage(APX, buf, where="img")
    assert image.compacted and image.present("cet_u") and not image.present(2)
    assert image.component_offset("cet_u") == 2440
    assert image.component_bytes("cet_u") == bytes(range(1, 17))
    built = XsaveImage.build(APX, {"cet_u": bytes(range(1, 17))}, compacted=True, xstate_bv=0x3)
    assert built.xcomp_bv >> 11 & 1 and not built.present("cet_u")
    assert built.raw_component_bytes("cet_u") == bytes(range(1, 17))


def test_image_too_short_names_the_component_that_ends_last():
    assert message(ImageTooShort, XsaveImage, ZEN3, raw(700, 0x7), where="img") == \
        "img: buffer is 700 bytes, layout needs 832 (component 2 avx ends at 832)"
    # hi16_zmm (7) ends at 1664 + 1024 = 2688, apx (19, a higher number) at 960 + 128 = 1088
    assert message(ImageTooShort, XsaveImage, APX, raw(2000, 0x3 | 1 << 7 | 1 << 19), where="img") == \
        "img: buffer is 2000 bytes, layout needs 2688 (component 7 hi16_zmm ends at 2688)"


def test_no_room_messages():
    standard = XsaveImage.build(APX, {}, where="img")
    assert message(MalformedImage, standard.raw_component_bytes, "cet_u") == \
        "img: no room for component 11 cet_u: it is supervisor state, absent from the standard format"
    compacted = XsaveImage(ZEN4, raw(832, 0x3, BIT63 | 0x7), where="img")
    assert message(MalformedImage, compacted.raw_component_bytes, "pkru") == \
        "img: no room for component 9 pkru: XCOMP_BV 0x8000000000000007 does not include it"
    short = XsaveImage(ZEN3, raw(600, 0x3, BIT63 | 0x7), where="img")  # avx in XCOMP_BV, not in XSTATE_BV
    assert short.read("ymm0") == bytes(32)
    assert message(ImageTooShort, short.raw_component_bytes, 2) == \
        "img: buffer is 600 bytes, layout needs 832 (component 2 avx ends at 832)"
    assert message(MalformedImage, standard.set_component_bytes, 2, b"1234567890") == \
        "img: component 2 avx is 256 bytes, got 10"


def test_present_reads_the_component_bit():
    image = XsaveImage(ZEN3, raw(832, 0x3))
    assert image.present(1) and not image.present(2) and not image.present("avx")


def test_copy_keeps_where_and_format():
    image = XsaveImage(ZEN3, raw(832, 0x3, BIT63 | 0x7), where="img")
    assert image.copy().where == "img" and image.copy().compacted
    assert image.copy(where="other").where == "other"
    assert image.copy() == image


def test_converted_keeps_or_takes_what_it_is_told():
    image = XsaveImage(ZEN4, raw(832, 0x3, BIT63 | 0x7), where="img")
    same = image.converted(True)
    assert same.xcomp_bv == BIT63 | 0x7 and same.size == 832 and same.where == "img"
    assert image.converted(True, xcomp_bv=BIT63 | 0x23).xcomp_bv == BIT63 | 0x23
    assert image.converted(False, size=4096).size == 4096
    assert image.converted(False, where="w").where == "w"
    assert image.converted(False).where == "img"


def test_build_messages_and_sizes():
    assert XsaveImage.build(ZEN4, {2: bytes(256), 5: bytes(64)}).xstate_bv == 0x24
    assert message(CompactedInStandard, XsaveImage.build, ZEN3, {}, xcomp_bv=BIT63 | 0x7, where="w") == \
        "w: XCOMP_BV 0x8000000000000007 asked for a standard-format image"
    assert message(MalformedImage, XsaveImage.build, ZEN3, {}, legacy=bytes(100), where="w") == \
        "w: legacy region must be 512 bytes, got 100"
    assert message(ImageTooShort, XsaveImage.build, ZEN3, {}, size=100, where="w") == \
        "w: buffer is 100 bytes, needs at least 576"
    assert XsaveImage.build(ZEN3, {}, size=576).size == 576
    assert XsaveImage.build(ZEN3, {}, size=4096).size == 4096
    # CPUID.0xD.0 ECX = 0: the size comes from the components XSTATE_BV names (avx ends at 832)
    no_size = Layout.from_table({(0xD, 0): (0x7, 0, 0, 0), (0xD, 2): (256, 576, 0, 0)})
    assert XsaveImage.build(no_size, {}, xstate_bv=0x7).size == 832


def test_equality_needs_the_same_layout_and_format():
    data = raw(832, 0x3)
    assert XsaveImage(ZEN3, data) == XsaveImage(ZEN3, data)
    assert XsaveImage(ZEN3, data) != XsaveImage(ZEN4, data)
    assert XsaveImage(ZEN3, raw(832, 0x3, BIT63 | 0x3)) != XsaveImage(ZEN3, raw(832, 0x3, BIT63 | 0x3)).converted(False, size=832)


def test_repr():
    assert repr(XsaveImage(ZEN3, raw(832, 0x3), where="img")) == "<XsaveImage img: standard, 832 bytes, XSTATE_BV=0x3>"
    assert repr(XsaveImage(ZEN3, raw(832, 0x3, BIT63 | 0x7), where="img")) == \
        "<XsaveImage img: compacted, 832 bytes, XSTATE_BV=0x3, XCOMP_BV=0x8000000000000007>"


# ---- banks ------------------------------------------------------------------------------

def test_register_construction_and_pieces():
    assert Register("ok", 4, (Slot(9, 0, 4),), 0).width == 4
    assert message(ValueError, Register, "bad", 5, (Slot(1, 0, 4),), 0) == "register bad: slots cover 4 bytes, width is 5"
    assert message(ValueError, list, register("xmm1").pieces(b"12")) == "register xmm1 is 16 bytes, value has 2"


def test_slot_at():
    assert register("ymm3").slot_at(20) == (Slot(2, 48, 16), 4)
    assert register("zmm3").slot_at(40) == (Slot(6, 96, 32), 8)
    assert message(IndexError, register("xmm0").slot_at, 16) == "register xmm0 has 16 bytes, no byte 16"


def test_bank_lookups_and_messages():
    assert BANKS["ymm"].register("ymm3") is register("ymm3")
    assert message(UnknownRegister, BANKS["ymm"].register, "xmm3") == "bank ymm: no register 'xmm3' (has ymm0..ymm15)"
    assert bank("ymm") is BANKS["ymm"]
    assert message(UnknownRegister, bank, "nope") == \
        "bank names: no bank 'nope' (have apx, hi16_zmm, zmm_hi256, opmask, ymm, xmm, x87, pkru)"
    assert message(UnknownRegister, register, "zmm32") == \
        "register names: no register 'zmm32' in any bank (apx, hi16_zmm, zmm_hi256, opmask, ymm, xmm, x87, pkru)"


def test_pack_unpack_locate_messages():
    xmm = BANKS["xmm"]
    missing = ", ".join(f"'xmm{i}'" for i in range(1, 16))
    assert message(ValueError, xmm.pack, {"xmm0": bytes(16), "zmm99": b""}) == \
        f"bank xmm: pack needs exactly xmm0..xmm15; missing [{missing}], unknown ['zmm99']"
    values = {f"xmm{i}": bytes(16) for i in range(16)}
    values["xmm3"] = bytes(15)
    assert message(ValueError, xmm.pack, values) == "bank xmm: xmm3 is 16 bytes, value has 15"
    assert message(ValueError, xmm.unpack, bytes(10)) == "bank xmm: packed data must be 256 bytes, got 10"
    assert message(IndexError, xmm.locate, -1) == "bank xmm: negative offset -1"
    assert message(IndexError, xmm.locate, 256) == "bank xmm: offset 256 is past the packed size 256"


def test_pattern_formula_on_a_fresh_bank():
    """byte b of register i = 1 + ((salt*0x3b + stage*0x61 + i*0x1d + b*0x07 + pattern_id*0x0b) % 255),
    worked by hand for xmm (pattern_id 5): stage 2, salt 3, xmm4 byte 9:
    177 + 194 + 116 + 63 + 55 = 605; 605 % 255 = 95; + 1 = 96."""
    fresh = dataclasses.replace(BANKS["xmm"])  # its own empty pattern cache
    values = fresh.pattern(2, 3)
    assert values["xmm4"][9] == 96
    assert values["xmm0"][0] == 1 + (3 * 0x3B + 2 * 0x61 + 5 * 0x0B) % 255 == 1 + 426 % 255 == 172
    assert fresh.pattern(2, 3) == values and fresh.pattern(2, 3) is not values  # a copy each time
    raw_values = dict(fresh._make_pattern(2, 3))
    assert raw_values == values


def test_pattern_on_x87_is_a_normal_80_bit_number():
    fresh = dataclasses.replace(BANKS["x87"])
    for value in fresh.pattern(4, 9).values():
        assert value[7] & 0x80 and 0 < (value[8] | (value[9] & 0x7F) << 8) < 0x7FFF


def test_make_legal_x87_and_pkru_by_hand():
    assert _make_legal("x87", bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x02\x05\x06")) == \
        bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x82\x05\x06")
    # exponent 0x7fff (infinity/NaN): byte 8 becomes 0xfe, sign bit kept
    assert _make_legal("x87", bytearray(b"\x01" * 7 + b"\x80\xff\x7f")) == bytearray(b"\x01" * 7 + b"\x80\xfe\x7f")
    assert _make_legal("x87", bytearray(b"\x01" * 7 + b"\x80\xff\xff")) == bytearray(b"\x01" * 7 + b"\x80\xfe\xff")
    assert _make_legal("ymm", bytearray(b"\x01\x02\x03")) == bytearray(b"\x01\x02\x03")
    assert _make_legal("pkru", bytearray(b"\x07\x01\x02\x03")) == bytearray(b"\x04\x01\x02\x03")
    assert _make_legal("pkru", bytearray(b"\x0b\x01\x02\x03")) == bytearray(b"\x08\x01\x02\x03")
    assert _make_legal("pkru", bytearray(b"\x03\x01\x02\x03")) == bytearray(b"\x04\x01\x02\x03")
    assert _make_legal("x87", bytearray(b"\x03\x01\x02\x03\x04\x05\x06\x07\x08\x09")) == \
        bytearray(b"\x03\x01\x02\x03\x04\x05\x06\x87\x08\x09")


def test_register_builders():
    assert _xmm_slot(3) == Slot(1, 48, 16)
    assert _regs("b", ["a0", "a1"], [[Slot(5, 0, 8)], [Slot(5, 8, 8), Slot(6, 0, 2)]]) == (
        Register("a0", 8, (Slot(5, 0, 8),), 0, "b"),
        Register("a1", 10, (Slot(5, 8, 8), Slot(6, 0, 2)), 1, "b"),
    )


def test_narrower_names():
    assert narrower_names("zmm3") == ["ymm3", "xmm3"]
    assert narrower_names("ymm15") == ["xmm15"]
    assert narrower_names("zmm16") == [] and narrower_names("zmm15") == ["ymm15", "xmm15"]
    assert narrower_names("ymm16") == []
    assert narrower_names("xmm3") == [] and narrower_names("k1") == [] and narrower_names("abc12") == []
    assert narrower_names("zmmab") == []


# ---- layout -----------------------------------------------------------------------------

def test_component_name_and_lookups():
    assert component_name(42) == "component42"
    assert ZEN3.has(2) and ZEN3.has("avx") and ZEN3.has("sse")
    assert not ZEN3.has(5) and not ZEN3.has("opmask") and not ZEN3.has("zzz")
    assert [c.number for c in APX.user_components()] == [0, 1, 2, 5, 6, 7, 9, 17, 18, 19]
    assert message(UnknownComponent, APX.component, "nope") == (
        "CPUID table intel-apx: component 'nope' is not described by the layout (has 0:x87 1:sse 2:avx "
        "5:opmask 6:zmm_hi256 7:hi16_zmm 9:pkru 11:cet_u 12:cet_s 17:xtilecfg 18:xtiledata 19:apx)")


def test_layout_always_supports_x87_and_sse_and_hashes_by_content():
    assert Layout(0, {}, 0).supported_xcr0 == 0x3
    assert hash(Layout.reference("amd-zen3")) == hash(ZEN3)
    assert hash(ZEN3) != hash(ZEN4)


def test_from_cpuid_reads_the_high_halves():
    layout = Layout.from_table({(0xD, 0): (0x7, 840, 840, 0x1), (0xD, 2): (256, 576, 0, 0),
                                (0xD, 32): (8, 832, 0, 0)})
    assert layout.supported_xcr0 == 1 << 32 | 0x7
    assert layout.component(32).offset == 832 and layout.where == "CPUID table"
    assert layout.to_table()[(0xD, 0)] == (0x7, 840, 840, 0x1)
    sup = Layout.from_table({(0xD, 0): (0x7, 832, 832, 0), (0xD, 1): (0xF, 832, 0, 0x1),
                             (0xD, 2): (256, 576, 0, 0), (0xD, 32): (16, 0, 1, 0)})
    assert sup.supported_xss == 1 << 32 and sup.component(32).supervisor
    assert sup.to_table()[(0xD, 1)] == (0, 0, 0, 0x1)
    assert Layout.from_cpuid(lambda leaf, sub: {(0xD, 0): (0x3, 576, 576, 0)}.get((leaf, sub), (0, 0, 0, 0))).where == "CPUID"
    assert ZEN3.supported_xss == 0  # no (0xD, 1) entry: zeros


def test_to_table_entries():
    table = APX.to_table()
    assert table[(0xD, 0)] == (0xE02E7, 11008, 11008, 0)
    assert table[(0xD, 1)] == (0, 0, 0x1800, 0)
    assert table[(0xD, 19)] == (128, 960, 0, 0)
    assert table[(0xD, 17)] == (64, 2752, 2, 0)
    assert table[(0xD, 11)] == (16, 0, 1, 0)


def test_layout_consistency_messages():
    assert message(MalformedLayout, Layout.from_table, {(0xD, 0): (0x7, 832, 832, 0)}, "t") == "t: component 2 avx has size 0"
    assert message(MalformedLayout, Layout, 0x7, {}, 576) == \
        "XSAVE layout: bit 2 (avx) is supported but has no CPUID.0xD.2 entry"
    assert message(MalformedLayout, Layout, 0x27, {2: Component(2, "avx", 256, 576)}, 832) == \
        "XSAVE layout: bit 5 (opmask) is supported but has no CPUID.0xD.5 entry"
    assert message(MalformedLayout, Layout, 0x7, {2: Component(2, "avx", 256, 100)}, 832) == \
        "XSAVE layout: component 2 avx has standard offset 100, inside legacy region/header"
    assert message(MalformedLayout, Layout, 0x207, {2: Component(2, "avx", 256, 576), 9: Component(9, "pkru", 0, 832)},
                   840) == "XSAVE layout: component 9 pkru has size 0"
    assert Layout(0x207, {2: Component(2, "avx", 256, 576), 9: Component(9, "pkru", 1, 832)}, 840).component(9).size == 1
    assert message(MalformedLayout, Layout, 0x7, {2: Component(2, "avx", 256, 576)}, 800) == \
        "XSAVE layout: component 2 avx ends at 832, beyond the standard size 800 (CPUID.0xD.0 ECX)"
    assert message(MalformedLayout, Layout, 0x207, {2: Component(2, "avx", 256, 576), 9: Component(9, "pkru", 8, 800)},
                   832) == "XSAVE layout: component 2 avx (576..831) overlaps component 9 pkru (800..807)"
    apx = Component(19, "apx", 128, 1088)
    assert message(ApxMpxConflict, Layout, 0x8000B, {3: Component(3, "bndregs", 64, 960), 19: apx}, 1216,
                   source="t") == ("t: layout supports APX (bit 19) and MPX (bit 3) together in XCR0 0x8000b; "
                                   "they share offsets 960..1087")
    assert message(ApxMpxConflict, Layout, 0x8001B, {3: Component(3, "bndregs", 64, 960),
                                                     4: Component(4, "bndcsr", 64, 1024), 19: apx}, 1216,
                   source="t") == ("t: layout supports APX (bit 19) and MPX (bit 3 4) together in XCR0 0x8001b; "
                                   "they share offsets 960..1087")


def test_size_and_offset_messages_name_the_layout():
    assert message(UnsupportedComponent, APX.standard_size_for, 1 << 3) == \
        "CPUID table intel-apx: XCR0 bit 3 (bndregs) is not in the supported XCR0 0xe02e7"
    assert message(UnsupportedComponent, APX.compacted_offsets, 1 << 3) == \
        "CPUID table intel-apx: XCOMP_BV bit 3 (bndregs) is not in the supported XCR0 0xe02e7"
