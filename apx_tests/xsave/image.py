"""An XSAVE buffer (standard or compacted) read and written through a Layout.

Byte map of every image: legacy region 0..511 (components 0 and 1), header
512..575 (XSTATE_BV @512, XCOMP_BV @520, bytes 528..575 reserved zero), then
components 2.. at their standard offsets (CPUID.0xD.i EBX) or, when XCOMP_BV
bit 63 is set, packed from 576 in number order (see ``Layout.compacted_offsets``).

The init rule: a component whose XSTATE_BV bit is 0 is in its initial state,
whatever bytes the buffer holds there; XRSTOR loads the init value instead.
``component_bytes``/``read`` apply the rule, ``raw_component_bytes`` does not.
Initial values: all zero, except x87, whose init state has FCW = 0x037F.

MXCSR (legacy bytes 24..27, with MXCSR_MASK at 28..31) is SSE state but is NOT
governed by XSTATE_BV bit 1: XSAVE stores and XRSTOR loads it whenever bit 1 OR
bit 2 of the requested mask is set.  This module therefore treats bytes 24..31
as always literal: ``component_bytes(0)`` passes them through even in the x87
init state, component 1's range is XMM0-15 only (160..415), and ``mxcsr`` reads
and writes the literal value.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .banks import Register, register
from .errors import (
    ApxMpxConflict,
    CompactedInStandard,
    ImageTooShort,
    MalformedImage,
    ReservedHeaderBits,
    UnknownComponent,
)
from .layout import (
    APX_MASK,
    EXTENDED_AREA,
    FCW_INIT,
    HEADER_RESERVED,
    LEGACY_SIZE,
    MPX_MASK,
    MXCSR_BYTES,
    MXCSR_DEFAULT,
    X87,
    XCOMP_BV_COMPACTED,
    XCOMP_BV_OFFSET,
    XSTATE_BV_OFFSET,
    Component,
    Layout,
    bits,
    component_name,
)


def _u64(buf: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(buf[offset:offset + 8], "little")


def default_legacy() -> bytes:
    """The legacy region after reset/FNINIT+LDMXCSR: FCW 0x037F, MXCSR 0x1F80."""
    legacy = bytearray(LEGACY_SIZE)
    legacy[0:2] = FCW_INIT.to_bytes(2, "little")
    legacy[24:28] = MXCSR_DEFAULT.to_bytes(4, "little")
    return bytes(legacy)


class XsaveImage:
    """A parsed, validated XSAVE buffer and the Layout that explains it.

    ``compacted=None`` picks the format from XCOMP_BV bit 63; True/False insist
    on one.  ``where`` names the source in every error message.
    """

    def __init__(self, layout: Layout, data: bytes | bytearray | memoryview, *,
                 compacted: bool | None = None, where: str = ""):
        self._setup(layout, data, where)
        if compacted is None and len(self._data) >= EXTENDED_AREA:
            compacted = bool(self.xcomp_bv & XCOMP_BV_COMPACTED)
        self._compacted = bool(compacted)
        self.validate()

    def _setup(self, layout: Layout, data, where: str) -> None:
        self.layout = layout
        self.where = where or "XSAVE image"
        self._data = bytearray(data)
        self._compacted = False

    # ---- header -------------------------------------------------------

    @property
    def xstate_bv(self) -> int:
        return _u64(self._data, XSTATE_BV_OFFSET)

    @xstate_bv.setter
    def xstate_bv(self, value: int) -> None:
        """Raw header edit (for negative tests too); call ``validate()`` to check."""
        self._data[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8] = (value & (2**64 - 1)).to_bytes(8, "little")

    @property
    def xcomp_bv(self) -> int:
        return _u64(self._data, XCOMP_BV_OFFSET)

    @xcomp_bv.setter
    def xcomp_bv(self, value: int) -> None:
        """Raw header edit; the image keeps its format, compacted offsets follow the new value."""
        self._data[XCOMP_BV_OFFSET:XCOMP_BV_OFFSET + 8] = (value & (2**64 - 1)).to_bytes(8, "little")

    @property
    def compacted(self) -> bool:
        return self._compacted

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def mxcsr(self) -> int:
        return int.from_bytes(self._data[24:28], "little")

    @mxcsr.setter
    def mxcsr(self, value: int) -> None:
        self._data[24:28] = value.to_bytes(4, "little")

    @property
    def mxcsr_mask(self) -> int:
        return int.from_bytes(self._data[28:32], "little")

    def present(self, n_or_name: int | str) -> bool:
        """XSTATE_BV bit of the component: False means init state."""
        return bool(self.xstate_bv >> self._component(n_or_name).number & 1)

    def _component(self, n_or_name: int | str) -> Component:
        """``layout.component`` with the error naming this image (and the layout's source)."""
        try:
            return self.layout.component(n_or_name)
        except UnknownComponent as err:
            raise UnknownComponent(self.where, f"{err.problem} (layout from {self.layout.where})") from None

    # ---- validation -----------------------------------------------------

    def validate(self) -> None:
        """Check the buffer as XRSTOR(S) and KVM_SET_XSAVE would; raise an XsaveError."""
        where, size = self.where, len(self._data)
        if size < EXTENDED_AREA:
            raise ImageTooShort(where, f"buffer is {size} bytes, needs at least {EXTENDED_AREA} "
                                       f"(legacy region {LEGACY_SIZE} + XSAVE header 64)")
        start, stop = HEADER_RESERVED
        for i in range(start, stop):
            if self._data[i]:
                raise ReservedHeaderBits(where, f"XSAVE header bytes {start}..{stop - 1} must be zero, "
                                                f"byte {i} is {self._data[i]:#04x}")
        xstate_bv, xcomp_bv = self.xstate_bv, self.xcomp_bv
        if not self._compacted and xcomp_bv:
            raise CompactedInStandard(where, f"XCOMP_BV is {xcomp_bv:#x} in a standard-format image"
                                             + (" (bit 63 = compacted)" if xcomp_bv >> 63 else "; must be 0"))
        if self._compacted and not xcomp_bv & XCOMP_BV_COMPACTED:
            raise MalformedImage(where, f"compacted image but XCOMP_BV {xcomp_bv:#x} lacks bit 63")
        in_use = xstate_bv | (xcomp_bv & ~XCOMP_BV_COMPACTED if self._compacted else 0)
        if in_use & APX_MASK and in_use & MPX_MASK:
            mpx = ",".join(str(b) for b in bits(in_use & MPX_MASK))
            raise ApxMpxConflict(where, f"XSTATE_BV {xstate_bv:#x} has APX (bit 19) with MPX (bit {mpx}); "
                                        "they share offsets 960..1087")
        if self._compacted:
            self.layout.check_supported(xcomp_bv & ~XCOMP_BV_COMPACTED, "XCOMP_BV", allow_supervisor=True, where=where)
            self.layout.check_supported(xstate_bv, "XSTATE_BV", allow_supervisor=True, where=where)
            outside = xstate_bv & ~xcomp_bv
            if outside:
                b = bits(outside)[0]
                raise MalformedImage(where, f"XSTATE_BV bit {b} ({component_name(b)}) is set but XCOMP_BV "
                                            f"{xcomp_bv:#x} has no room for it")
        else:
            self.layout.check_supported(xstate_bv, "XSTATE_BV", where=where)
        last = None
        for n in bits(xstate_bv):
            offset = self.component_offset(n)
            if n >= 2 and offset is not None:
                end = offset + self.layout.components[n].size
                if last is None or end > last[0]:
                    last = (end, n)
        if last and last[0] > size:
            end, n = last
            raise ImageTooShort(where, f"buffer is {size} bytes, layout needs {end} "
                                       f"(component {n} {component_name(n)} ends at {end})")

    # ---- components -------------------------------------------------------

    def component_offset(self, n_or_name: int | str) -> int | None:
        """Where the component starts in this buffer; None if this image has no room for it."""
        comp = self._component(n_or_name)
        if self._compacted:
            return self.layout.compacted_offsets(self.xcomp_bv).get(comp.number)
        return None if comp.supervisor else comp.offset

    def _span(self, n_or_name: int | str) -> tuple[Component, int]:
        """The component and its offset; raises when the image has no room for it."""
        comp = self._component(n_or_name)
        offset = self.component_offset(comp.number)
        if offset is None:
            why = (f"XCOMP_BV {self.xcomp_bv:#x} does not include it" if self._compacted
                   else "it is supervisor state, absent from the standard format")
            raise MalformedImage(self.where, f"no room for {comp}: {why}")
        if offset + comp.size > len(self._data):
            raise ImageTooShort(self.where, f"buffer is {len(self._data)} bytes, layout needs {offset + comp.size} "
                                            f"({comp} ends at {offset + comp.size})")
        return comp, offset

    def raw_component_bytes(self, n_or_name: int | str) -> bytes:
        """The bytes the buffer literally holds for the component (no init rule)."""
        comp, offset = self._span(n_or_name)
        return bytes(self._data[offset:offset + comp.size])

    def component_bytes(self, n_or_name: int | str) -> bytes:
        """The component's value as XRSTOR would load it (init rule applied)."""
        comp = self._component(n_or_name)
        if self.xstate_bv >> comp.number & 1 and self.component_offset(comp.number) is not None:
            return self.raw_component_bytes(comp.number)
        return self._init_value(comp)

    def _init_value(self, comp: Component) -> bytes:
        value = bytearray(comp.size)
        if comp.number == X87:
            value[0:2] = FCW_INIT.to_bytes(2, "little")
            lo, hi = MXCSR_BYTES  # SSE state living in x87's range: always literal
            value[lo:hi] = self._data[lo:hi]
        return bytes(value)

    def set_component_bytes(self, n_or_name: int | str, data: bytes, mark: bool = True) -> None:
        """Store the whole component; ``mark`` sets its XSTATE_BV bit (False = raw edit)."""
        comp, offset = self._span(n_or_name)
        if len(data) != comp.size:
            raise MalformedImage(self.where, f"{comp} is {comp.size} bytes, got {len(data)}")
        self._data[offset:offset + comp.size] = data
        if mark:
            self.xstate_bv |= comp.mask

    def _make_live(self, comp: Component) -> int:
        """Before a partial write: if the component is in init state, write its init
        value first so the bytes not being written do not become stale garbage."""
        _, offset = self._span(comp.number)
        if not self.xstate_bv >> comp.number & 1:
            self._data[offset:offset + comp.size] = self._init_value(comp)
            self.xstate_bv |= comp.mask
        return offset

    # ---- registers ----------------------------------------------------------

    def read(self, name: str | Register) -> bytes:
        """A register's value by name (``r20``, ``zmm5``, ``ymm3``, ``k1``, ``st0``...)."""
        reg = name if isinstance(name, Register) else register(name)
        out = bytearray()
        for slot in reg.slots:
            out += self.component_bytes(slot.component)[slot.offset:slot.offset + slot.size]
        return bytes(out)

    def write(self, name: str | Register, value: bytes) -> None:
        """Write a register; sets XSTATE_BV for every component it touches."""
        reg = name if isinstance(name, Register) else register(name)
        pieces = list(reg.pieces(bytes(value)))  # checks the width
        for comp_number in reg.components:  # check room for all before changing anything
            self._span(comp_number)
        for slot, _, chunk in pieces:
            offset = self._make_live(self._component(slot.component))
            self._data[offset + slot.offset:offset + slot.offset + slot.size] = chunk

    def read_registers(self, names: Iterable[str]) -> dict[str, bytes]:
        return {n: self.read(n) for n in names}

    def write_registers(self, values: Mapping[str, bytes]) -> None:
        """Write many registers; each touched component is checked and made live once
        (a whole bank is written per scenario step, so this is the hot path)."""
        writes = []  # (start in the buffer, bytes): all checked before anything changes
        offsets: dict[int, int] = {}
        for name, value in values.items():
            reg = name if isinstance(name, Register) else register(name)
            value = bytes(value)
            reg.check_width(value)
            pos = 0
            for slot in reg.slots:
                offset = offsets.get(slot.component)
                if offset is None:
                    offset = offsets[slot.component] = self._span(slot.component)[1]
                writes.append((offset + slot.offset, value[pos:pos + slot.size]))
                pos += slot.size
        for number in offsets:
            self._make_live(self.layout.components[number])
        data = self._data
        for start, chunk in writes:
            data[start:start + len(chunk)] = chunk

    # ---- whole image ----------------------------------------------------------

    def to_bytes(self) -> bytes:
        return bytes(self._data)

    def copy(self, where: str | None = None) -> "XsaveImage":
        twin = XsaveImage.__new__(XsaveImage)
        twin._setup(self.layout, self._data, self.where if where is None else where)
        twin._compacted = self._compacted
        return twin

    def legacy_bytes(self) -> bytes:
        return bytes(self._data[:LEGACY_SIZE])

    def converted(self, compacted: bool, *, xcomp_bv: int | None = None, size: int | None = None,
                  where: str | None = None) -> "XsaveImage":
        """The same state in the other (or the same) format."""
        present = [n for n in bits(self.xstate_bv) if n >= 2]
        if xcomp_bv is None and compacted and self._compacted:
            xcomp_bv = self.xcomp_bv  # same format: keep the same components
        return XsaveImage.build(
            self.layout, {n: self.component_bytes(n) for n in present},
            compacted=compacted, size=size, xstate_bv=self.xstate_bv,
            xcomp_bv=xcomp_bv, legacy=self.legacy_bytes(),
            where=self.where if where is None else where,
        )

    @classmethod
    def build(cls, layout: Layout, components: Mapping[int | str, bytes], *, compacted: bool = False,
              size: int | None = None, xstate_bv: int | None = None, xcomp_bv: int | None = None,
              legacy: bytes | None = None, where: str = "built image") -> "XsaveImage":
        """A new image holding ``components`` (number or name -> full component bytes).

        ``xstate_bv`` defaults to the bits of ``components``; ``xcomp_bv`` (compacted
        only) to bit 63 | every supported user component (what XSAVEC writes with
        RFBM = XCR0), so any register can be written; ``size`` to CPUID's standard size, or the
        compacted size; ``legacy`` (512 bytes) to FCW 0x037F, MXCSR 0x1F80, rest 0.
        """
        numbered = {layout.component(k).number: bytes(v) for k, v in components.items()}
        present = 0
        for n in numbered:
            present |= 1 << n
        bv = present if xstate_bv is None else xstate_bv
        if compacted:
            xc = (layout.supported_xcr0 | bv | present if xcomp_bv is None else xcomp_bv) | XCOMP_BV_COMPACTED
            needed = layout.compacted_size(xc)
        else:
            if xcomp_bv:
                raise CompactedInStandard(where, f"XCOMP_BV {xcomp_bv:#x} asked for a standard-format image")
            xc = 0
            needed = max(layout.standard_size, layout.standard_size_for(bv | present))
        legacy = default_legacy() if legacy is None else bytes(legacy)
        if len(legacy) != LEGACY_SIZE:
            raise MalformedImage(where, f"legacy region must be {LEGACY_SIZE} bytes, got {len(legacy)}")
        buf = bytearray(needed if size is None else size)
        if len(buf) < EXTENDED_AREA:
            raise ImageTooShort(where, f"buffer is {len(buf)} bytes, needs at least {EXTENDED_AREA}")
        buf[:LEGACY_SIZE] = legacy
        image = cls.__new__(cls)
        image._setup(layout, buf, where)
        image._compacted = compacted
        image.xcomp_bv = xc
        for n, data in numbered.items():
            image.set_component_bytes(n, data, mark=False)
        image.xstate_bv = bv
        image.validate()
        return image

    # ---- python protocol ------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XsaveImage):
            return NotImplemented
        return (self.layout == other.layout and self._compacted == other._compacted
                and self._data == other._data)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        fmt = "compacted" if self._compacted else "standard"
        return (f"<XsaveImage {self.where}: {fmt}, {len(self._data)} bytes, XSTATE_BV={self.xstate_bv:#x}"
                + (f", XCOMP_BV={self.xcomp_bv:#x}" if self._compacted else "") + ">")
