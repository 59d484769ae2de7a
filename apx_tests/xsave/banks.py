"""Register banks: named registers and where their bytes live in XSAVE state.

A register is a list of ``Slot``s, each a byte range inside one component, so
one name can span components: ``ymm3`` = xmm3 (legacy region) + its upper half
(component 2); ``zmm5`` = xmm5 + ymmh5 + zmmh5 (component 6).  Offsets are
relative to the component, never absolute, so the same ``Register`` works for
standard and compacted images of any CPU.

``Bank.pack`` concatenates register values in bank order.  That order is an ABI:
the guest payloads load and store registers contiguously in exactly this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .errors import UnknownRegister
from .layout import APX, AVX, HI16_ZMM, OPMASK, PKRU, SSE, X87, ZMM_HI256

# Legacy-region byte offsets of the x87 registers and of XMM0 (relative to the
# x87 and SSE components, which start at 0 and 160 respectively).
ST_SLOT = 16  # each ST(i) occupies 16 bytes of which 10 hold the 80-bit value
ST0_OFFSET = 32
ST_WIDTH = 10


@dataclass(frozen=True)
class Slot:
    """``size`` bytes at ``offset`` inside component ``component``."""

    component: int
    offset: int
    size: int


@dataclass(frozen=True)
class Register:
    """A named register; its value is its slots' bytes concatenated, in order."""

    name: str
    width: int
    slots: tuple[Slot, ...]
    index: int
    bank: str = ""

    def __post_init__(self) -> None:
        if sum(s.size for s in self.slots) != self.width:
            raise ValueError(f"register {self.name}: slots cover {sum(s.size for s in self.slots)} bytes, width is {self.width}")

    @property
    def components(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(s.component for s in self.slots))

    @property
    def xstate_mask(self) -> int:
        """XSTATE_BV bits a write of this register makes live."""
        mask = 0
        for c in self.components:
            mask |= 1 << c
        return mask

    def check_width(self, value: bytes) -> None:
        if len(value) != self.width:
            raise ValueError(f"register {self.name} is {self.width} bytes, value has {len(value)}")

    def pieces(self, value: bytes):
        """Yield ``(slot, register_byte_offset, bytes)`` for each slot of ``value``."""
        self.check_width(value)
        pos = 0
        for slot in self.slots:
            yield slot, pos, bytes(value[pos:pos + slot.size])
            pos += slot.size

    def slot_at(self, byte_index: int) -> tuple[Slot, int]:
        """The slot holding register byte ``byte_index`` and the offset within that slot."""
        pos = 0
        for slot in self.slots:
            if byte_index < pos + slot.size:
                return slot, byte_index - pos
            pos += slot.size
        raise IndexError(f"register {self.name} has {self.width} bytes, no byte {byte_index}")


