"""Which XCR0 values a CPU (and KVM) accepts, and how to drop a feature validly.

XCR0 bits are not independent: XSETBV #GPs, and KVM_SET_XCRS returns EINVAL, for a value
that breaks the SDM's rules (Vol. 1, 13.3 "Enabling the XSAVE feature set").  KVM checks
the same rules in __kvm_set_xcr() (arch/x86/kvm/x86.c).  The XCR0 a host gives a guest
differs from host to host, so "XCR0 without the bank's bits" must be computed, not
written as `xcr0 & ~bits`: on an AVX-512 host, clearing AVX alone (0xe7 -> 0xe3) is
invalid, while on an AVX2-only host the same expression (0x7 -> 0x3) is fine.
"""

from __future__ import annotations

from .layout import APX, AVX, BNDCSR, BNDREGS, HI16_ZMM, OPMASK, SSE, X87, XTILECFG, XTILEDATA, ZMM_HI256

AVX512_MASK = (1 << OPMASK) | (1 << ZMM_HI256) | (1 << HI16_ZMM)
MPX_MASK = (1 << BNDREGS) | (1 << BNDCSR)
AMX_MASK = (1 << XTILECFG) | (1 << XTILEDATA)
# Supervisor components (PT, PASID, CET, HDC, UINTR, LBR, HWP) live in IA32_XSS, never XCR0.
SUPERVISOR_MASK = (1 << 8) | (0x7F << 10)


def xcr0_problem(value: int) -> str | None:
    """Why XSETBV / KVM_SET_XCRS would refuse ``value``, or None when it is valid."""
    if not value & (1 << X87):
        return f"XCR0 {value:#x}: bit 0 (x87) must be set"
    if value & (1 << AVX) and not value & (1 << SSE):
        return f"XCR0 {value:#x}: AVX (bit 2) needs SSE (bit 1)"
    if value & SUPERVISOR_MASK:
        return f"XCR0 {value:#x}: supervisor bits {value & SUPERVISOR_MASK:#x} belong in IA32_XSS"
    for mask, what in ((MPX_MASK, "BNDREGS and BNDCSR (bits 3-4)"),
                       (AVX512_MASK, "opmask, ZMM_Hi256 and Hi16_ZMM (bits 5-7)"),
                       (AMX_MASK, "XTILECFG and XTILEDATA (bits 17-18)")):
        if value & mask and value & mask != mask:
            return f"XCR0 {value:#x}: {what} are enabled together or not at all"
    if value & AVX512_MASK and not value & (1 << AVX):
        return f"XCR0 {value:#x}: AVX-512 (bits 5-7) needs AVX (bit 2)"
    if value & (1 << APX) and value & MPX_MASK:
        return f"XCR0 {value:#x}: APX (bit 19) and MPX (bits 3-4) share one area"
    return None


def xcr0_without(value: int, bits: int) -> int:
    """``value`` with ``bits`` cleared and every bit that depends on them cleared too, so
    the result is valid whenever ``value`` was.  x87 (bit 0) and SSE (bit 1) stay: x87 can
    never be cleared and every other vector component builds on SSE."""
    out = value & ~(bits & ~((1 << X87) | (1 << SSE)))
    if not out & (1 << AVX):
        out &= ~AVX512_MASK
    for group in (MPX_MASK, AVX512_MASK, AMX_MASK):
        if out & group != group:
            out &= ~group
    return out
