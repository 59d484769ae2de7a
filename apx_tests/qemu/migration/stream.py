"""Read QEMU migration streams (``migrate`` to ``file:PATH``): walk the file into
sections and RAM page offsets, read guest memory back, patch fields in a copy.

A stream is walked the way QEMU's own ``scripts/analyze-migration.py`` walks
it: the trailing JSON VM description ("vmdesc") says, for every device
section, which fields were written and how big each one is, so the reader
never needs a fixed offset.  RAM sections carry no description; their page
records are walked and only the file offset of each page is kept (page data
is never held in memory), so guest memory can be read back on demand.

The wire constants and parsed pieces live in ``records``; which ``cpu`` fields
hold which register bytes (``CpuState``) lives in ``cpu_fields``.

    stream = MigrationStream.open(path)
    cpu = stream.cpu_state(0)                  # CpuState of vCPU 0
    cpu.register("xmm3"), cpu.gprs["rax"]
    image = cpu.to_xsave(layout)               # XsaveImage, standard format
    stream.read_guest_memory(0x10000, 0x4000)  # mailbox page(s)
    stream.with_register(out_path, "ymm3", value)  # patched copy, reopened

Every problem with the input is a ``MigrationStreamError`` whose message is
one line: the file, the byte offset, what was expected there.
See docs/migration.md.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from typing import Any, Mapping

from .cpu_fields import CpuState, _xstate_mask_of
from .records import (
    COMMAND,
    CONFIGURATION,
    FILE_MAGIC,
    FILE_VERSION,
    PAGE_ZERO,
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_HOOK,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_XBZRLE,
    RAM_ZERO,
    SECTION_END,
    SECTION_FOOTER,
    SECTION_FULL,
    SECTION_PART,
    SECTION_START,
    SECTION_TYPE_NAMES,
    SUBSECTION,
    VM_EOF,
    VMDESCRIPTION,
    Leaf,
    MigrationStreamError,
    RamBlock,
    Section,
    _Reader,
)

_VMDESC_TAIL_LIMIT = 64 << 20  # how far from the end a vmdesc may start
_ZERO_RUN_FIRST, _ZERO_RUN_MAX = 8, 1024  # records one comparison in _zero_run covers (it doubles)


def _zero_run(data, at: int, header: int, step: int, limit: int) -> int:
    """How many 9-byte records from `at` (at most `limit`) are zero pages exactly as QEMU
    writes a run of them: be64 `header`, `header + step`, ... (the address grows by a page,
    the flags stay ZERO|CONTINUE), each followed by the fill byte 0.

    Most of a payload guest's stream is such a run (4096 records for 16 MiB of RAM, ~40 data
    pages): comparing whole runs against the bytes they must be, in C, replaces a Python
    loop iteration per record.  A record that differs in any byte (another page kind,
    another address, a non-zero fill byte) ends the run; the caller reads it the slow way."""
    total, n = 0, _ZERO_RUN_FIRST
    while total < limit:
        n = min(n, limit - total)
        start = at + 9 * total
        first = header + total * step
        headers = struct.pack(f">{n}Q", *range(first, first + n * step, step))
        expected = bytearray(9 * n)  # the fill bytes (every 9th) stay 0
        for j in range(8):
            expected[j::9] = headers[j::8]
        actual = data[start:start + 9 * n]
        if actual == expected:
            total += n
            n = min(2 * n, _ZERO_RUN_MAX)
            continue
        # The first byte that differs (highest differing bit of the XOR, big-endian).
        diff = int.from_bytes(actual, "big") ^ int.from_bytes(expected, "big")
        return total + (len(actual) - 1 - (diff.bit_length() - 1) // 8) // 9
    return total


# ---------------------------------------------------------------------------
# The stream


class MigrationStream:
    """A parsed migration file: header, sections, RAM page index and vmdesc."""

    def __init__(self, path: str):
        self.path = str(path)
        self.size = 0
        self.version = 0
        self.vmdesc: dict = {}
        self.vmdesc_offset = 0
        self.page_size = 4096
        self.sections: list[Section] = []
        self.devices: dict[tuple[str, int], Section] = {}
        self.ram_blocks: dict[str, RamBlock] = {}
        self.configuration: dict = {}
        self.commands: list[tuple[int, int]] = []  # (offset, command)
        self._ram_last_block: RamBlock | None = None

    # ---- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, vmdesc: dict | str | bytes | None = None) -> "MigrationStream":
        """Parse ``path``.  ``vmdesc``: use this VM description instead of the
        file's own (a dict, or its JSON) -- e.g. to walk a truncated copy with
        the description of the complete stream."""
        self = cls(os.fspath(path))
        try:
            fh = open(self.path, "rb")
        except OSError as err:
            raise MigrationStreamError(self.path, 0, f"cannot open: {err.strerror or err}") from None
        with fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size == 0:
                raise MigrationStreamError(self.path, 0, "empty file; expected the magic 'QEVM'")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self._parse(_Reader(self.path, mm, self.size), vmdesc)
        return self

    def _parse(self, r: _Reader, vmdesc) -> None:
        magic = r.read(4, "the magic 'QEVM'")
        if int.from_bytes(magic, "big") != FILE_MAGIC:
            raise MigrationStreamError(self.path, 0, f"expected the magic 'QEVM' (51 45 56 4d), found {magic.hex(' ')}")
        self.version = r.be32("the stream version")
        if self.version != FILE_VERSION:
            raise MigrationStreamError(self.path, 4, f"expected stream version {FILE_VERSION}, found {self.version}")
        if vmdesc is None:
            self.vmdesc_offset, self.vmdesc = self._read_vmdesc(r)
        else:
            self.vmdesc_offset = -1
            self.vmdesc = self._parse_vmdesc_json(vmdesc, None, "the VM description given to open()")
        self._index_vmdesc()
        r.seek(8)
        self._walk(r)

    # ---- vmdesc -----------------------------------------------------------

    def _read_vmdesc(self, r: _Reader) -> tuple[int, dict]:
        """Find 0x06 + be32 length + JSON ending exactly at end of file."""
        end = self.size
        low = max(0, end - _VMDESC_TAIL_LIMIT)
        # JSON never contains a raw 0x06 byte, so the marker is the last 0x06
        # in the file or one of the (at most 4) inside its length field.
        pos = end
        for _ in range(5):
            pos = r.data.rfind(bytes([VMDESCRIPTION]), low, pos)
            if pos < 0:
                break
            if pos + 5 <= end and pos + 5 + int.from_bytes(r.data[pos + 1:pos + 5], "big") == end:
                return pos, self._parse_vmdesc_json(r.data[pos + 5:end], pos + 5, "the VM description")
        raise MigrationStreamError(
            self.path, end,
            "no VM description at the end of the file (expected byte 0x06, a be32 length and that much JSON, "
            "ending at end of file): the file is truncated, or QEMU wrote no vmdesc")

    def _parse_vmdesc_json(self, data, offset: int | None, what: str) -> dict:
        """``offset``: where the JSON starts in the file (None: not from the file)."""
        if isinstance(data, dict):
            desc = data
        else:
            if isinstance(data, (bytes, bytearray)):
                try:
                    text = bytes(data).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise MigrationStreamError(self.path, (offset or 0) + err.start, f"{what} is not UTF-8") from None
            else:
                text = str(data)
            try:
                desc = json.loads(text)
            except json.JSONDecodeError as err:
                where = f"line {err.lineno} column {err.colno}"
                if offset is None:  # not from the file: no file offset to name
                    raise MigrationStreamError(self.path, 0, f"{what} is not valid JSON: {err.msg} ({where})") from None
                # err.pos counts characters; QEMU's JSON is ASCII, so characters are bytes.
                raise MigrationStreamError(self.path, offset + err.pos,
                                           f"{what} is not valid JSON: {err.msg} ({where})") from None
        if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
            raise MigrationStreamError(self.path, offset or 0, f"{what} has no 'devices' list")
        return desc

    def _index_vmdesc(self) -> None:
        at = max(self.vmdesc_offset, 0)
        ps = self.vmdesc.get("page_size", 4096)
        if not isinstance(ps, int) or ps <= 0 or ps & (ps - 1):
            raise MigrationStreamError(self.path, at, f"VM description: page_size {ps!r} is not a power of two")
        self.page_size = ps
        self._desc_by_key: dict[tuple[str, int], dict] = {}
        for i, dev in enumerate(self.vmdesc["devices"]):
            if not isinstance(dev, dict) or not isinstance(dev.get("name"), str) \
                    or not isinstance(dev.get("instance_id"), int):
                raise MigrationStreamError(self.path, at, f"VM description: device #{i} has no name/instance_id")
            self._desc_by_key[(dev["name"], dev["instance_id"])] = dev

    def described_devices(self) -> list[tuple[str, int]]:
        return list(self._desc_by_key)

    # ---- walking ------------------------------------------------------------

    def _walk(self, r: _Reader) -> None:
        by_id: dict[int, Section] = {}
        current: Section | None = None
        while True:
            at = r.tell()
            if at >= self.size:
                raise r.error("file ends before the end-of-stream marker (byte 0x00)")
            kind = r.u8("a section type")
            if kind == VM_EOF:
                break
            if kind == CONFIGURATION:
                self._read_configuration(r)
            elif kind in (SECTION_START, SECTION_FULL):
                sid = r.be32("a section id")
                name = r.str8("a section name")
                inst = r.be32(f"the instance id of section {name}")
                ver = r.be32(f"the version of section {name}")
                sec = Section(sid, name, inst, ver, at)
                by_id[sid] = sec
                self.sections.append(sec)
                current = sec
                self._read_section_body(r, sec, first=True)
                sec.end = r.tell()
                sec.parts.append((at, sec.end))
            elif kind in (SECTION_PART, SECTION_END):
                sid = r.be32("a section id")
                sec = by_id.get(sid)
                if sec is None:
                    raise r.error(f"{SECTION_TYPE_NAMES[kind]} for section id {sid}, which no START announced", at)
                current = sec
                self._read_section_body(r, sec, first=False)
                sec.end = r.tell()
                sec.parts.append((at, sec.end))
            elif kind == SECTION_FOOTER:
                sid = r.be32("the section id of a footer")
                if current is None or sid != current.section_id:
                    expected = "no section is open" if current is None else f"expected {current.section_id} ({current.name})"
                    raise r.error(f"section footer names section id {sid}; {expected}", at)
                current.end = r.tell()
                if current.parts:
                    current.parts[-1] = (current.parts[-1][0], current.end)
            elif kind == COMMAND:
                cmd = r.be16("a command number")
                length = r.be16("a command length")
                r.skip(length, f"the data of command {cmd:#x}")
                self.commands.append((at, cmd))
            else:
                raise r.error(f"unknown section type {kind:#04x}; expected one of "
                              + ", ".join(f"{k:#04x} {v}" for k, v in SECTION_TYPE_NAMES.items()
                                          if k not in (SUBSECTION, VMDESCRIPTION)), at)
        end_marker = r.tell()
        if self.vmdesc_offset >= 0 and end_marker != self.vmdesc_offset:
            raise MigrationStreamError(
                self.path, end_marker,
                f"expected the VM description (byte 0x06) right after the end-of-stream marker, "
                f"but it starts at byte {self.vmdesc_offset}")
        self.end_of_stream = end_marker - 1

    def _read_configuration(self, r: _Reader) -> None:
        desc = self.vmdesc.get("configuration")
        if isinstance(desc, dict):
            sec = Section(-1, "configuration", 0, desc.get("version", 0), r.tell() - 1, desc=desc)
            sec.fields = self._read_struct(r, desc, "", sec, "configuration")
            self.configuration = sec.fields
        else:
            n = r.be32("the length of the machine type")
            self.configuration = {"len": n, "name": r.read(n, "the machine type")}

    def capabilities(self) -> list[str]:
        caps = self.configuration.get("configuration/capabilities", {}).get("capabilities", [])
        if isinstance(caps, str):  # an array of one element reads as the element
            caps = [caps]
        return [c for c in caps if isinstance(c, str)] if isinstance(caps, list) else []

    def _read_section_body(self, r: _Reader, sec: Section, first: bool) -> None:
        if sec.name == "ram":
            if first and sec.version != 4:
                raise r.error(f"RAM section version {sec.version}; this reader knows version 4", sec.start)
            self._read_ram(r, sec)
            return
        if not first:
            raise r.error(f"PART/END for section {sec.name!r}: only the RAM section is iterative here", sec.start)
        desc = self._desc_by_key.get(sec.key)
        if desc is None:
            raise r.error(f"section {sec.name!r} instance {sec.instance_id} (id {sec.section_id}) has no entry in "
                          f"the VM description, and no reader of its own", sec.start)
        sec.desc = desc
        if sec.key in self.devices:
            raise r.error(f"section {sec.name!r} instance {sec.instance_id} appears twice", sec.start)
        self.devices[sec.key] = sec
        tree = self._read_struct(r, desc, "", sec, sec.name)
        for sub in desc.get("subsections", []) or []:
            sname = sub.get("vmsd_name") if isinstance(sub, dict) else None
            if sname in tree:
                sec.subsections[sname] = tree.pop(sname)
        sec.fields = tree

    def _read_struct(self, r: _Reader, desc: dict, prefix: str, sec: Section, ctx: str) -> dict:
        """Read the fields, then the subsections, that ``desc`` lists."""
        out: dict[str, Any] = {}
        fields = desc.get("fields", [])
        if not isinstance(fields, list):
            raise r.error(f"VM description of {ctx}: 'fields' is not a list")
        for f in fields:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise r.error(f"VM description of {ctx}: a field without a name: {str(f)[:80]}")
            name = f["name"]
            count = f.get("array_len")
            if count is not None:
                if not isinstance(count, int) or count < 0:
                    raise r.error(f"VM description of {ctx}: field {name} has array_len {count!r}")
                out[name] = [self._read_field(r, f, f"{prefix}{name}[{i}]", sec, ctx) for i in range(count)]
            elif isinstance(f.get("index"), int):
                i = f["index"]
                lst = out.setdefault(name, [])
                if not isinstance(lst, list):
                    lst = out[name] = [lst]
                lst.append(self._read_field(r, f, f"{prefix}{name}[{i}]", sec, ctx))
            else:
                value = self._read_field(r, f, f"{prefix}{name}", sec, ctx)
                if name in out:  # analyze-migration: repeated names become a list
                    prev = out[name]
                    out[name] = (prev if isinstance(prev, list) else [prev]) + [value]
                else:
                    out[name] = value
        subsections = desc.get("subsections", []) or []
        if not isinstance(subsections, list):
            raise r.error(f"VM description of {ctx}: 'subsections' is not a list")
        for sub in subsections:
            if not isinstance(sub, dict) or not isinstance(sub.get("vmsd_name"), str):
                raise r.error(f"VM description of {ctx}: a subsection without vmsd_name")
            sname = sub["vmsd_name"]
            at = r.tell()
            marker = r.u8(f"the subsection marker (0x05) of {sname}")
            if marker != SUBSECTION:
                raise r.error(f"{ctx}: expected subsection {sname} (marker 0x05), found byte {marker:#04x}", at)
            got = r.str8(f"the name of subsection {sname}")
            if got != sname:
                raise r.error(f"{ctx}: expected subsection {sname}, found {got!r}", at)
            r.be32(f"the version of subsection {sname}")
            out[sname] = self._read_struct(r, sub, f"{sname}:", sec, sname)
        return out

    def _read_field(self, r: _Reader, f: dict, path: str, sec: Section, ctx: str):
        ftype = f.get("type", "unknown")
        if not isinstance(ftype, str):
            raise r.error(f"VM description of {ctx}: field {f['name']} has type {str(ftype)[:40]}")
        if ftype == "struct":
            sdesc = f.get("struct")
            if not isinstance(sdesc, dict):
                raise r.error(f"VM description of {ctx}: struct field {f['name']} has no 'struct'")
            return self._read_struct(r, sdesc, f"{path}.", sec, ctx)
        if ftype == "capability":
            cap = r.str8(f"capability {path} of {ctx}")
            return cap
        size = f.get("size")
        if not isinstance(size, int) or size < 0:
            raise r.error(f"VM description of {ctx}: field {f['name']} has size {size!r}")
        at = r.tell()
        raw = r.read(size, f"field {path} of {ctx} ({ftype}, {size} bytes)")
        leaf = Leaf(path, ftype, at, size, raw)
        sec.leaves[path] = leaf
        return leaf.value

    # ---- RAM ----------------------------------------------------------------

    def _read_ram(self, r: _Reader, sec: Section) -> None:
        ps = self.page_size
        caps = set(self.capabilities())
        if "mapped-ram" in caps:
            raise r.error("the stream uses the mapped-ram capability; this reader knows the sequential format",
                          sec.start)
        # The block of the previous page: a CONTINUE record may refer to it
        # across PART/END boundaries (QEMU keeps last_sent_block across iterations).
        block: RamBlock | None = self._ram_last_block
        data, size, mask = r.data, r.size, ps - 1
        zero_cont, page_cont = RAM_ZERO | RAM_CONTINUE, RAM_PAGE | RAM_CONTINUE
        while True:
            at = r.pos
            if at + 8 <= size:
                word = int.from_bytes(data[at:at + 8], "big")
                r.pos = at + 8
            else:
                word = r.be64("a RAM page header (address | flags)")
            flags = word & mask
            addr = word & ~mask
            # Fast paths: the bulk of a stream is pages of the block just named.
            if block is not None and addr < block.length:
                if flags == zero_cont and r.pos < size:
                    # This zero page (any fill byte, as before) and the run that follows it.
                    left = -(-(block.length - addr) // ps) - 1  # pages of the block after this one
                    n = 1 + _zero_run(data, at + 9, word + ps, ps, min(left, (size - at - 9) // 9))
                    block._set_run(addr // ps, n, PAGE_ZERO)
                    r.pos = at + 9 * n
                    continue
                if flags == page_cont and r.pos + ps <= size:
                    block._set(addr // ps, r.pos)
                    r.pos += ps
                    continue
            if flags & RAM_MEM_SIZE:
                total = addr
                while total > 0:
                    bat = r.tell()
                    name = r.str8("a RAM block name")
                    length = r.be64(f"the length of RAM block {name}")
                    if length == 0 or length > total:
                        raise r.error(f"RAM block {name} has length {length:#x}, more than the {total:#x} left", bat)
                    total -= length
                    if "x-ignore-shared" in caps:
                        r.be64(f"the mr address of RAM block {name}")
                    self.ram_blocks[name] = RamBlock(name, length, ps)
                flags &= ~RAM_MEM_SIZE
            if flags & (RAM_ZERO | RAM_PAGE):
                if flags & RAM_CONTINUE:
                    if block is None:
                        raise r.error("RAM page marked CONTINUE, but no block was named before", at)
                else:
                    bname = r.str8("a RAM block name")
                    block = self.ram_blocks.get(bname)
                    if block is None:
                        raise r.error(f"RAM page for block {bname!r}, which the MEM_SIZE record did not announce", at)
                if addr >= block.length:
                    raise r.error(f"RAM page at {addr:#x} is beyond block {block.name} ({block.length:#x} bytes)", at)
                if flags & RAM_ZERO:
                    r.u8("the fill byte of a zero page")
                    block._set(addr // ps, PAGE_ZERO)
                else:
                    r.skip(ps, f"page {addr:#x} of RAM block {block.name}")
                    block._set(addr // ps, r.pos - ps)
                flags &= ~(RAM_ZERO | RAM_PAGE | RAM_CONTINUE)
            if flags & (RAM_XBZRLE | RAM_HOOK | RAM_COMPRESS_PAGE):
                raise r.error(f"RAM record with flags {flags:#x} (XBZRLE/hook/compressed pages are not supported)", at)
            if flags & RAM_MULTIFD_FLUSH:
                flags &= ~RAM_MULTIFD_FLUSH
                if not flags:
                    continue
            if flags & RAM_EOS:
                flags &= ~RAM_EOS
                if flags:
                    raise r.error(f"unknown RAM flags {flags:#x}", at)
                self._ram_last_block = block
                return
            if flags:
                raise r.error(f"unknown RAM flags {flags:#x}", at)

    def main_ram_block(self) -> RamBlock:
        """The guest's main RAM block (``pc.ram``, ``microvm.ram``, ... : the largest)."""
        if not self.ram_blocks:
            raise MigrationStreamError(self.path, 8, "the stream has no RAM section")
        rams = [b for b in self.ram_blocks.values() if b.name.endswith(".ram")]
        return max(rams or self.ram_blocks.values(), key=lambda b: b.length)

    def read_ram(self, block: str | RamBlock, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in a RAM block as the stream leaves them
        (pages never sent or sent as zero read as zeros)."""
        blk = block if isinstance(block, RamBlock) else self.ram_blocks.get(block)
        if blk is None:
            raise MigrationStreamError(self.path, 8, f"no RAM block {block!r} (have {', '.join(self.ram_blocks)})")
        if offset < 0 or size < 0 or offset + size > blk.length:
            raise MigrationStreamError(self.path, 8, f"RAM range {offset:#x}+{size:#x} is outside block "
                                                     f"{blk.name} ({blk.length:#x} bytes)")
        out = bytearray()
        ps = blk.page_size
        with open(self.path, "rb") as fh:
            pos = offset
            while pos < offset + size:
                page, within = divmod(pos, ps)
                n = min(ps - within, offset + size - pos)
                where = blk.page(page)
                if where >= 0:
                    fh.seek(where + within)
                    chunk = fh.read(n)
                    if len(chunk) != n:
                        raise MigrationStreamError(self.path, where + within, "file changed since it was opened")
                    out += chunk
                else:
                    out += bytes(n)
                pos += n
        return bytes(out)

    def read_guest_memory(self, gpa: int, size: int, *, block: str | None = None) -> bytes:
        """Guest-physical memory from the main RAM block, which maps GPA 0..length
        one to one for guests below the PCI hole (microvm, small pc/q35).  Pass
        ``block`` to read another block (offset = ``gpa``)."""
        blk = self.ram_blocks.get(block) if block else self.main_ram_block()
        if blk is None:
            raise MigrationStreamError(self.path, 8, f"no RAM block {block!r} (have {', '.join(self.ram_blocks)})")
        return self.read_ram(blk, gpa, size)

    # ---- devices and vCPUs ----------------------------------------------------

    def section(self, name: str, instance: int = 0) -> Section:
        sec = self.devices.get((name, instance))
        if sec is None:
            have = sorted(i for (n, i) in self.devices if n == name)
            raise MigrationStreamError(self.path, max(self.vmdesc_offset, 0),
                                       f"no {name!r} section with instance id {instance}"
                                       + (f" (instances: {have})" if have else ""))
        return sec

    @property
    def cpu_indexes(self) -> list[int]:
        return sorted(i for (n, i) in self.devices if n == "cpu")

    def accelerator_guess(self) -> str | None:
        """``"kvm"`` when the stream looks like it came from a KVM guest (a
        kvmclock device, or the cpu/tsc_khz subsection), else ``"tcg"``."""
        if any(n == "kvmclock" for (n, _i) in self.devices):
            return "kvm"
        if any("cpu/tsc_khz" in s.subsections for (n, _i), s in self.devices.items() if n == "cpu"):
            return "kvm"
        return "tcg"

    def cpu_state(self, index: int = 0, *, accelerator: str | None = None) -> CpuState:
        """The vCPU whose ``cpu`` section has instance id ``index``.

        ``accelerator`` ("kvm" or "tcg") decides how env.fpregs is ordered
        (see docs/migration.md); default: ``accelerator_guess()``."""
        if not self.cpu_indexes:
            names = sorted({n for n, _ in self._desc_by_key})
            raise MigrationStreamError(self.path, max(self.vmdesc_offset, 0),
                                       "the VM description has no 'cpu' device (devices: "
                                       + ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") + ")")
        sec = self.section("cpu", index)
        return CpuState(self, sec, accelerator=accelerator)

    # ---- editing ----------------------------------------------------------------

    def patch(self, path_out: str | os.PathLike, edits: Mapping[Leaf, bytes]) -> "MigrationStream":
        """Copy the stream to ``path_out`` with ``edits`` (leaf -> new raw bytes,
        same size) applied in place, and open the copy."""
        for leaf, raw in edits.items():
            if len(raw) != leaf.size:
                raise ValueError(f"{leaf.path} is {leaf.size} bytes, the new value has {len(raw)}")
        out = os.fspath(path_out)
        if os.path.abspath(out) == os.path.abspath(self.path):
            raise ValueError("patch() writes a copy; path_out must differ from the stream's own path")
        shutil.copyfile(self.path, out)
        with open(out, "r+b") as fh:
            for leaf, raw in edits.items():
                fh.seek(leaf.offset)
                fh.write(raw)
        return MigrationStream.open(out)

    def register_edits(self, name: str, value: bytes, *, cpu: int = 0, mark_xstate: bool = True) -> dict[Leaf, bytes]:
        """The leaf edits that set register ``name`` of vCPU ``cpu`` to ``value``
        (little-endian bytes, or an int for GPR-like registers)."""
        state = self.cpu_state(cpu)
        pieces = state._register_pieces(name)
        width = sum(pc.size for pc in pieces)
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        value = bytes(value)
        if len(value) != width:
            raise ValueError(f"{name} is {width} bytes in the stream, the value has {len(value)}")
        edits: dict[Leaf, bytearray] = {}
        for pc in pieces:
            raw = edits.setdefault(pc.leaf, bytearray(pc.leaf.raw))
            raw[pc.leaf_offset:pc.leaf_offset + pc.size] = pc.encode(value)
        if mark_xstate and state.xstate_bv is not None:
            mask = _xstate_mask_of(name)
            if mask and state.xstate_bv & mask != mask:
                leaf = state.leaves["env.xstate_bv"]
                new = state.xstate_bv | mask
                edits[leaf] = bytearray(new.to_bytes(leaf.size, "big"))
        return {leaf: bytes(raw) for leaf, raw in edits.items()}

    def with_register(self, path_out: str | os.PathLike, name: str, value: bytes | int, *, cpu: int = 0,
                      mark_xstate: bool = True) -> "MigrationStream":
        """A copy of the stream at ``path_out`` in which register ``name`` of vCPU
        ``cpu`` holds ``value``; returns the opened copy.

        ``mark_xstate``: also set the register's components in env.xstate_bv
        (QEMU hands that to KVM_SET_XSAVE; a clear bit would load init state).
        The register must already be in the stream: a subsection QEMU did not
        send (cpu/avx512 when all AVX-512 state was zero) cannot be added in place.
        """
        return self.patch(path_out, self.register_edits(name, value, cpu=cpu, mark_xstate=mark_xstate))

    def __repr__(self) -> str:
        return (f"<MigrationStream {self.path}: {self.size} bytes, {len(self.sections)} sections, "
                f"cpus {self.cpu_indexes}, RAM {', '.join(self.ram_blocks) or '-'}>")
