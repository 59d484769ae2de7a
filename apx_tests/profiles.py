"""CPU profiles: one machine runs the suite as several kinds of host (``--apx-cpu``).

A profile caps the guest-visible CPU at a set of XSAVE components: the KVM backend limits
the CPUID it gives KVM_SET_CPUID2 (feature bits and leaf 0xD, from which KVM derives the
guest's allowed XCR0) and the XCR0 it sets; the QEMU backends remove the matching `-cpu`
features.  So an AVX-512 lab host can answer "what would an AVX2-only host say" and an
AVX2 host "what would a host without AVX say".  A profile only takes away: what the host
lacks stays missing, and a profile that needs more than the host offers is unavailable.

Pure data (imports only apx_tests.xsave); the backends apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .xsave.layout import APX, AVX, PKRU, component_name
from .xsave.xcr0 import AMX_MASK, AVX512_MASK, MPX_MASK

ALL_XCR0 = (1 << 64) - 1


@dataclass(frozen=True)
class CpuProfile:
    name: str
    title: str
    xcr0: int       # the most a guest may enable (intersected with what the host offers)
    requires: int   # what the host must offer for the profile to exist at all

    @property
    def restricts(self) -> bool:
        return self.xcr0 != ALL_XCR0

    def excluded(self, mask: int) -> int:
        """The bits of ``mask`` this profile takes away."""
        return mask & ~self.xcr0

    def describe(self) -> str:
        return f"CPU profile {self.name} (--apx-cpu)"


# A profile is about the vector and APX state: it takes away AVX, AVX-512, AMX and APX
# as a kind of host lacks them, and leaves PKRU and MPX as the host has them (QEMU 10
# keeps PKRU in a KVM guest's leaf 0xD even with -pku, and no bank depends on them).
_NOT_AVX512 = ALL_XCR0 & ~(AVX512_MASK | AMX_MASK | (1 << APX))
PROFILES: dict[str, CpuProfile] = {p.name: p for p in (
    CpuProfile("host", "everything the host offers", ALL_XCR0, 0),
    CpuProfile("sse", "x87 and SSE, no AVX: a CPU before Sandy Bridge", _NOT_AVX512 & ~(1 << AVX), 0x3),
    CpuProfile("avx2", "x87, SSE, AVX, no AVX-512: like AMD Zen 2/3", _NOT_AVX512, 0x7),
    CpuProfile("avx512", "AVX-512 without AMX and APX: like AMD Zen 4 or Intel Ice Lake",
               ALL_XCR0 & ~(AMX_MASK | (1 << APX)), 0xE7),
)}
DEFAULT_PROFILE = "host"


def profile(name: str) -> CpuProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown CPU profile {name!r} (known: {', '.join(PROFILES)})") from None


# XCR0 component group -> the CPUID feature bits that need it: (leaf, subleaf, register
# index 0..3 = eax..edx, bit).  A profile clears the bits of every group it excludes, so
# the guest is never told it has an instruction set whose state it cannot enable.
_A, _B, _C, _D = range(4)
CPUID_FEATURES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    1 << AVX: ((1, 0, _C, 28), (1, 0, _C, 12), (1, 0, _C, 29),       # AVX, FMA, F16C
               (7, 0, _B, 5), (7, 0, _C, 9), (7, 0, _C, 10),         # AVX2, VAES, VPCLMULQDQ
               (7, 1, _A, 4), (7, 1, _A, 23),                        # AVX-VNNI, AVX-IFMA
               (0x80000001, 0, _C, 11), (0x80000001, 0, _C, 16)),    # XOP, FMA4 (AMD)
    AVX512_MASK: tuple((7, 0, _B, b) for b in (16, 17, 21, 26, 27, 28, 30, 31))   # F DQ IFMA PF ER CD BW VL
                 + tuple((7, 0, _C, b) for b in (1, 6, 11, 12, 14))     # VBMI VBMI2 VNNI BITALG VPOPCNTDQ
                 + tuple((7, 0, _D, b) for b in (2, 3, 8, 23))          # 4VNNIW 4FMAPS VP2INTERSECT FP16
                 + ((7, 1, _A, 5), (7, 1, _D, 19)),                      # AVX512_BF16, AVX10
    MPX_MASK: ((7, 0, _B, 14),),
    1 << PKRU: ((7, 0, _C, 3), (7, 0, _C, 4)),                       # PKU, OSPKE
    AMX_MASK: ((7, 0, _D, 22), (7, 0, _D, 24), (7, 0, _D, 25)),      # AMX-BF16, -TILE, -INT8
    1 << APX: ((7, 1, _D, 21),),                                     # APX_F
}

# The same groups as QEMU `-cpu` feature names (target/i386/cpu.c feature_word_info).  A
# name this QEMU does not know (apxf before QEMU 11) is left out by the backend.
QEMU_FEATURES: dict[int, tuple[str, ...]] = {
    1 << AVX: ("avx", "avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx-vnni", "avx-ifma", "xop", "fma4"),
    AVX512_MASK: ("avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw",
                  "avx512vl", "avx512vbmi", "avx512vbmi2", "avx512vnni", "avx512bitalg",
                  "avx512-vpopcntdq", "avx512-4vnniw", "avx512-4fmaps", "avx512-vp2intersect",
                  "avx512-fp16", "avx512-bf16", "avx10"),
    MPX_MASK: ("mpx",),
    1 << PKRU: ("pku",),
    AMX_MASK: ("amx-bf16", "amx-tile", "amx-int8"),
    1 << APX: ("apxf",),
}


def excluded_groups(p: CpuProfile) -> list[int]:
    return [group for group in CPUID_FEATURES if p.excluded(group)]


def restrict_cpuid(p: CpuProfile, leaf: int, subleaf: int, regs: tuple[int, int, int, int]
                   ) -> tuple[int, int, int, int]:
    """One CPUID entry as a guest under profile ``p`` sees it: feature bits of excluded
    components cleared; leaf 0xD limited to the profile's components."""
    out = list(regs)
    for group in excluded_groups(p):
        for f_leaf, f_sub, reg, bit in CPUID_FEATURES[group]:
            if (f_leaf, f_sub) == (leaf, subleaf):
                out[reg] &= ~(1 << bit)
    if leaf == 0xD and p.restricts:
        if subleaf == 0:
            # EAX:EDX = the XCR0 bits a guest may set: KVM takes its guest_supported_xcr0
            # from here, so KVM itself refuses the profile's excluded bits.
            out[0] &= p.xcr0 & 0xFFFFFFFF
            out[3] &= p.xcr0 >> 32
        elif subleaf >= 2 and not p.xcr0 >> subleaf & 1:
            out = [0, 0, 0, 0]
    return tuple(out)


