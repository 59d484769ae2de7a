"""Banks: register order (the payload ABI), views, packing and test patterns."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from apx_tests.xsave import BANKS, Slot, UnknownRegister, bank_of, register

EXPECTED = {  # bank -> (names, width, xcr0_mask): the ABI, written out by hand
    "apx": ([f"r{i}" for i in range(16, 32)], 8, 1 << 19),
    "hi16_zmm": ([f"zmm{i}" for i in range(16, 32)], 64, 0xE7),
    "zmm_hi256": ([f"zmm{i}" for i in range(16)], 64, 0xE7),
    "opmask": ([f"k{i}" for i in range(8)], 8, 0xE7),
    "ymm": ([f"ymm{i}" for i in range(16)], 32, 0x7),
    "xmm": ([f"xmm{i}" for i in range(16)], 16, 0x3),
    "x87": ([f"st{i}" for i in range(8)], 10, 0x1),
    "pkru": (["pkru"], 4, 0x203),
}


def test_banks_order_names_widths():
    assert list(BANKS) == list(EXPECTED)
    for name, (names, width, mask) in EXPECTED.items():
        bank = BANKS[name]
        assert list(bank.names) == names
        assert all(r.width == width for r in bank.registers)
        assert [r.index for r in bank.registers] == list(range(len(names)))
        assert bank.size == width * len(names)
        assert bank.xcr0_mask == mask
        assert bank.cpuid_requirement and bank.description
    assert "CPUID.(EAX=7,ECX=1):EDX[21]" in BANKS["apx"].cpuid_requirement
    assert "XCR0[19]" in BANKS["apx"].cpuid_requirement
    assert "AVX512F" in BANKS["opmask"].cpuid_requirement and "AVX512BW" in BANKS["opmask"].cpuid_requirement


def test_register_slots():
    assert register("r20").slots == (Slot(19, 32, 8),)
    assert register("xmm7").slots == (Slot(1, 112, 16),)
    assert register("ymm7").slots == (Slot(1, 112, 16), Slot(2, 112, 16))
    assert register("zmm7").slots == (Slot(1, 112, 16), Slot(2, 112, 16), Slot(6, 224, 32))
    assert register("zmm23").slots == (Slot(7, 7 * 64, 64),)
    assert register("k3").slots == (Slot(5, 24, 8),)
    assert register("st2").slots == (Slot(0, 64, 10),)
    assert register("pkru").slots == (Slot(9, 0, 4),)
    assert register("ZMM7").name == "zmm7"
    assert bank_of("ymm3").name == "ymm" and bank_of("zmm3").name == "zmm_hi256"
    with pytest.raises(UnknownRegister, match="zmm32"):
        register("zmm32")


def test_available():
    assert BANKS["apx"].available(0x80003) and not BANKS["apx"].available(0x2E7)
    assert BANKS["hi16_zmm"].available(0xE7) and not BANKS["hi16_zmm"].available(0x7)
    assert BANKS["ymm"].missing_xcr0(0x3) == 0x4


def test_x87_side_effects_cover_fsw_to_fdp():
    effects = BANKS["x87"].side_effects
    assert (2, 24) in effects  # FSW FTW FOP FIP FDP
    # never overlaps the registers' own bytes
    reg_bytes = {32 + 16 * i + k for i in range(8) for k in range(10)}
    assert not any(a <= b < c for a, c in effects for b in reg_bytes)
    assert BANKS["ymm"].side_effects == () and BANKS["zmm_hi256"].side_effects == ()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(BANKS)), st.data())
def test_pack_unpack_locate(name, data):
    bank = BANKS[name]
    values = {r.name: data.draw(st.binary(min_size=r.width, max_size=r.width)) for r in bank.registers}
    packed = bank.pack(values)
    assert len(packed) == bank.size
    assert bank.unpack(packed) == values
    offset = data.draw(st.integers(0, bank.size - 1))
    reg, byte = bank.locate(offset)
    assert values[reg][byte] == packed[offset]
    assert bank.locate(offset) == (reg, byte)


def test_pack_order_and_errors():
    bank = BANKS["opmask"]
    values = {f"k{i}": bytes([i + 1]) * 8 for i in range(8)}
    assert bank.pack(values)[8:16] == bytes([2]) * 8
    assert bank.locate(17) == ("k2", 1)
    with pytest.raises(IndexError):
        bank.locate(64)
    with pytest.raises(ValueError, match="missing"):
        bank.pack({"k0": bytes(8)})
    with pytest.raises(ValueError):
        bank.unpack(bytes(63))


def test_pattern_formula_spot_values():
    # byte = 1 + ((salt*0x3b + stage*0x61 + i*0x1d + b*7 + bank_id*0x0b) % 255)
    assert BANKS["apx"].pattern(0)["r16"] == bytes([1, 8, 15, 22, 29, 36, 43, 50])
    assert BANKS["apx"].pattern(1)["r17"][0] == 1 + 0x61 + 0x1D
    assert BANKS["opmask"].pattern(0, salt=2)["k0"][0] == 1 + (2 * 0x3B + 3 * 0x0B) % 255


@pytest.mark.parametrize("name", sorted(BANKS))
def test_pattern_properties(name):
    bank = BANKS[name]
    stages = [bank.pattern(s) for s in range(8)]
    for values in stages:
        assert set(values) == set(bank.names)
        assert all(len(values[r.name]) == r.width for r in bank.registers)
        assert all(all(v) for v in values.values()), "every byte non-zero"
        assert len(set(values.values())) == len(values), "registers differ within a stage"
        assert all(v[i] != v[i + 1] for v in values.values() for i in range(len(v) - 1)), "byte shift visible"
    for reg in bank.names:
        assert len({s[reg] for s in stages}) == len(stages), "stages differ for a register"
    # no value of one (stage, register) reappears at another in the first stages
    seen = [s[r] for s in stages[:4] for r in bank.names]
    assert len(set(seen)) == len(seen)
    assert bank.pattern(3, salt=1) == bank.pattern(3, salt=1) != bank.pattern(3, salt=2)


def test_patterns_differ_between_banks():
    firsts = {name: bank.pattern(0)[bank.names[0]][:4] for name, bank in BANKS.items()}
    assert len(set(firsts.values())) == len(firsts)


def test_x87_pattern_is_normal_extended():
    # the formula is periodic in stage and salt (mod 255): this covers every stage
    values = [v for stage, salt in itertools.product(range(255), range(4))
              for v in BANKS["x87"].pattern(stage, salt).values()]
    for value in values:
        significand = int.from_bytes(value[:8], "little")
        exponent = int.from_bytes(value[8:10], "little") & 0x7FFF
        assert significand >> 63 == 1, "integer bit set"
        assert 1 <= exponent <= 0x7FFE
        assert all(value)


def test_pkru_pattern_leaves_key0_accessible():
    for stage in range(256):
        (value,) = BANKS["pkru"].pattern(stage).values()
        assert value[0] & 0x3 == 0 and all(value)


# --- coverage in bytes: what a partial path (a debugger, a monitor) reaches ---------------
# Expected numbers by hand: ymm = xmm (16 x 16 B, component 1) + upper halves (16 x 16 B,
# component 2); zmm_hi256 adds 16 x 32 B of component 6; zmm16-31 are 16 x 64 B of 7.

def test_own_component_is_the_banks_highest():
    from apx_tests.xsave import BANKS
    assert {name: BANKS[name].own_component for name in
            ("x87", "xmm", "ymm", "zmm_hi256", "hi16_zmm", "opmask", "apx")} == \
        {"x87": 0, "xmm": 1, "ymm": 2, "zmm_hi256": 6, "hi16_zmm": 7, "opmask": 5, "apx": 19}


def test_byte_coverage_of_narrower_views():
    from apx_tests.xsave import BANKS
    xmm_only = {f"ymm{i}": 16 for i in range(16)}
    assert BANKS["ymm"].byte_coverage(xmm_only) == {1: (256, 256), 2: (0, 256)}
    ymm_only = {f"zmm{i}": 32 for i in range(16)}
    assert BANKS["zmm_hi256"].byte_coverage(ymm_only) == {1: (256, 256), 2: (256, 256), 6: (0, 512)}
    assert BANKS["hi16_zmm"].byte_coverage({}) == {7: (0, 1024)}
    assert BANKS["ymm"].byte_coverage({"ymm3": 32, "ymm4": 20}) == {1: (32, 256), 2: (20, 256)}
    assert BANKS["ymm"].coverage_text(xmm_only) == \
        "0/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"
