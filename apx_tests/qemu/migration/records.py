"""The records of a QEMU migration stream: the wire constants (section types, RAM
flags), the one-line ``MigrationStreamError``, the big-endian reader, and the pieces a
parse yields (``Leaf``: one field's bytes in the file, ``Section``, ``RamBlock``).

Everything is big-endian on the wire (QEMU's ``qemu_put_be*``).  ``stream`` walks a file
into these; ``cpu_fields`` maps a ``cpu`` section's leaves onto registers.
See docs/migration.md.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

# --- stream constants (migration/savevm.c) ---------------------------------
FILE_MAGIC = 0x5145564D  # "QEVM"
FILE_VERSION = 3
VM_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    VM_EOF: "EOF", SECTION_START: "START", SECTION_PART: "PART", SECTION_END: "END",
    SECTION_FULL: "FULL", SUBSECTION: "SUBSECTION", VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND", SECTION_FOOTER: "FOOTER",
}

# --- RAM section flags (migration/ram.c), in the low bits of each be64 ----
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200

# RamBlock.pages entries that are not file offsets.
PAGE_NOT_SENT = -1
PAGE_ZERO = -2


class MigrationStreamError(ValueError):
    """The stream is not what QEMU writes (or not what this reader understands).

    ``path``, ``offset`` (byte offset in the file) and ``problem`` are kept as
    attributes; the message is one line: ``PATH: byte N (0xN): problem``.
    """

    def __init__(self, path: str, offset: int, problem: str):
        self.path = str(path)
        self.offset = offset
        self.problem = problem
        super().__init__(f"{self.path}: byte {offset} ({offset:#x}): {problem}".replace("\n", " "))


# ---------------------------------------------------------------------------
# Low-level reading


class _Reader:
    """Sequential big-endian reads over a read-only mmap of the file, with
    one-line errors naming the offset.  Pages the walk skips are never touched."""

    def __init__(self, path: str, data, size: int):
        self.path = path
        self.data = data  # mmap (or bytes)
        self.size = size
        self.pos = 0

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int) -> None:
        self.pos = offset

    def error(self, problem: str, offset: int | None = None) -> MigrationStreamError:
        return MigrationStreamError(self.path, self.pos if offset is None else offset, problem)

    def _short(self, n: int, what: str) -> MigrationStreamError:
        got = max(0, self.size - self.pos)
        return MigrationStreamError(
            self.path, self.pos, f"file ends after {got} of the {n} bytes of {what} (file is {self.size} bytes)")

    def read(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > self.size:
            raise self._short(n, what)
        data = self.data[self.pos:end]
        self.pos = end
        return data

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self._short(n, what)
        self.pos += n

    def u8(self, what: str) -> int:
        if self.pos >= self.size:
            raise self._short(1, what)
        self.pos += 1
        return self.data[self.pos - 1]

    def be16(self, what: str) -> int:
        return int.from_bytes(self.read(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.read(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.read(8, what), "big")

    def str8(self, what: str) -> str:
        """A u8 length and that many bytes (QEMU's idstr encoding)."""
        at = self.pos
        n = self.u8(f"length of {what}")
        raw = self.read(n, what)
        if not all(0x20 <= b < 0x7F for b in raw):
            raise MigrationStreamError(self.path, at, f"{what} is not printable ASCII: {raw[:32]!r}")
        return raw.decode("ascii")


# ---------------------------------------------------------------------------
# Parsed pieces


_INT_TYPES = {
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "int32 equal", "int64 equal", "uint8 equal", "uint16 equal", "uint32 equal",
    "int32 le", "bool",
}


@dataclass(frozen=True)
class Leaf:
    """One field value as it sits in the file: ``size`` raw bytes at ``offset``.

    ``path`` names it: ``env.regs[3]``, ``env.xmm_regs[0][3]._q_ZMMReg[1]``,
    ``cpu/avx512:env.opmask_regs[2]`` (subsection ``:`` field).
    """

    path: str
    type: str
    offset: int
    size: int
    raw: bytes

    @property
    def little_endian(self) -> bool:
        return self.type.endswith(" le")

    @property
    def is_int(self) -> bool:
        return self.type in _INT_TYPES and self.size in (1, 2, 4, 8)

    @property
    def value(self) -> int | bool | bytes:
        """Integers decoded (big-endian unless the type says ``le``), other types raw."""
        if self.type == "bool" and self.size == 1:
            return bool(self.raw[0])
        if self.is_int:
            signed = not self.type.startswith("uint") and self.type != "bool"
            return int.from_bytes(self.raw, "little" if self.little_endian else "big", signed=signed)
        return self.raw


@dataclass
class Section:
    """One device (or RAM) section of the stream.

    ``start`` is the offset of its first section-type byte, ``end`` the offset
    after its (last) footer.  Device sections have ``fields`` (name -> value;
    arrays are lists, structs dicts), ``subsections`` (name -> fields) and
    ``leaves`` (path -> Leaf).
    """

    section_id: int
    name: str
    instance_id: int
    version: int
    start: int
    end: int = 0
    desc: dict | None = None
    parts: list = field(default_factory=list)  # (start, end) of each START/PART/END/FULL chunk
    fields: dict = field(default_factory=dict)
    subsections: dict = field(default_factory=dict)
    leaves: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.instance_id)


@dataclass
class RamBlock:
    """A RAM block announced in the RAM section, and where its pages are.

    ``page(i)`` is the file offset of page i's data, ``PAGE_ZERO`` for a page
    sent as zero, ``PAGE_NOT_SENT`` for a page never sent (reads as zero).  A
    page sent twice keeps its last copy, as a loading QEMU would.  The index
    costs 8 bytes per page up to the highest page sent (nothing is allocated
    up front, so a corrupt block length costs nothing).
    """

    name: str
    length: int
    page_size: int
    pages: array = field(default_factory=lambda: array("q"))

    @property
    def page_total(self) -> int:
        return -(-self.length // self.page_size)

    def page(self, index: int) -> int:
        if not 0 <= index < self.page_total:
            raise IndexError(f"RAM block {self.name} has {self.page_total} pages, no page {index}")
        return self.pages[index] if index < len(self.pages) else PAGE_NOT_SENT

    def _set(self, index: int, value: int) -> None:
        pages = self.pages
        if index < len(pages):
            pages[index] = value
            return
        if index > len(pages):
            pages.extend([PAGE_NOT_SENT] * (index - len(pages)))
        pages.append(value)

    def _set_run(self, index: int, count: int, value: int) -> None:
        """_set(i, value) for pages index .. index+count-1, as one array operation."""
        pages = self.pages
        if index > len(pages):
            pages.extend(array("q", [PAGE_NOT_SENT]) * (index - len(pages)))
        pages[index:index + count] = array("q", [value]) * count

    def page_count(self, kind: str = "data") -> int:
        """How many pages are ``"data"`` (sent with contents), ``"zero"`` or ``"unsent"``."""
        if kind == "data":
            return sum(1 for p in self.pages if p >= 0)
        if kind == "zero":
            return self.pages.count(PAGE_ZERO)
        if kind == "unsent":
            return self.pages.count(PAGE_NOT_SENT) + self.page_total - len(self.pages)
        raise ValueError(f"kind must be 'data', 'zero' or 'unsent', not {kind!r}")