@dataclass(frozen=True)
class Bank:
    """A group of registers loaded and checked together by one guest payload.

    ``xcr0_mask``: XCR0 bits that must be enabled to use the bank.
    ``side_effects``: half-open byte ranges ``(start, stop)`` of the *standard*
    image, outside the bank's registers, that loading the bank legitimately
    changes (besides the XSTATE_BV bits of ``components``).
    ``pattern_id``: this bank's term in ``pattern`` (so banks differ).
    """

    name: str
    components: tuple[int, ...]
    registers: tuple[Register, ...]
    xcr0_mask: int
    cpuid_requirement: str
    description: str
    pattern_id: int = 0
    side_effects: tuple[tuple[int, int], ...] = field(default=())

    # Derived once: scenarios read these several times per run (see ci/bench).
    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.registers)

    @cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    @cached_property
    def size(self) -> int:
        return sum(r.width for r in self.registers)

    @cached_property
    def xstate_mask(self) -> int:
        mask = 0
        for c in self.components:
            mask |= 1 << c
        return mask

    @cached_property
    def own_component(self) -> int:
        """The component that makes this bank what it is: its highest (ymm: 2, the upper
        halves; zmm_hi256: 6).  A path reaching only the lower ones (xmm0-15 of ymm)
        checks another bank's bytes, not this one's."""
        return max(self.components)

    def byte_coverage(self, widths: dict[str, int]) -> dict[int, tuple[int, int]]:
        """component -> (bytes reached, bytes the bank has there), given how many low
        bytes of each register a path (a debugger, a monitor) reached; registers absent
        from ``widths`` were not reached at all."""
        out = {c: [0, 0] for c in self.components}
        for reg in self.registers:
            reached = min(widths.get(reg.name, 0), reg.width)
            for slot in reg.slots:
                out[slot.component][1] += slot.size
                out[slot.component][0] += max(0, min(slot.size, reached))
                reached -= slot.size
        return {c: (got, total) for c, (got, total) in out.items()}

    def coverage_text(self, widths: dict[str, int]) -> str:
        """'0/256 bytes of component 2 (avx), 256/256 of component 1 (sse)': own component first."""
        from .layout import component_name
        cov = self.byte_coverage(widths)
        order = [self.own_component] + [c for c in self.components if c != self.own_component]
        parts = [f"{cov[c][0]}/{cov[c][1]} bytes of component {c} ({component_name(c)})" for c in order]
        return ", ".join(parts)

    def available(self, xcr0: int) -> bool:
        """True when every XCR0 bit the bank needs is in ``xcr0``."""
        return self.xcr0_mask & ~xcr0 == 0

    def missing_xcr0(self, xcr0: int) -> int:
        return self.xcr0_mask & ~xcr0

    def register(self, name: str) -> Register:
        for r in self.registers:
            if r.name == name:
                return r
        raise UnknownRegister(f"bank {self.name}", f"no register {name!r} (has {self.names[0]}..{self.names[-1]})")

    # ---- the packed ABI -------------------------------------------------

    def pack(self, values: dict[str, bytes]) -> bytes:
        """Register values concatenated in bank order (the guest payload's layout)."""
        if values.keys() != self._name_set:
            unknown = [n for n in values if n not in self._name_set]
            missing = [n for n in self.names if n not in values]
            raise ValueError(f"bank {self.name}: pack needs exactly {self.names[0]}..{self.names[-1]}; "
                             f"missing {missing}, unknown {unknown}")
        out = bytearray()
        for r in self.registers:
            v = bytes(values[r.name])
            if len(v) != r.width:
                raise ValueError(f"bank {self.name}: {r.name} is {r.width} bytes, value has {len(v)}")
            out += v
        return bytes(out)

    def unpack(self, data: bytes) -> dict[str, bytes]:
        if len(data) != self.size:
            raise ValueError(f"bank {self.name}: packed data must be {self.size} bytes, got {len(data)}")
        out, pos = {}, 0
        for r in self.registers:
            out[r.name] = bytes(data[pos:pos + r.width])
            pos += r.width
        return out

    def locate(self, offset: int) -> tuple[str, int]:
        """``(register_name, byte_index)`` of byte ``offset`` of the packed data."""
        if offset < 0:
            raise IndexError(f"bank {self.name}: negative offset {offset}")
        pos = 0
        for r in self.registers:
            if offset < pos + r.width:
                return r.name, offset - pos
            pos += r.width
        raise IndexError(f"bank {self.name}: offset {offset} is past the packed size {self.size}")

    # ---- test patterns ----------------------------------------------------

    def pattern(self, stage: int, salt: int = 0) -> dict[str, bytes]:
        """Deterministic register values for ``stage``.

        byte b of register i = 1 + ((salt*0x3b + stage*0x61 + i*0x1d + b*0x07
        + pattern_id*0x0b) % 255).  Every byte is 1..255 (a zeroed lane shows);
        0x07 steps between bytes (a byte shift shows); 0x1d and 0x61 are coprime
        to 255 so registers of a stage and stages of a register never repeat
        (a swap or a stale value shows).  Some banks then patch bytes so the
        value is legal for the instruction that loads it (see ``_make_legal``).
        """
        key = (stage, salt)
        if key not in self._patterns:
            self._patterns[key] = self._make_pattern(stage, salt)
        return dict(self._patterns[key])

    @cached_property
    def _patterns(self) -> dict[tuple[int, int], tuple[tuple[str, bytes], ...]]:
        return {}

    def _make_pattern(self, stage: int, salt: int) -> tuple[tuple[str, bytes], ...]:
        base = salt * 0x3B + stage * 0x61 + self.pattern_id * 0x0B
        out = []
        for r in self.registers:
            raw = bytearray(1 + ((base + r.index * 0x1D + b * 0x07) % 255) for b in range(r.width))
            out.append((r.name, bytes(_make_legal(self.name, raw))))
        return tuple(out)


