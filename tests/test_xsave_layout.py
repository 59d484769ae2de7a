"""Layout: CPUID leaf 0xD -> components.  Expected numbers are copied from
/work/shared/reference/apx-facts.md, not computed by the code under test."""

import pytest
from hypothesis import given, settings, strategies as st

from apx_tests.xsave import (
    REFERENCE_CPUID,
    ApxMpxConflict,
    Layout,
    MalformedLayout,
    UnknownComponent,
    UnsupportedComponent,
)

# component -> (standard offset, size), from the facts doc's table
FACTS_INTEL = {2: (576, 256), 3: (960, 64), 4: (1024, 64), 5: (1088, 64), 6: (1152, 512),
               7: (1664, 1024), 9: (2688, 8), 17: (2752, 64), 18: (2816, 8192), 19: (960, 128)}


def offsets(layout):
    return {n: (c.offset, c.size) for n, c in layout.components.items() if n >= 2 and not c.supervisor}


def test_intel_apx_matches_facts():
    layout = Layout.reference("intel-apx")
    want = {n: FACTS_INTEL[n] for n in (2, 5, 6, 7, 9, 17, 18, 19)}
    assert offsets(layout) == want
    assert layout.supported_xcr0 == 0x3 | 0x4 | 0xE0 | 0x200 | (1 << 17) | (1 << 18) | (1 << 19)
    assert layout.standard_size == 11008  # "AMX hosts need 11008"
    assert layout.component("apx").offset == 0x3C0
    assert layout.component(17).aligned and layout.component(18).aligned
    assert not layout.component(19).aligned and not layout.component(19).supervisor


def test_intel_skx_mpx_matches_facts():
    layout = Layout.reference("intel-skx-mpx")
    assert offsets(layout) == {n: FACTS_INTEL[n] for n in (2, 3, 4, 5, 6, 7, 9)}
    assert layout.supported_xcr0 == 0x2FF
    assert layout.standard_size == 2688 + 8
    assert layout.component(8).supervisor and layout.supported_xss == 0x100


def test_amd_zen3_reference_table():
    """The saved "amd-zen3" table as written (XCR0 0x7, 832 bytes: what an earlier machine of our
    kind reported). It is not a claim about this machine: whether this host matches the
    description of its kind is checked against the live CPU in
    test_host_descriptions.py::test_this_host_matches_its_kind_description."""
    layout = Layout.reference("amd-zen3")
    assert layout.supported_xcr0 == 0x7
    assert offsets(layout) == {2: (576, 256)}
    assert layout.standard_size == 0x340
    with pytest.raises(UnknownComponent):
        layout.component("apx")


def test_amd_zen4_pkru_at_0x980():
    layout = Layout.reference("amd-zen4")
    assert layout.supported_xcr0 == 0x2E7
    assert layout.component("pkru").offset == 0x980 and layout.component("pkru").size == 8
    assert layout.component("opmask").offset == 832  # packed, no MPX hole on AMD
    assert layout.standard_size == 0x988


def test_legacy_components_are_fixed():
    for name in REFERENCE_CPUID:
        layout = Layout.reference(name)
        assert (layout.component(0).offset, layout.component(0).size) == (0, 160)
        assert (layout.component("sse").offset, layout.component("sse").size) == (160, 256)


def test_from_cpuid_callable_equals_table_and_round_trips():
    table = REFERENCE_CPUID["intel-apx"]
    calls = []

    def cpuid(leaf, sub):
        calls.append((leaf, sub))
        return table.get((leaf, sub), (0, 0, 0, 0))

    layout = Layout.from_cpuid(cpuid, "fake")
    assert layout == Layout.from_table(table)
    assert (0xD, 19) in calls and (0xD, 3) not in calls  # only set bits are read
    assert Layout.from_table(layout.to_table()) == layout


def test_standard_size_for():
    layout = Layout.reference("intel-apx")
    assert layout.standard_size_for(0x3) == 576
    assert layout.standard_size_for(0x7) == 832
    assert layout.standard_size_for(0xE7) == 2688
    assert layout.standard_size_for(0x80003) == 1088
    assert layout.standard_size_for(layout.supported_xcr0) == 11008
    with pytest.raises(UnsupportedComponent, match="bit 3 .bndregs."):
        layout.standard_size_for(0xF)


def test_compacted_offsets_by_hand():
    layout = Layout.reference("intel-apx")
    full = layout.compacted_offsets((1 << 63) | layout.supported_xcr0)
    # 576 avx(256) 832 opmask(64) 896 zmm_hi256(512) 1408 hi16(1024) 2432 pkru(8)
    # 2440 -> aligned 2496 xtilecfg(64) 2560 xtiledata(8192) 10752 apx(128) 10880
    assert full == {0: 0, 1: 160, 2: 576, 5: 832, 6: 896, 7: 1408, 9: 2432,
                    17: 2496, 18: 2560, 19: 10752}
    assert layout.compacted_size(layout.supported_xcr0) == 10880
    assert layout.compacted_offsets(0x80000) == {0: 0, 1: 160, 19: 576}
    # pkru then xtilecfg: 576 + 8 = 584 rounds up to 640
    assert layout.compacted_offsets(0x20200)[17] == 640
    assert layout.compacted_size(0x3) == 576


def test_compacted_offsets_include_supervisor_components():
    layout = Layout.reference("intel-apx")
    offs = layout.compacted_offsets(0x1807)  # avx, cet_u, cet_s
    assert offs[11] == 832 and offs[12] == 848


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(REFERENCE_CPUID)), st.integers(0, 2**20 - 1))
def test_compacted_offsets_properties(name, raw):
    layout = Layout.reference(name)
    mask = raw & (layout.supported_xcr0 | layout.supported_xss)
    offs = layout.compacted_offsets(mask)
    cursor = 576
    for n in sorted(k for k in offs if k >= 2):
        comp = layout.component(n)
        gap = offs[n] - cursor
        assert 0 <= gap < (64 if comp.aligned else 1)
        if comp.aligned:
            assert offs[n] % 64 == 0
        cursor = offs[n] + comp.size
    assert layout.compacted_size(mask) == cursor


def test_layout_claiming_apx_and_mpx_is_rejected():
    table = dict(REFERENCE_CPUID["intel-skx-mpx"])
    eax, ebx, ecx, edx = table[(0xD, 0)]
    table[(0xD, 0)] = (eax | 1 << 19, ebx, ecx, edx)
    table[(0xD, 19)] = (128, 960, 0, 0)
    with pytest.raises(ApxMpxConflict) as err:
        Layout.from_table(table, "CPUID table bad")
    msg = str(err.value)
    assert msg.startswith("CPUID table bad: ") and "19" in msg and "\n" not in msg


def test_malformed_layouts():
    table = dict(REFERENCE_CPUID["amd-zen4"])
    table[(0xD, 6)] = (512, 880, 0, 0)  # overlaps opmask 832..895
    with pytest.raises(MalformedLayout, match="overlaps"):
        Layout.from_table(table)
    table = dict(REFERENCE_CPUID["amd-zen3"])
    table[(0xD, 2)] = (0, 576, 0, 0)
    with pytest.raises(MalformedLayout, match="size 0"):
        Layout.from_table(table)


def test_unknown_component_message():
    with pytest.raises(UnknownComponent) as err:
        Layout.reference("amd-zen3").component(19)
    assert str(err.value).startswith("CPUID table amd-zen3: component 19")
