"""XCR0 validity (SDM Vol. 1 13.3; KVM's __kvm_set_xcr) and dropping a bank's bits.

Expected values are written out by hand from those rules, not computed by the code under
test.  The host XCR0 values are those seen on machines of our kind and known CPUs: AMD
without PKRU (0x7) and with it (0x207), Intel Xeon KVM (0xe7), Zen 4 (0x2e7), Sapphire
Rapids host (0x600e7 = AMX + AVX-512), and an APX part (0x802e7).
"""

from __future__ import annotations

import pytest

from apx_tests.xsave import BANKS
from apx_tests.xsave.xcr0 import xcr0_problem, xcr0_without

HOST_XCR0 = (0x7, 0x207, 0xE7, 0x2E7, 0x600E7, 0x802E7)


@pytest.mark.parametrize("value", [0x1, 0x3, 0x7, 0x207, 0xE7, 0x1F, 0x600E7, 0x802E7, 0x2E7])
def test_valid_values(value):
    assert xcr0_problem(value) is None


@pytest.mark.parametrize("value,words", [
    (0x6, "bit 0 (x87) must be set"),
    (0x5, "AVX (bit 2) needs SSE (bit 1)"),
    (0xE3, "AVX-512 (bits 5-7) needs AVX (bit 2)"),          # the Intel host's failure
    (0x67, "opmask, ZMM_Hi256 and Hi16_ZMM (bits 5-7) are enabled together"),
    (0xF, "BNDREGS and BNDCSR (bits 3-4) are enabled together"),
    (0x200E7, "XTILECFG and XTILEDATA (bits 17-18) are enabled together"),
    (0x8001F, "APX (bit 19) and MPX (bits 3-4) share one area"),
    (0x107, "supervisor bits 0x100 belong in IA32_XSS"),
])
def test_invalid_values_name_the_rule(value, words):
    problem = xcr0_problem(value)
    assert problem is not None and problem.startswith(f"XCR0 {value:#x}: ") and words in problem


@pytest.mark.parametrize("value,bits,want", [
    (0xE7, 0x7, 0x3),        # ymm on an AVX-512 host: AVX-512 goes with AVX
    (0x7, 0x7, 0x3),         # ymm on an AVX2 host
    (0xE7, 0xE7, 0x3),       # the AVX-512 banks
    (0x2E7, 0xE7, 0x203),    # PKRU stays
    (0x802E7, 1 << 19, 0x2E7),  # APX alone
    (0x600E7, 0xE7, 0x60003),   # AMX stays: it does not depend on AVX
    (0x7, 0x3, 0x7),         # x87/SSE are never cleared
    (0x600E7, 1 << 17, 0xE7),   # half of AMX takes the other half with it
])
def test_without_drops_dependents(value, bits, want):
    assert xcr0_without(value, bits) == want


@pytest.mark.parametrize("host", HOST_XCR0, ids=hex)
@pytest.mark.parametrize("bank", sorted(BANKS))
def test_without_a_bank_is_valid_on_every_host(host, bank):
    """What xcr0_cycle sets: valid wherever the host's XCR0 is, and free of the bank's own
    bits beyond x87/SSE."""
    mask = BANKS[bank].xcr0_mask
    value = xcr0_without(host, mask)
    assert xcr0_problem(value) is None, (hex(host), bank, hex(value))
    assert value & mask & ~0x3 == 0
    assert value & ~host == 0