def _make_legal(bank: str, value: bytearray) -> bytearray:
    """Patch a pattern so loading/storing it is exact and harmless; keep bytes non-zero."""
    if bank == "x87":
        # fldt/fstpt round-trip a NORMAL 80-bit number bit-exactly: integer bit
        # (significand bit 63 = byte 7 bit 7) set, exponent in 1..0x7FFE.
        value[7] |= 0x80
        exponent = value[8] | (value[9] & 0x7F) << 8  # byte 8 != 0, so exponent >= 1
        if exponent == 0x7FFF:
            value[8] = 0xFE
    elif bank == "pkru":
        # PKRU bits 0/1 are access/write-disable for protection key 0, the key of
        # every ordinary page: keep them clear or the CPL3 guest faults on its data.
        value[0] &= 0xFC
        if value[0] == 0:
            value[0] = 0x04
    return value


# ---------------------------------------------------------------------------
# The banks.  Order of BANKS fixes each bank's pattern_id; order of registers
# inside a bank is the guest payload ABI.  Do not reorder.

def _xmm_slot(i: int) -> Slot:
    return Slot(SSE, 16 * i, 16)


def _regs(bank: str, names, slot_lists) -> tuple[Register, ...]:
    return tuple(
        Register(name, sum(s.size for s in slots), tuple(slots), i, bank)
        for i, (name, slots) in enumerate(zip(names, slot_lists))
    )


_AVX512_REQ = ("CPUID.(EAX=7,ECX=0):EBX[16] (AVX512F), CPUID.1:ECX[27] (OSXSAVE) "
               "and XCR0 bits 0,1,2,5,6,7 (0xe7)")

