"""Where each XSAVE state component lives: the model of CPUID leaf 0xD.

A ``Layout`` is built from CPUID (``Layout.from_cpuid``) at run time; nothing
here hard-codes an offset for components 2 and up.  Components 0 (x87) and 1
(SSE) are the exception: they always live in the 512-byte legacy (FXSAVE)
region, whose layout is architectural, so they are fixed ``Component``s.

``REFERENCE_CPUID`` holds saved leaf-0xD tables of known CPUs.  They exist for
tests and documentation only; code that decides what to run must read CPUID.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .errors import ApxMpxConflict, MalformedLayout, UnknownComponent, UnsupportedComponent

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
XSTATE_BV_OFFSET = 512
XCOMP_BV_OFFSET = 520
HEADER_RESERVED = (528, 576)  # header bytes 16..63, must be zero
EXTENDED_AREA = LEGACY_SIZE + HEADER_SIZE  # 576: first byte after the header
XCOMP_BV_COMPACTED = 1 << 63  # XCOMP_BV bit 63: the image is in compacted format
COMPACT_ALIGN = 64

X87, SSE, AVX, BNDREGS, BNDCSR, OPMASK, ZMM_HI256, HI16_ZMM = range(8)
PKRU, XTILECFG, XTILEDATA, APX = 9, 17, 18, 19
MPX_MASK = (1 << BNDREGS) | (1 << BNDCSR)
APX_MASK = 1 << APX

COMPONENT_NAMES: dict[int, str] = {
    0: "x87",
    1: "sse",
    2: "avx",
    3: "bndregs",
    4: "bndcsr",
    5: "opmask",
    6: "zmm_hi256",
    7: "hi16_zmm",
    8: "pt",
    9: "pkru",
    10: "pasid",
    11: "cet_u",
    12: "cet_s",
    13: "hdc",
    14: "uintr",
    15: "lbr",
    16: "hwp",
    17: "xtilecfg",
    18: "xtiledata",
    19: "apx",
}

# Named fields of the legacy region's first 32 bytes: (offset, size).
# FTW here is the *abridged* tag byte of FXSAVE/XSAVE (0 = all registers empty).
# MXCSR and MXCSR_MASK sit inside the x87 component's byte range but are SSE state.
LEGACY_FIELDS: dict[str, tuple[int, int]] = {
    "fcw": (0, 2),
    "fsw": (2, 2),
    "ftw": (4, 1),
    "fop": (6, 2),
    "fip": (8, 8),
    "fdp": (16, 8),
    "mxcsr": (24, 4),
    "mxcsr_mask": (28, 4),
}
MXCSR_BYTES = (24, 32)  # MXCSR + MXCSR_MASK, not governed by XSTATE_BV bit 0
FCW_INIT = 0x037F  # x87 init state: FCW=0x037F, everything else 0
MXCSR_DEFAULT = 0x1F80


def component_name(number: int) -> str:
    return COMPONENT_NAMES.get(number, f"component{number}")


def bits(mask: int) -> list[int]:
    """The set bit numbers of ``mask``, lowest first."""
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


@dataclass(frozen=True)
class Component:
    """One XSAVE state component.

    ``offset`` is the standard-format offset (CPUID.0xD.i EBX); supervisor
    components have none (0) because they only exist in the compacted format.
    ``aligned`` (CPUID.0xD.i ECX bit 1) means: 64-byte aligned when compacted.
    """

    number: int
    name: str
    size: int
    offset: int
    aligned: bool = False
    supervisor: bool = False

    @property
    def mask(self) -> int:
        return 1 << self.number

    @property
    def end(self) -> int:
        """First byte after the component in the standard format."""
        return self.offset + self.size

    def __str__(self) -> str:
        return f"component {self.number} {self.name}"


# The legacy region, fixed by the architecture.  x87 covers bytes 0..159
# (FCW..FDP, MXCSR's 8 bytes that belong to SSE, ST0-7 at 32+16i); SSE's own
# range is XMM0-15 at 160..415 (MXCSR is handled apart, see image.py).
X87_COMPONENT = Component(X87, "x87", 160, 0)
SSE_COMPONENT = Component(SSE, "sse", 256, 160)
LEGACY_COMPONENTS = {X87: X87_COMPONENT, SSE: SSE_COMPONENT}

CpuidFn = Callable[[int, int], tuple[int, int, int, int]]


@dataclass(frozen=True)
class Layout:
    """What CPUID leaf 0xD says about the XSAVE area of one (virtual) CPU.

    ``supported_xcr0`` is the user-state mask (CPUID.0xD.0 EDX:EAX),
    ``supported_xss`` the supervisor-state mask (CPUID.0xD.1 EDX:ECX),
    ``standard_size`` the standard-format size for all supported user
    components (CPUID.0xD.0 ECX).  ``components`` always includes 0 and 1.
    ``source`` names where the CPUID came from; it is used in error messages
    and does not take part in equality.
    """

    supported_xcr0: int
    components: Mapping[int, Component]
    standard_size: int
    supported_xss: int = 0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        comps = dict(LEGACY_COMPONENTS)
        comps.update(self.components)
        object.__setattr__(self, "components", dict(sorted(comps.items())))
        object.__setattr__(self, "supported_xcr0", self.supported_xcr0 | 0b11)
        self._check()

    def __hash__(self) -> int:  # components is a dict; hash its items
        return hash((self.supported_xcr0, tuple(self.components.items()), self.standard_size, self.supported_xss))

    # ---- construction -------------------------------------------------

    @classmethod
    def from_cpuid(cls, cpuid: CpuidFn, source: str = "CPUID") -> "Layout":
        """Read leaf 0xD through ``cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx)``."""
        eax, _ebx, ecx, edx = _regs(cpuid(0xD, 0))
        xcr0 = eax | edx << 32
        standard_size = ecx
        _eax1, _ebx1, ecx1, edx1 = _regs(cpuid(0xD, 1))
        xss = ecx1 | edx1 << 32
        components: dict[int, Component] = {}
        for n in bits((xcr0 | xss) & ~0b11 & (XCOMP_BV_COMPACTED - 1)):
            size, offset, flags, _ = _regs(cpuid(0xD, n))
            components[n] = Component(
                number=n,
                name=component_name(n),
                size=size,
                offset=offset,
                aligned=bool(flags & 2),
                supervisor=bool(flags & 1),
            )
        return cls(xcr0, components, standard_size, xss, source)

    @classmethod
    def from_table(
        cls, table: Mapping[tuple[int, int], tuple[int, int, int, int]], source: str = "CPUID table"
    ) -> "Layout":
        """``from_cpuid`` over a saved ``{(leaf, subleaf): (eax, ebx, ecx, edx)}``."""
        return cls.from_cpuid(lambda leaf, sub: table.get((leaf, sub), (0, 0, 0, 0)), source)

    @classmethod
    def reference(cls, name: str) -> "Layout":
        """The layout of one of ``REFERENCE_CPUID`` (tests and docs only)."""
        return cls.from_table(REFERENCE_CPUID[name], f"CPUID table {name}")

    def to_table(self) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """The leaf-0xD entries this layout was (or could have been) read from."""
        table = {
            (0xD, 0): (self.supported_xcr0 & 0xFFFFFFFF, self.standard_size, self.standard_size,
                       self.supported_xcr0 >> 32),
            (0xD, 1): (0, 0, self.supported_xss & 0xFFFFFFFF, self.supported_xss >> 32),
        }
        for c in self.components.values():
            if c.number >= 2:
                table[(0xD, c.number)] = (c.size, c.offset, int(c.supervisor) | int(c.aligned) << 1, 0)
        return table

    # ---- look-ups -----------------------------------------------------

    @property
    def where(self) -> str:
        return self.source or "XSAVE layout"

    def component(self, n_or_name: int | str) -> Component:
        """A component by number or by name (``19`` or ``"apx"``)."""
        if n_or_name in self.components:  # by number: the common case, a dict lookup
            return self.components[n_or_name]
        for c in self.components.values():
            if c.number == n_or_name or c.name == n_or_name:
                return c
        known = " ".join(f"{c.number}:{c.name}" for c in self.components.values())
        raise UnknownComponent(self.where, f"component {n_or_name!r} is not described by the layout (has {known})")

    def has(self, n_or_name: int | str) -> bool:
        if n_or_name in self.components:
            return True
        return any(c.number == n_or_name or c.name == n_or_name for c in self.components.values())

    def user_components(self) -> list[Component]:
        return [c for c in self.components.values() if not c.supervisor]

    def check_supported(self, mask: int, what: str, *, allow_supervisor: bool = False, where: str = "") -> None:
        """Raise ``UnsupportedComponent`` naming the first bit of ``mask`` not supported."""
        allowed = self.supported_xcr0 | (self.supported_xss if allow_supervisor else 0)
        extra = mask & ~allowed
        if extra:
            bit = bits(extra)[0]
            kind = "supervisor state, not in the standard format" if self.supported_xss >> bit & 1 else (
                f"not in the supported XCR0 {self.supported_xcr0:#x}")
            raise UnsupportedComponent(where or self.where, f"{what} bit {bit} ({component_name(bit)}) is {kind}")

    # ---- sizes and offsets --------------------------------------------

    def standard_size_for(self, xcr0: int) -> int:
        """Standard-format size for the components in ``xcr0`` (like CPUID.0xD.0 EBX)."""
        self.check_supported(xcr0, "XCR0")
        return max([EXTENDED_AREA] + [self.components[n].end for n in bits(xcr0) if n >= 2])

    def compacted_offsets(self, xcomp_bv: int) -> dict[int, int]:
        """Offsets in a compacted image with this XCOMP_BV (bit 63 ignored).

        Components 0 and 1 are always in the legacy region.  Components 2 and
        up follow each other from byte 576 in number order; an aligned
        component starts at the next multiple of 64.
        """
        xcomp_bv &= XCOMP_BV_COMPACTED - 1
        self.check_supported(xcomp_bv, "XCOMP_BV", allow_supervisor=True)
        offsets = {X87: X87_COMPONENT.offset, SSE: SSE_COMPONENT.offset}
        cursor = EXTENDED_AREA
        for n in bits(xcomp_bv):
            if n < 2:
                continue
            c = self.components[n]
            if c.aligned:
                cursor = -(-cursor // COMPACT_ALIGN) * COMPACT_ALIGN
            offsets[n] = cursor
            cursor += c.size
        return offsets

    def compacted_size(self, xcomp_bv: int) -> int:
        offsets = self.compacted_offsets(xcomp_bv)
        return max([EXTENDED_AREA] + [off + self.components[n].size for n, off in offsets.items() if n >= 2])

    # ---- consistency ----------------------------------------------------

    def _check(self) -> None:
        if self.supported_xcr0 & APX_MASK and self.supported_xcr0 & MPX_MASK:
            mpx = " ".join(str(b) for b in bits(self.supported_xcr0 & MPX_MASK))
            raise ApxMpxConflict(
                self.where,
                f"layout supports APX (bit 19) and MPX (bit {mpx}) together in XCR0 {self.supported_xcr0:#x}; "
                "they share offsets 960..1087",
            )
        for n in bits((self.supported_xcr0 | self.supported_xss) & ~0b11 & (XCOMP_BV_COMPACTED - 1)):
            if n not in self.components:
                raise MalformedLayout(self.where, f"bit {n} ({component_name(n)}) is supported but has no CPUID.0xD.{n} entry")
        user = [c for c in self.components.values() if c.number >= 2 and not c.supervisor]
        for c in self.components.values():
            if c.size <= 0:
                raise MalformedLayout(self.where, f"{c} has size {c.size}")
        for c in user:
            if c.offset < EXTENDED_AREA:
                raise MalformedLayout(self.where, f"{c} has standard offset {c.offset}, inside legacy region/header")
            if self.standard_size and c.end > self.standard_size:
                raise MalformedLayout(
                    self.where, f"{c} ends at {c.end}, beyond the standard size {self.standard_size} (CPUID.0xD.0 ECX)")
        ordered = sorted(user, key=lambda c: c.offset)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.offset:
                raise MalformedLayout(self.where, f"{a} ({a.offset}..{a.end - 1}) overlaps {b} ({b.offset}..{b.end - 1})")


def _regs(value) -> tuple[int, int, int, int]:
    eax, ebx, ecx, edx = (int(v) & 0xFFFFFFFF for v in value)
    return eax, ebx, ecx, edx


# ---------------------------------------------------------------------------
# Saved CPUID leaf 0xD tables (tests and documentation ONLY).
# (leaf, subleaf) -> (eax, ebx, ecx, edx).  0xD.i: EAX size, EBX standard
# offset, ECX bit0 supervisor, bit1 64-byte aligned when compacted.

REFERENCE_CPUID: dict[str, dict[tuple[int, int], tuple[int, int, int, int]]] = {
    # Diamond Rapids-like, assembled from apx-facts.md (not dumped from silicon):
    # x87 sse avx opmask zmm_hi256 hi16_zmm pkru xtilecfg xtiledata apx;
    # APX at 960 (MPX's old area), AMX tiles 64-byte aligned when compacted.
    "intel-apx": {
        (0xD, 0): (0x000E02E7, 0x00002B00, 0x00002B00, 0x00000000),  # 11008 bytes
        (0xD, 1): (0x0000001F, 0x00002B00, 0x00001800, 0x00000000),  # XSS: cet_u cet_s
        (0xD, 2): (0x00000100, 0x00000240, 0x00000000, 0x00000000),  # avx 256 @ 576
        (0xD, 5): (0x00000040, 0x00000440, 0x00000000, 0x00000000),  # opmask 64 @ 1088
        (0xD, 6): (0x00000200, 0x00000480, 0x00000000, 0x00000000),  # zmm_hi256 512 @ 1152
        (0xD, 7): (0x00000400, 0x00000680, 0x00000000, 0x00000000),  # hi16_zmm 1024 @ 1664
        (0xD, 9): (0x00000008, 0x00000A80, 0x00000000, 0x00000000),  # pkru 8 @ 2688
        (0xD, 11): (0x00000010, 0x00000000, 0x00000001, 0x00000000),  # cet_u (supervisor)
        (0xD, 12): (0x00000018, 0x00000000, 0x00000001, 0x00000000),  # cet_s (supervisor)
        (0xD, 17): (0x00000040, 0x00000AC0, 0x00000002, 0x00000000),  # xtilecfg 64 @ 2752
        (0xD, 18): (0x00002000, 0x00000B00, 0x00000006, 0x00000000),  # xtiledata 8192 @ 2816 (XFD)
        (0xD, 19): (0x00000080, 0x000003C0, 0x00000000, 0x00000000),  # apx 128 @ 960
    },
    # Skylake-SP: MPX present, no APX.
    "intel-skx-mpx": {
        (0xD, 0): (0x000002FF, 0x00000A88, 0x00000A88, 0x00000000),  # 2696 bytes
        (0xD, 1): (0x0000000F, 0x00000A88, 0x00000100, 0x00000000),  # XSS: pt
        (0xD, 2): (0x00000100, 0x00000240, 0x00000000, 0x00000000),  # avx 256 @ 576
        (0xD, 3): (0x00000040, 0x000003C0, 0x00000000, 0x00000000),  # bndregs 64 @ 960
        (0xD, 4): (0x00000040, 0x00000400, 0x00000000, 0x00000000),  # bndcsr 64 @ 1024
        (0xD, 5): (0x00000040, 0x00000440, 0x00000000, 0x00000000),  # opmask 64 @ 1088
        (0xD, 6): (0x00000200, 0x00000480, 0x00000000, 0x00000000),  # zmm_hi256 512 @ 1152
        (0xD, 7): (0x00000400, 0x00000680, 0x00000000, 0x00000000),  # hi16_zmm 1024 @ 1664
        (0xD, 8): (0x00000080, 0x00000000, 0x00000001, 0x00000000),  # pt (supervisor)
        (0xD, 9): (0x00000008, 0x00000A80, 0x00000000, 0x00000000),  # pkru 8 @ 2688
    },
    # Measured on this project's machine (AMD EPYC, Zen 3 class, as seen by the VM).
    "amd-zen3": {
        (0xD, 0): (0x00000007, 0x00000340, 0x00000340, 0x00000000),  # 832 bytes
        (0xD, 2): (0x00000100, 0x00000240, 0x00000000, 0x00000000),  # avx 256 @ 576
    },
    # Zen 4: AVX-512 packed right after AVX (no MPX hole), PKRU at 0x980.
    "amd-zen4": {
        (0xD, 0): (0x000002E7, 0x00000988, 0x00000988, 0x00000000),  # 2440 bytes
        (0xD, 1): (0x0000000F, 0x00000988, 0x00000000, 0x00000000),
        (0xD, 2): (0x00000100, 0x00000240, 0x00000000, 0x00000000),  # avx 256 @ 576
        (0xD, 5): (0x00000040, 0x00000340, 0x00000000, 0x00000000),  # opmask 64 @ 832
        (0xD, 6): (0x00000200, 0x00000380, 0x00000000, 0x00000000),  # zmm_hi256 512 @ 896
        (0xD, 7): (0x00000400, 0x00000580, 0x00000000, 0x00000000),  # hi16_zmm 1024 @ 1408
        (0xD, 9): (0x00000008, 0x00000980, 0x00000000, 0x00000000),  # pkru 8 @ 2432
    },
}
