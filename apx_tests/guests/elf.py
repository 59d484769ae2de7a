"""Just enough ELF64 reading to turn an assembled payload object into flat code.

Reading the section table ourselves (instead of running llvm-objcopy) keeps the
builder down to one external tool, and lets it *check* the object rather than
trust it: a flat payload is only position independent if the object has no
relocations and no bytes outside .text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SHT_SYMTAB = 2
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHF_ALLOC = 0x2

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
SHN_UNDEF = 0


class ElfError(ValueError):
    """The bytes are not the little-endian ELF64 object we expect from llvm-mc."""


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    data: bytes = field(repr=False)
    size: int = 0  # sh_size; differs from len(data) for SHT_NOBITS (.bss)

    @property
    def is_relocation(self) -> bool:
        return self.type in (SHT_REL, SHT_RELA)

    @property
    def is_allocated(self) -> bool:
        return bool(self.flags & SHF_ALLOC)


def read_sections(elf: bytes) -> list[Section]:
    """All sections of a little-endian ELF64 file, with their names resolved."""
    if len(elf) < _ELF_HEADER.size or elf[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    ident = elf[:16]
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("not a little-endian ELF64 file")
    (_, _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = _ELF_HEADER.unpack_from(elf)
    if shentsize != _SECTION_HEADER.size:
        raise ElfError(f"unexpected section header size {shentsize}")
    if shoff + shnum * shentsize > len(elf):
        raise ElfError("section table runs past the end of the file")

    raw = [_SECTION_HEADER.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]

    def contents(header: tuple) -> bytes:
        _, sh_type, _, _, offset, size, *_ = header
        if sh_type == SHT_NOBITS:
            return b""
        if offset + size > len(elf):
            raise ElfError("section runs past the end of the file")
        return elf[offset : offset + size]

    names = contents(raw[shstrndx]) if shstrndx < shnum else b""
    sections = []
    for header in raw:
        name_offset, sh_type, flags, _, _, size, *_ = header
        end = names.find(b"\0", name_offset)
        name = names[name_offset : end if end >= 0 else None].decode("ascii", "replace")
        sections.append(Section(name, sh_type, flags, contents(header), size))
    return sections


def undefined_symbols(elf: bytes) -> list[str]:
    """Names the object refers to but does not define (a typo'd constant, usually)."""
    sections = read_sections(elf)
    found = []
    for symtab_index, section in enumerate(sections):
        if section.type != SHT_SYMTAB:
            continue
        strtab = _linked_section(elf, symtab_index, sections)
        for offset in range(0, len(section.data), _SYMBOL.size):
            name_offset, _, _, shndx, _, _ = _SYMBOL.unpack_from(section.data, offset)
            if shndx == SHN_UNDEF and name_offset:
                end = strtab.find(b"\0", name_offset)
                found.append(strtab[name_offset:end].decode("ascii", "replace"))
    return found


def _linked_section(elf: bytes, index: int, sections: list[Section]) -> bytes:
    """The data of the section that section `index` names in its sh_link field."""
    shoff = _ELF_HEADER.unpack_from(elf)[6]
    sh_link = _SECTION_HEADER.unpack_from(elf, shoff + index * _SECTION_HEADER.size)[6]
    return sections[sh_link].data if sh_link < len(sections) else b""
