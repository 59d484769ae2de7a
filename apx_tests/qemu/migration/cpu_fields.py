"""The x86 vCPU field mapping of a QEMU migration stream: which vmstate fields of a
``cpu`` section (and its subsections) hold which register bytes, and how they make the
XSAVE components (``CpuState.registers``, ``component_data``, ``to_xsave``).

Field values are big-endian on the wire; the register values handed out here are
little-endian, the XSAVE byte order.  ``MigrationStream.cpu_state`` builds a ``CpuState``;
``MigrationStream.register_edits`` turns a register value back into leaf edits through
``CpuState._register_pieces`` and ``_xstate_mask_of``.  See docs/migration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

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
from .records import Leaf, MigrationStreamError, Section

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


def _xstate_mask_of(name: str) -> int:
    """XSTATE_BV bits a register occupies (0 for registers outside XSAVE)."""
    try:
        return xsave_register(name).xstate_mask
    except Exception:
        return 0