_BANK_LIST = [
    Bank(
        "apx", (APX,),
        _regs("apx", [f"r{16 + i}" for i in range(16)], [[Slot(APX, 8 * i, 8)] for i in range(16)]),
        xcr0_mask=1 << APX,
        cpuid_requirement="CPUID.(EAX=7,ECX=1):EDX[21] (APX_F) and XCR0[19]",
        description="APX extended GPRs R16-R31, 8 bytes each, XSAVE component 19",
    ),
    Bank(
        "hi16_zmm", (HI16_ZMM,),
        _regs("hi16_zmm", [f"zmm{16 + i}" for i in range(16)], [[Slot(HI16_ZMM, 64 * i, 64)] for i in range(16)]),
        xcr0_mask=0xE7,
        cpuid_requirement=_AVX512_REQ,
        description="ZMM16-ZMM31, 64 bytes each, all in component 7 (Hi16_ZMM)",
    ),
    Bank(
        "zmm_hi256", (SSE, AVX, ZMM_HI256),
        _regs("zmm_hi256", [f"zmm{i}" for i in range(16)],
              [[_xmm_slot(i), Slot(AVX, 16 * i, 16), Slot(ZMM_HI256, 32 * i, 32)] for i in range(16)]),
        xcr0_mask=0xE7,
        cpuid_requirement=_AVX512_REQ,
        description="ZMM0-ZMM15 full width: xmm (legacy) + ymm upper half (component 2) + zmm upper 256 (component 6)",
    ),
    Bank(
        "opmask", (OPMASK,),
        _regs("opmask", [f"k{i}" for i in range(8)], [[Slot(OPMASK, 8 * i, 8)] for i in range(8)]),
        xcr0_mask=0xE7,
        cpuid_requirement=_AVX512_REQ.replace("(AVX512F)", "(AVX512F) and EBX[30] (AVX512BW, for 64-bit kmovq)"),
        description="AVX-512 opmask registers k0-k7, 8 bytes each, component 5",
    ),
    Bank(
        "ymm", (SSE, AVX),
        _regs("ymm", [f"ymm{i}" for i in range(16)], [[_xmm_slot(i), Slot(AVX, 16 * i, 16)] for i in range(16)]),
        xcr0_mask=0x7,
        cpuid_requirement="CPUID.1:ECX[28] (AVX), CPUID.1:ECX[27] (OSXSAVE) and XCR0 bits 0,1,2 (0x7)",
        description="YMM0-YMM15: xmm (legacy region) + upper 128 bits (component 2)",
    ),
    Bank(
        "xmm", (SSE,),
        _regs("xmm", [f"xmm{i}" for i in range(16)], [[_xmm_slot(i)] for i in range(16)]),
        xcr0_mask=0x3,
        cpuid_requirement="CPUID.1:EDX[25..26] (SSE, SSE2), CR4.OSFXSR and XCR0 bits 0,1",
        description="XMM0-XMM15, 16 bytes each, legacy region bytes 160..415 (component 1)",
    ),
    Bank(
        "x87", (X87,),
        _regs("x87", [f"st{i}" for i in range(8)],
              [[Slot(X87, ST0_OFFSET + ST_SLOT * i, ST_WIDTH)] for i in range(8)]),
        xcr0_mask=0x1,
        cpuid_requirement="CPUID.1:EDX[0] (FPU); XCR0[0] is always 1",
        description="x87 ST(0)-ST(7) as 80-bit values (10 of 16 bytes at legacy 32+16i), in stack "
                    "order relative to TOP as XSAVE stores them",
        # fld/fstp move TOP and tag bits and record the last instruction/operand:
        # FSW, FTW, FOP, FIP, FDP (legacy bytes 2..23), and XSAVE may rewrite the
        # 6 reserved bytes after each 80-bit ST(i).
        side_effects=((2, 24),) + tuple(
            (ST0_OFFSET + ST_SLOT * i + ST_WIDTH, ST0_OFFSET + ST_SLOT * (i + 1)) for i in range(8)),
    ),
    Bank(
        "pkru", (PKRU,),
        _regs("pkru", ["pkru"], [[Slot(PKRU, 0, 4)]]),
        xcr0_mask=(1 << PKRU) | 0x3,
        cpuid_requirement="CPUID.(EAX=7,ECX=0):ECX[3] (PKU), CR4.PKE (OSPKE ECX[4]) and XCR0[9]",
        description="protection-key rights register PKRU, 4 bytes of component 9's 8",
    ),
]

BANKS: dict[str, Bank] = {}
for _id, _bank in enumerate(_BANK_LIST):
    BANKS[_bank.name] = Bank(**{**_bank.__dict__, "pattern_id": _id})
del _id, _bank

REGISTERS: dict[str, Register] = {r.name: r for b in BANKS.values() for r in b.registers}


def narrower_names(name: str) -> list[str]:
    """Names of the same register's low bytes, widest first: zmm0-15 -> ymm, xmm; ymm ->
    xmm.  A debugger or monitor may show a register only under one of these (QEMU 10's
    gdbstub has xmm but no ymm); zmm16-31 and other registers have none."""
    for wide, narrow in (("zmm", ("ymm", "xmm")), ("ymm", ("xmm",))):
        if name.startswith(wide) and name[len(wide):].isdigit():
            index = int(name[len(wide):])
            return [f"{n}{index}" for n in narrow] if index < 16 else []
    return []


def register(name: str) -> Register:
    """Any register by name: ``r20``, ``xmm7``, ``ymm7``, ``zmm7``, ``zmm23``, ``k3``, ``st2``, ``pkru``."""
    try:
        return REGISTERS[name.lower()]
    except KeyError:
        raise UnknownRegister("register names", f"no register {name!r} in any bank ({', '.join(BANKS)})") from None


def bank(name: str) -> Bank:
    try:
        return BANKS[name]
    except KeyError:
        raise UnknownRegister("bank names", f"no bank {name!r} (have {', '.join(BANKS)})") from None


def bank_of(register_name: str) -> Bank:
    return BANKS[register(register_name).bank]