def max_standard_size(entries: dict[tuple[int, int], tuple[int, int, int, int]], xcr0: int) -> int:
    """CPUID.(0xD,0).ECX for the components of ``xcr0``: the end of the last one (at
    least the 576-byte legacy area and header)."""
    end = 576
    for (leaf, sub), (size, offset, _, _) in entries.items():
        if leaf == 0xD and sub >= 2 and xcr0 >> sub & 1 and size:
            end = max(end, offset + size)
    return end


def qemu_cpu(base: str, p: CpuProfile, known: frozenset[str] | None = None) -> str:
    """The `-cpu` argument for profile ``p`` on top of ``base`` ("host,-arch-capabilities",
    "max"); ``known``: the feature names this QEMU lists (others cannot be named)."""
    minus = [name for group in excluded_groups(p) for name in QEMU_FEATURES[group]
             if known is None or name in known]
    return ",".join([base, *(f"-{name}" for name in minus)])


def bits_text(mask: int) -> str:
    """'bits 5-7 (opmask, zmm_hi256, hi16_zmm)' / 'bit 2 (avx)'."""
    numbers = [b for b in range(64) if mask >> b & 1]
    runs: list[list[int]] = []
    for b in numbers:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return f"{'bit' if len(numbers) == 1 else 'bits'} {spans} ({', '.join(component_name(b) for b in numbers)})"


def unavailable(p: CpuProfile, offered: int, where: str) -> str | None:
    """Why ``where`` (whose guests can enable ``offered``) cannot provide profile ``p``."""
    missing = p.requires & ~offered
    if not missing:
        return None
    return f"{p.describe()} needs XCR0 {bits_text(missing)}: {where} offers {offered:#x}"


def exclusion(p: CpuProfile, mask: int) -> str | None:
    """Why a bank needing XCR0 ``mask`` does not run under ``p`` (None: the profile allows it)."""
    excluded = p.excluded(mask)
    if not excluded:
        return None
    return f"{p.describe()} excludes XCR0 {bits_text(excluded)}"


__all__ = ["CpuProfile", "PROFILES", "DEFAULT_PROFILE", "profile", "restrict_cpuid", "qemu_cpu",
           "unavailable", "exclusion", "bits_text", "max_standard_size"]
