"""What differs between expected and observed state, named by register and byte.

A ``Difference`` is one run of contiguous differing bytes inside ONE component
and ONE register (a zmm register spanning three components yields up to three).
``byte_range`` is half-open ``(start, stop)``: register byte indices when
``register`` is set, else byte offsets inside the component.  Byte values are
shown as hex in memory order (as stored, i.e. little-endian for integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from .banks import REGISTERS, Bank, Register, register
from .errors import MalformedImage, UnknownRegister
from .image import XsaveImage
from .layout import COMPONENT_NAMES, LEGACY_FIELDS, X87, component_name

_SHOWN_BYTES = 32  # longer values are cut in the one-line message


def _hex(value: bytes) -> str:
    if not value:
        return "nothing (missing)"
    if len(value) > _SHOWN_BYTES:
        return f"0x{value[:_SHOWN_BYTES].hex()}...({len(value)} bytes)"
    return f"0x{value.hex()}"


@dataclass(frozen=True)
class Difference:
    component: str
    register: str
    byte_range: tuple[int, int]
    want: bytes
    got: bytes

    def __str__(self) -> str:
        start, stop = self.byte_range
        where = f"{self.component} {self.register}" if self.register else self.component
        if stop - start == 1:
            return f"{where} byte {start}: want {_hex(self.want)} got {_hex(self.got)}"
        return (f"{where} bytes {start}..{stop - 1}: want {_hex(self.want)} got {_hex(self.got)}"
                " (hex, memory order)")


def _runs(differs: Iterable[int], breaks: set[int]) -> list[tuple[int, int]]:
    """Group sorted indices into half-open runs; a run never crosses an index in ``breaks``."""
    runs: list[list[int]] = []
    for i in differs:
        if runs and runs[-1][1] == i and i not in breaks:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


# ---- registers ---------------------------------------------------------------

def diff_registers(expected: Mapping[str, bytes], actual: XsaveImage | Mapping[str, bytes]) -> list[Difference]:
    """Compare register values; ``actual`` is an image (read by name) or a dict."""
    out: list[Difference] = []
    for name, want in expected.items():
        reg = register(name)
        want = bytes(want)
        if isinstance(actual, XsaveImage):
            got = actual.read(reg)
        else:
            got = actual.get(name)
            got = b"" if got is None else bytes(got)
        if want == got:  # the usual case: nothing to locate
            continue
        # slot edges: a run stays inside one component
        edges, pos = set(), 0
        for slot in reg.slots:
            edges.add(pos)
            pos += slot.size
        length = max(len(want), len(got))
        differs = [i for i in range(length) if i >= len(want) or i >= len(got) or want[i] != got[i]]
        for a, b in _runs(differs, edges):
            slot, _ = reg.slot_at(min(a, reg.width - 1))
            out.append(Difference(component_name(slot.component), reg.name, (a, b), want[a:b], got[a:b]))
    return out


# ---- images ----------------------------------------------------------------

@lru_cache(maxsize=None)
def _byte_names() -> dict[tuple[int, int], tuple[str, str, int]]:
    """(component, offset) -> (component label, register, register byte index).

    Where several registers cover a byte (xmm5 < ymm5 < zmm5) the narrowest
    names it, so a wrong xmm byte reads "sse xmm5", a wrong upper half "avx ymm5".
    """
    names: dict[tuple[int, int], tuple[str, str, int]] = {}
    for reg in sorted(REGISTERS.values(), key=lambda r: -r.width):  # narrowest written last
        pos = 0
        for slot in reg.slots:
            for k in range(slot.size):
                names[(slot.component, slot.offset + k)] = (component_name(slot.component), reg.name, pos + k)
            pos += slot.size
    for field, (offset, size) in LEGACY_FIELDS.items():
        label = "sse" if field.startswith("mxcsr") else "x87"
        for k in range(size):
            names[(X87, offset + k)] = (label, field, k)
    return names


def _ignored(items) -> tuple[set[int], set[tuple[int, int]], list[tuple[int, int]]]:
    """Split ``ignore`` into component numbers, (component, offset) bytes and
    half-open standard-image ranges."""
    components: set[int] = set()
    component_bytes: set[tuple[int, int]] = set()
    ranges: list[tuple[int, int]] = []
    by_name = {v: k for k, v in COMPONENT_NAMES.items()}

    def add_register(reg: Register) -> None:
        for slot in reg.slots:
            component_bytes.update((slot.component, slot.offset + k) for k in range(slot.size))

    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"cannot ignore {item!r}")
        if isinstance(item, int):
            components.add(item)
        elif isinstance(item, range):
            ranges.append((item.start, item.stop))
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, int) for x in item):
            ranges.append(item)
        elif isinstance(item, Register):
            add_register(item)
        elif isinstance(item, Bank):
            for reg in item.registers:
                add_register(reg)
        elif isinstance(item, str) and item in by_name:
            components.add(by_name[item])
        elif isinstance(item, str) and item in LEGACY_FIELDS:
            offset, size = LEGACY_FIELDS[item]
            component_bytes.update((X87, offset + k) for k in range(size))
        elif isinstance(item, str):
            add_register(register(item))  # raises UnknownRegister
        else:
            raise UnknownRegister("diff ignore", f"cannot ignore {item!r}: give a component, register or (start, stop)")
    return components, component_bytes, ranges


def diff_images(expected: XsaveImage, actual: XsaveImage, ignore=()) -> list[Difference]:
    """Compare two images component by component, the init rule applied.

    Header differences are not reported by themselves: a component whose
    XSTATE_BV bit is 0 compares as its init value, so "bit set, all zeros" and
    "bit clear" are the same state (QEMU's gdbstub produces the former).
    ``ignore``: component numbers/names, register or legacy-field names, Banks,
    and half-open (start, stop) ranges of the standard image.
    """
    skip_components, skip_bytes, skip_ranges = _ignored(ignore)
    names = _byte_names()
    numbers = sorted(set(expected.layout.components) | set(actual.layout.components))
    out: list[Difference] = []
    for n in numbers:
        if n in skip_components:
            continue
        want = expected.component_bytes(n) if expected.layout.has(n) else None
        got = actual.component_bytes(n) if actual.layout.has(n) else None
        if want is None or got is None:  # unsupported on one side = init state
            want = want if want is not None else bytes(len(got))
            got = got if got is not None else bytes(len(want))
        if len(want) != len(got):
            raise MalformedImage(f"{expected.where} vs {actual.where}",
                                 f"layouts disagree on component {n} {component_name(n)}: "
                                 f"{len(want)} vs {len(got)} bytes")
        layout = expected.layout if expected.layout.has(n) else actual.layout
        comp = layout.component(n)
        std = None if comp.supervisor else comp.offset

        def skipped(k: int) -> bool:
            if (n, k) in skip_bytes:
                return True
            return std is not None and any(a <= std + k < b for a, b in skip_ranges)

        # group by (label, register) with consecutive register bytes
        group: list = []  # [label, register, first_k, last_k, first_index]
        groups: list = []
        for k in range(len(want)):
            if want[k] == got[k] or skipped(k):
                continue
            label, reg, idx = names.get((n, k), (component_name(n), "", k))
            if group and group[0] == label and group[1] == reg and group[3] == k - 1 \
                    and idx == group[4] + (k - group[2]):
                group[3] = k
            else:
                group = [label, reg, k, k, idx]
                groups.append(group)
        for label, reg, k0, k1, idx in groups:
            count = k1 - k0 + 1
            out.append(Difference(label, reg, (idx, idx + count), want[k0:k1 + 1], got[k0:k1 + 1]))
    return out
