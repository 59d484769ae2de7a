"""Read QEMU migration streams (``migrate`` to ``file:PATH``) and turn the
vCPU state into the project's XSAVE register view.

A stream is walked the way QEMU's own ``scripts/analyze-migration.py`` walks
it: the trailing JSON VM description ("vmdesc") says, for every device
section, which fields were written and how big each one is, so the reader
never needs a fixed offset.  RAM sections carry no description; their page
records are walked and only the file offset of each page is kept (page data
is never held in memory), so guest memory can be read back on demand.

Everything is big-endian on the wire (QEMU's ``qemu_put_be*``); register
values handed out here are little-endian, the XSAVE byte order.

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
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ...xsave import Layout, XsaveImage, XsaveError, register as xsave_register
from ...xsave.layout import (
    APX,
    AVX,
    BNDCSR,
    BNDREGS,
    HI16_ZMM,
    LEGACY_SIZE,
    OPMASK,
    PKRU,
    XTILECFG,
    XTILEDATA,
    ZMM_HI256,
    component_name,
)

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

_VMDESC_TAIL_LIMIT = 64 << 20  # how far from the end a vmdesc may start


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

    def page_count(self, kind: str = "data") -> int:
        """How many pages are ``"data"`` (sent with contents), ``"zero"`` or ``"unsent"``."""
        if kind == "data":
            return sum(1 for p in self.pages if p >= 0)
        if kind == "zero":
            return self.pages.count(PAGE_ZERO)
        if kind == "unsent":
            return self.pages.count(PAGE_NOT_SENT) + self.page_total - len(self.pages)
        raise ValueError(f"kind must be 'data', 'zero' or 'unsent', not {kind!r}")


# ---------------------------------------------------------------------------
# Register pieces: how register bytes map onto field bytes


@dataclass(frozen=True)
class _Piece:
    """Register bytes [reg_offset, reg_offset+size) are leaf.raw[leaf_offset:+size],
    reversed when ``reverse`` (a big-endian integer on the wire)."""

    reg_offset: int
    size: int
    leaf: Leaf
    leaf_offset: int = 0
    reverse: bool = True

    def extract(self) -> bytes:
        chunk = self.leaf.raw[self.leaf_offset:self.leaf_offset + self.size]
        return chunk[::-1] if self.reverse else chunk

    def encode(self, value: bytes) -> bytes:
        chunk = value[self.reg_offset:self.reg_offset + self.size]
        return chunk[::-1] if self.reverse else chunk


def _int_pieces(leaf: Leaf, reg_offset: int = 0) -> list[_Piece]:
    return [_Piece(reg_offset, leaf.size, leaf, 0, not leaf.little_endian)]


GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
APX_GPR_NAMES = tuple(f"r{16 + i}" for i in range(16))

# Which ZMMReg qwords each QEMU vmstate struct carries, and the first register
# an array of it describes (target/i386/machine.c).
_ZMM_STRUCTS = {
    "xmm_reg": 0,
    "ymmh_reg": 0,
    "zmmh_reg": 0,
    "hi16_zmm_reg": 16,
}


class CpuState:
    """The state of one vCPU as found in its ``cpu`` section.

    ``fields``/``subsections``/``leaves`` are the raw parse (see ``Section``);
    ``registers`` maps every register found to its little-endian bytes:
    ``rax``..``r15``, ``r16``..``r31`` (APX, when the stream has them),
    ``rip``, ``rflags``, ``xmm0``..``xmm15``, ``ymm*``/``zmm*`` where the
    upper parts are present, ``k0``..``k7``, ``st0``..``st7`` (XSAVE slot
    order, ST(i) relative to TOP), ``pkru``, ``mxcsr``.
    """

    def __init__(self, stream: "MigrationStream", section: Section, *, accelerator: str | None = None):
        self.stream = stream
        self.section = section
        self.index = section.instance_id
        self.fields = section.fields
        self.subsections = section.subsections
        self.leaves: dict[str, Leaf] = section.leaves
        self.notes: list[str] = []
        self.accelerator = accelerator or stream.accelerator_guess()
        self._pieces: dict[str, list[_Piece]] = {}
        self._map()

    # ---- helpers ---------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.stream.path} cpu {self.index}"

    def _error(self, problem: str, offset: int | None = None) -> MigrationStreamError:
        return MigrationStreamError(self.stream.path, self.section.start if offset is None else offset,
                                    f"cpu {self.index}: {problem}")

    def _leaf(self, path: str) -> Leaf | None:
        return self.leaves.get(path)

    def _int(self, path: str) -> int | None:
        leaf = self._leaf(path)
        return None if leaf is None or not leaf.is_int else int(leaf.value)

    def _array_leaves(self, prefix: str, names: Iterable[str]) -> dict[int, Leaf]:
        """Leaves ``<name>[i]`` (int, one element each) for the first name that has any."""
        for name in names:
            found = {}
            for i in range(64):
                leaf = self.leaves.get(f"{prefix}{name}[{i}]")
                if leaf is None:
                    break
                found[i] = leaf
            if found:
                return found
        return {}

    # ---- the map from registers to fields -----------------------------------

    def _map(self) -> None:
        p = self._pieces
        # GPRs: env.regs[0..15], or [0..31] when a QEMU keeps R16-R31 in the same array.
        regs = self._array_leaves("", ["env.regs"])
        for i, leaf in regs.items():
            if i < 16:
                p[GPR_NAMES[i]] = _int_pieces(leaf)
            elif i < 32:
                p[APX_GPR_NAMES[i - 16]] = _int_pieces(leaf)
        for name, path in (("rip", "env.eip"), ("rflags", "env.eflags"), ("mxcsr", "env.mxcsr"),
                           ("xcr0", "env.xcr0"), ("xstate_bv", "env.xstate_bv")):
            leaf = self._leaf(path)
            if leaf is not None:
                p[name] = _int_pieces(leaf)

        # XMM/YMM/ZMM lanes: every ZMMReg struct array, wherever it is.
        self._lanes: dict[tuple[int, int], Leaf] = {}  # (register, qword) -> leaf
        self._map_zmm_structs()

        # x87
        fp = {}
        for i in range(8):
            leaf = self._leaf(f"env.fpregs[{i}].tmp")
            if leaf is not None and leaf.size == 10:
                fp[i] = leaf
        self._fpregs = fp

        # AVX-512 opmask
        kregs = self._array_leaves("cpu/avx512:", ["env.opmask_regs"])
        for i, leaf in kregs.items():
            if i < 8:
                p[f"k{i}"] = _int_pieces(leaf)

        # PKRU
        leaf = self._leaf("cpu/pkru:env.pkru")
        if leaf is not None:
            p["pkru"] = _int_pieces(leaf)

        # APX: subsection cpu/apx (QEMU >= 11), whatever its array is called.
        if "cpu/apx" in self.subsections:
            apx = [lf for path, lf in self.leaves.items() if path.startswith("cpu/apx:")]
            ints = [lf for lf in apx if lf.is_int and lf.size == 8]
            if len(ints) == 16 and len(apx) == 16:
                for i, leaf in enumerate(ints):
                    p[APX_GPR_NAMES[i]] = _int_pieces(leaf)
            else:
                shape = ", ".join(f"{lf.path}:{lf.type}/{lf.size}" for lf in apx[:4])
                self.notes.append(f"subsection cpu/apx has an unknown layout ({len(apx)} fields: {shape}"
                                  f"{', ...' if len(apx) > 4 else ''}); R16-R31 not mapped")

    def _map_zmm_structs(self) -> None:
        # Leaves look like "<sub:>env.xmm_regs[0][3]._q_ZMMReg[1]": the struct's
        # vmsd name (from the description) says which registers the array holds,
        # the inner field name says which qword of the 512-bit register.
        for fdesc, prefix in self._struct_arrays():
            sdesc = fdesc["struct"]
            vmsd_name = sdesc.get("vmsd_name")
            base = _ZMM_STRUCTS.get(vmsd_name) if isinstance(vmsd_name, str) else None
            if base is None:
                continue
            if isinstance(fdesc.get("array_len"), int):
                indexes = range(fdesc["array_len"])
            elif isinstance(fdesc.get("index"), int):
                indexes = [fdesc["index"]]
            else:
                continue
            for i in indexes:
                for sub in sdesc.get("fields", []):
                    sname = sub.get("name", "") if isinstance(sub, dict) else ""
                    q = _zmm_q_index(sname)
                    leaf = self.leaves.get(f"{prefix}[{i}].{sname}") if q is not None else None
                    if leaf is not None and leaf.size == 8:
                        self._lanes[(base + i, q)] = leaf

    def _struct_arrays(self) -> list[tuple[dict, str]]:
        """(field description, leaf path prefix) of every struct field of the
        cpu section and of its subsections."""
        out = []

        def walk(d: dict, pathprefix: str) -> None:
            for f in d.get("fields", []):
                if isinstance(f, dict) and f.get("type") == "struct" and isinstance(f.get("struct"), dict):
                    out.append((f, f"{pathprefix}{f.get('name')}"))
            for s in d.get("subsections", []) or []:
                if isinstance(s, dict):
                    walk(s, f"{s.get('vmsd_name')}:")

        walk(self.section.desc or {}, "")
        return out

    def fpregs_physical(self) -> bool:
        """True when env.fpregs[] holds physical x87 registers (TCG), False when
        QEMU copied the XSAVE slots verbatim (KVM: slot i = ST(i))."""
        return self.accelerator != "kvm"

    @property
    def fpstt(self) -> int:
        fsw = self._int("env.fpus_vmstate")
        return 0 if fsw is None else (fsw >> 11) & 7

    def _register_pieces(self, name: str) -> list[_Piece]:
        """How the bytes of register ``name`` map onto leaves; raises when the
        stream does not carry (all of) the register."""
        name = name.lower()
        if name == "eflags":
            name = "rflags"
        if name in self._pieces:
            return self._pieces[name]
        kind, idx = _split_name(name)
        if kind in ("xmm", "ymm", "zmm") and idx >= 0:  # not a bare "xmm" (idx -1)
            qwords = {"xmm": 2, "ymm": 4, "zmm": 8}[kind]
            if kind != "zmm" and idx >= 16:
                raise self._error(f"no register {name}: only {kind}0-{kind}15 exist")
            pieces, missing = [], []
            for q in range(qwords):
                leaf = self._lanes.get((idx, q))
                if leaf is None:
                    missing.append(q)
                else:
                    pieces.append(_Piece(8 * q, 8, leaf))
            if missing:
                raise self._error(f"the stream has no field for {name} bytes {8 * missing[0]}.."
                                  f"{8 * missing[-1] + 7} ({_lane_hint(idx, missing[0])})")
            return pieces
        if kind == "st" and 0 <= idx < 8:  # not a bare "st": ST(-1) is no register
            if not self._fpregs:
                raise self._error(f"the stream has no env.fpregs for {name}")
            phys = (self.fpstt + idx) & 7 if self.fpregs_physical() else idx
            leaf = self._fpregs.get(phys)
            if leaf is None:
                raise self._error(f"the stream has no env.fpregs[{phys}] for {name}")
            # tmp = be64 mantissa + be16 sign/exponent -> XSAVE: le64 + le16
            return [_Piece(0, 8, leaf, 0), _Piece(8, 2, leaf, 8)]
        hint = {
            "k": "subsection cpu/avx512 absent (QEMU sends it only when opmask/zmm state is non-zero)",
            "r": "no cpu/apx subsection and env.regs has 16 entries (QEMU < 11 or a CPU without APX)",
            "pkru": "subsection cpu/pkru absent (QEMU sends it only when PKRU != 0)",
        }.get(kind, "unknown register name")
        raise self._error(f"the stream has no field for {name}: {hint}")

    # ---- values ------------------------------------------------------------

    def has(self, name: str) -> bool:
        try:
            self._register_pieces(name)
            return True
        except MigrationStreamError:
            return False

    def register(self, name: str) -> bytes:
        """A register's value, little-endian (XSAVE byte order)."""
        return b"".join(pc.extract() for pc in self._register_pieces(name))

    def register_leaves(self, name: str) -> list[Leaf]:
        return [pc.leaf for pc in self._register_pieces(name)]

    @property
    def gprs(self) -> dict[str, int]:
        """rax..r15 (+ r16..r31 when present), rip, rflags as integers."""
        out = {}
        for n in GPR_NAMES + APX_GPR_NAMES + ("rip", "rflags"):
            if n in self._pieces:
                out[n] = int.from_bytes(self.register(n), "little")
        return out

    @property
    def registers(self) -> dict[str, bytes]:
        out = {}
        for n in self.register_names():
            out[n] = self.register(n)
        return out

    def register_names(self) -> list[str]:
        names = [n for n in GPR_NAMES + APX_GPR_NAMES + ("rip", "rflags", "mxcsr") if n in self._pieces]
        for kind, count in (("zmm", 32), ("ymm", 16), ("xmm", 16)):
            names += [f"{kind}{i}" for i in range(count) if self.has(f"{kind}{i}")]
        names += [f"k{i}" for i in range(8) if f"k{i}" in self._pieces]
        names += [f"st{i}" for i in range(8) if self.has(f"st{i}")]
        if "pkru" in self._pieces:
            names.append("pkru")
        return names

    @property
    def xcr0(self) -> int | None:
        return self._int("env.xcr0")

    @property
    def xstate_bv(self) -> int | None:
        """QEMU's env.xstate_bv (the XSTATE_BV it would hand KVM), if migrated."""
        return self._int("env.xstate_bv")

    @property
    def mxcsr(self) -> int | None:
        return self._int("env.mxcsr")

    @property
    def has_apx(self) -> bool:
        return all(n in self._pieces for n in APX_GPR_NAMES)

    # ---- XSAVE ------------------------------------------------------------

    def legacy_region(self) -> bytes:
        """The 512-byte FXSAVE region QEMU would build for KVM (fcw..fdp, mxcsr,
        ST0-7 in slot order, XMM0-15).  MXCSR_MASK is not migrated: left 0."""
        legacy = bytearray(LEGACY_SIZE)
        fcw = self._int("env.fpuc")
        fsw = self._int("env.fpus_vmstate")
        ftw = self._int("env.fptag_vmstate")
        legacy[0:2] = (0x037F if fcw is None else fcw).to_bytes(2, "little")
        legacy[2:4] = (fsw or 0).to_bytes(2, "little")
        legacy[4] = (ftw or 0) & 0xFF  # fptag_vmstate bit i = physical reg i valid = abridged FTW
        for path, lo, size in (("cpu/fpop_ip_dp:env.fpop", 6, 2), ("cpu/fpop_ip_dp:env.fpip", 8, 8),
                               ("cpu/fpop_ip_dp:env.fpdp", 16, 8)):
            value = self._int(path)
            if value is not None:
                legacy[lo:lo + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        mx = self.mxcsr
        legacy[24:28] = (0x1F80 if mx is None else mx).to_bytes(4, "little")
        for i in range(8):
            if self.has(f"st{i}"):
                legacy[32 + 16 * i:32 + 16 * i + 10] = self.register(f"st{i}")
        for i in range(16):
            if self.has(f"xmm{i}"):
                legacy[160 + 16 * i:160 + 16 * (i + 1)] = self.register(f"xmm{i}")
        return bytes(legacy)

    def component_data(self) -> dict[int, bytes]:
        """Extended components (2 and up) the stream carries, as standard-format bytes."""
        comps: dict[int, bytes] = {}
        if all(self.has(f"ymm{i}") for i in range(16)):
            comps[AVX] = b"".join(self.register(f"ymm{i}")[16:] for i in range(16))
        if all(f"k{i}" in self._pieces for i in range(8)):
            comps[OPMASK] = b"".join(self.register(f"k{i}") for i in range(8))
        if all(self.has(f"zmm{i}") for i in range(16)):
            comps[ZMM_HI256] = b"".join(self.register(f"zmm{i}")[32:] for i in range(16))
        if all(self.has(f"zmm{i}") for i in range(16, 32)):
            comps[HI16_ZMM] = b"".join(self.register(f"zmm{i}") for i in range(16, 32))
        if "pkru" in self._pieces:
            comps[PKRU] = self.register("pkru") + bytes(4)
        if self.has_apx:
            comps[APX] = b"".join(self.register(n) for n in APX_GPR_NAMES)
        mpx = self._mpx()
        comps.update(mpx)
        amx = self._amx()
        comps.update(amx)
        return comps

    def _mpx(self) -> dict[int, bytes]:
        if "cpu/mpx" not in self.subsections:
            return {}
        bnd = bytearray()
        for i in range(4):
            for part in ("lb", "ub"):
                v = self._int(f"cpu/mpx:env.bnd_regs[{i}].{part}")
                if v is None:
                    self.notes.append("subsection cpu/mpx: unknown layout, BNDREGS not mapped")
                    return {}
                bnd += v.to_bytes(8, "little")
        cfgu = self._int("cpu/mpx:env.bndcs_regs.cfgu") or 0
        sts = self._int("cpu/mpx:env.bndcs_regs.sts") or 0
        return {BNDREGS: bytes(bnd), BNDCSR: cfgu.to_bytes(8, "little") + sts.to_bytes(8, "little") + bytes(48)}

    def _amx(self) -> dict[int, bytes]:
        sub = "cpu/intel_amx_xtile"
        if sub not in self.subsections:
            return {}
        out = {}
        for comp, name, size in ((XTILECFG, "env.xtilecfg", 64), (XTILEDATA, "env.xtiledata", 8192)):
            leaves = [self.leaves.get(f"{sub}:{name}[{i}]") for i in range(size)]
            if all(lf is not None and lf.size == 1 for lf in leaves):
                out[comp] = bytes(lf.raw[0] for lf in leaves)
            else:
                whole = self.leaves.get(f"{sub}:{name}")
                if whole is not None and whole.size == size:
                    out[comp] = whole.raw
                else:
                    self.notes.append(f"subsection {sub}: {name} has an unknown layout, not mapped")
        return out

    def to_xsave(self, layout: Layout, *, xstate_bv: str | int = "auto", strict: bool = True,
                 where: str | None = None) -> XsaveImage:
        """A standard-format ``XsaveImage`` holding the registers found.

        ``xstate_bv``:
          - ``"auto"`` (default): QEMU's env.xstate_bv when migrated, OR the
            components whose values are non-zero (QEMU's register copies are
            authoritative; under TCG env.xstate_bv is not maintained);
          - ``"qemu"``: env.xstate_bv exactly (what QEMU would give KVM_SET_XSAVE);
            falls back to ``"nonzero"`` when the stream has no env.xstate_bv;
          - ``"nonzero"``: x87/SSE always, others when non-zero;
          - an int: that value.
        Bits the layout does not support are dropped.  ``strict``: raise when
        a component with non-zero data has no place in ``layout``.
        """
        where = where or self.where
        comps = self.component_data()
        nonzero = 0b11
        for n, data in comps.items():
            if any(data):
                nonzero |= 1 << n
        qemu_bv = self.xstate_bv
        if isinstance(xstate_bv, int) and not isinstance(xstate_bv, bool):
            bv = xstate_bv
        elif xstate_bv == "auto":
            bv = nonzero | (qemu_bv or 0)
        elif xstate_bv == "qemu":
            bv = nonzero if qemu_bv is None else qemu_bv
        elif xstate_bv == "nonzero":
            bv = nonzero
        else:
            raise ValueError(f"xstate_bv must be 'auto', 'qemu', 'nonzero' or an int, not {xstate_bv!r}")
        supported = layout.supported_xcr0 & ~layout.supported_xss
        lost = [n for n, data in comps.items() if any(data) and not (supported >> n & 1 and layout.has(n))]
        if lost and strict:
            names = ", ".join(f"{n} ({component_name(n)})" for n in sorted(lost))
            raise self._error(f"non-zero state for component {names} has no place in the layout "
                              f"({layout.where}, XCR0 {layout.supported_xcr0:#x}); pass strict=False to drop it")
        # x87/SSE are always in the image; MPX and APX share offsets, keep what the layout has.
        usable = {n: d for n, d in comps.items() if supported >> n & 1 and layout.has(n)}
        bv &= supported
        for n in list(usable):
            if not bv >> n & 1:
                del usable[n]  # init state: leave the buffer's bytes zero
        try:
            return XsaveImage.build(layout, usable, xstate_bv=bv, legacy=self.legacy_region(), where=where)
        except XsaveError as err:
            raise self._error(f"cannot build an XSAVE image: {err}") from None

    def __repr__(self) -> str:
        return (f"<CpuState {self.where}: {len(self.leaves)} fields, subsections "
                f"{', '.join(self.subsections) or '-'}, accel {self.accelerator or '?'}>")


def _zmm_q_index(name: str) -> int | None:
    """``_q_ZMMReg[5]`` -> 5 (the qword of the 512-bit register)."""
    if name.startswith("_q_ZMMReg[") and name.endswith("]"):
        try:
            q = int(name[len("_q_ZMMReg["):-1])
        except ValueError:
            return None
        return q if 0 <= q < 8 else None
    return None


def _split_name(name: str) -> tuple[str, int]:
    for kind in ("xmm", "ymm", "zmm", "st", "k", "r"):
        if name.startswith(kind) and name[len(kind):].isdigit():
            return kind, int(name[len(kind):])
    return name, -1


def _lane_hint(reg: int, q: int) -> str:
    if reg >= 16:
        return "zmm16-31 live in subsection cpu/avx512, sent only when AVX-512 state is non-zero"
    if q < 2:
        return "no env.xmm_regs"
    if q < 4:
        return "no YMM upper halves (env.xmm_regs ymmh_reg, cpu vmstate v12)"
    return "zmm upper halves live in subsection cpu/avx512, sent only when AVX-512 state is non-zero"


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
                    r.pos += 1
                    block._set(addr // ps, PAGE_ZERO)
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


def _xstate_mask_of(name: str) -> int:
    """XSTATE_BV bits a register occupies (0 for registers outside XSAVE)."""
    try:
        return xsave_register(name).xstate_mask
    except Exception:
        return 0
