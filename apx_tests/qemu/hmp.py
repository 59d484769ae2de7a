"""HMP ``info registers`` observer: run it over QMP and parse its text.

QEMU prints the CPU state with ``x86_cpu_dump_state`` (target/i386/cpu-dump.c).
What it prints depends on the vCPU's mode and XCR0 (QEMU 10.0, checked here):

* 64-bit code segment (CS.L): ``RAX=`` .. ``R15=`` (16 hex digits), ``RIP=``,
  ``RFL=`` (8 digits); QEMU 11 adds ``R16=`` .. ``R31=`` lines when the CPU has
  APX.  Any other mode (real mode at reset, 32-bit protected mode): ``EAX=`` ..
  ``EDI=``, ``EIP=``, ``EFL=`` (8 digits) and no R8-R15.
* ``FCW= FSW= [ST=n] FTW= MXCSR=``, then ``FPRi=<64-bit significand> <16-bit
  sign+exponent>`` for the *physical* x87 registers R0-R7.
* Vector registers, one format only:
  ``ZMM00=`` .. (8 quadwords, most significant first) and ``Opmask00=`` .. when
  XCR0 enables x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM (0xe7); else ``YMM00=`` .. (4
  quadwords) when XCR0 has SSE|AVX (0x6); else ``XMM00=`` .. (2 quadwords, two
  registers per line).  16 (ZMM: 32) registers in 64-bit mode, 8 otherwise.
  XCR0 itself is not printed by QEMU 10 (a line ``XCR0=`` is parsed if a later
  QEMU prints one).

``parse_info_registers`` returns raw little-endian bytes per register, exactly as an
XSAVE image stores them (names as in ``apx_tests.xsave``):

* ``rax`` .. ``r15``, ``r16`` .. ``r31``, ``rip``, ``rflags``: 8 bytes (64-bit mode);
* ``eax`` .. ``edi``, ``eip``, ``eflags``: 4 bytes (any other mode: QEMU prints 32 bits);
* ``st0`` .. ``st7``: 10 bytes; ST(i) = physical FPR[(TOP + i) & 7] with TOP from FSW
  bits 13:11 -- the order FXSAVE/XSAVE store them;
* ``fcw`` / ``fsw`` / ``ftw`` / ``mxcsr``: 2 / 2 / 1 (abridged tag byte) / 4 bytes;
* ``xmmN`` / ``ymmN`` / ``zmmN``: 16 / 32 / 64 bytes, low byte first.  A wider line
  also gives the narrower views: YMM03 yields ``ymm3`` and ``xmm3`` (its low 16
  bytes); ZMM03 yields ``zmm3``, ``ymm3``, ``xmm3``; ZMM16-31 yield only ``zmm16``..;
* ``k0`` .. ``k7``: 8 bytes;
* ``cr0`` ``cr2`` ``cr3`` ``cr4``, ``dr0``-``dr3``, ``dr6``, ``dr7``, ``efer``, ``xcr0`` and any
  other ``NAME=<hex>`` field (lower-cased): 8 bytes (more if printed wider).

Segment, descriptor-table and flag-letter fields are recognised and skipped.
Anything else raises ``HmpParseError`` naming the line.
"""

from __future__ import annotations

import re
from typing import Callable, Union

__all__ = ["HmpParseError", "parse_info_registers", "read_info_registers", "hmp_command"]


class HmpParseError(ValueError):
    """``info registers`` text that does not parse; the message is one line naming the line."""

    def __init__(self, problem: str, line: str | None = None, lineno: int | None = None):
        where = "HMP info registers"
        if lineno is not None:
            where += f" line {lineno}"
        text = problem if line is None else f"{problem}: {line.strip()[:120]!r}"
        super().__init__(" ".join(f"{where}: {text}".split()))


_SEGMENTS = {"ES", "CS", "SS", "DS", "FS", "GS", "LDT", "TR", "GDT", "IDT"}
_META = {"CPL", "II", "A20", "SMM", "HLT"}          # decimal flags on the RIP/EIP line
_CC = {"CCS", "CCD", "CCO"}                          # only with CPU_DUMP_CCOP
_GPR64 = re.compile(r"R(AX|BX|CX|DX|SI|DI|BP|SP|IP|\d+)")
_GPR32 = re.compile(r"E(AX|BX|CX|DX|SI|DI|BP|SP|IP)")
_VEC = re.compile(r"(XMM|YMM|ZMM)(\d\d)")
_VEC_QWORDS = {"XMM": 2, "YMM": 4, "ZMM": 8}
_NAME_SPLIT = re.compile(r"([A-Za-z][A-Za-z0-9]*)\s*=")
_HEX = re.compile(r"[0-9a-fA-F]+")
# Fixed-width fields besides the GPRs: HMP name -> (register name, hex digits, bytes).
_SCALARS = {"RFL": ("rflags", 8, 8), "EFL": ("eflags", 8, 4), "FCW": ("fcw", 4, 2), "FSW": ("fsw", 4, 2),
            "FTW": ("ftw", 2, 1), "MXCSR": ("mxcsr", 8, 4)}


def _hex(value: str, digits: int | None, name: str, line: str, lineno: int) -> int:
    if not _HEX.fullmatch(value) or (digits is not None and len(value) != digits):
        want = f"{digits} hex digits" if digits else "hex digits"
        raise HmpParseError(f"{name}: expected {want}, got {value!r}", line, lineno)
    return int(value, 16)


def _scalar(upper: str) -> tuple[str, int, int] | None:
    """(register name, hex digits, bytes) of a fixed-width field, or None for any other."""
    if _GPR64.fullmatch(upper):                         # RAX..RSP, RIP, R8..R15, R16..R31
        return upper.lower(), 16, 8
    if _GPR32.fullmatch(upper):                         # any mode but 64-bit: 32 bits printed
        return upper.lower(), 8, 4
    return _SCALARS.get(upper)


def parse_info_registers(text: str) -> dict[str, bytes]:
    """Parse one CPU's HMP ``info registers`` output into raw little-endian register bytes."""
    if not isinstance(text, str):
        raise HmpParseError(f"expected text, got {type(text).__name__}")
    regs: dict[str, bytes] = {}
    fpr: dict[int, bytes] = {}
    cpus = 0
    vec_kind: str | None = None

    def put(name: str, value: bytes, line: str, lineno: int) -> None:
        if name in regs:
            raise HmpParseError(f"register {name} appears twice", line, lineno)
        regs[name] = value

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if re.fullmatch(r"CPU#\d+", line):
            cpus += 1
            if cpus > 1:
                raise HmpParseError("more than one CPU in the text (info registers -a?): parse one CPU at a time",
                                    line, lineno)
            continue
        stripped = re.sub(r"\[[^\]]*\]", " ", line)      # flag letters, [ST=n]
        parts = _NAME_SPLIT.split(stripped)
        if parts[0].strip():
            raise HmpParseError("unrecognised line", raw, lineno)
        if len(parts) < 3:
            raise HmpParseError("unrecognised line", raw, lineno)
        first = parts[1].upper()
        if first in _SEGMENTS:
            continue                                     # selector/base/limit/flags: not register state here
        for i in range(1, len(parts), 2):
            name, values = parts[i], parts[i + 1].split()
            upper = name.upper()
            if upper in _META or upper in _CC:
                continue
            if not values:
                raise HmpParseError(f"{name}: no value", raw, lineno)
            m = _VEC.fullmatch(upper)
            if m:
                kind, idx = m.group(1), int(m.group(2))
                if vec_kind is not None and vec_kind != kind:
                    raise HmpParseError(f"{kind} line after {vec_kind} lines", raw, lineno)
                vec_kind = kind
                n = _VEC_QWORDS[kind]
                if len(values) != n:
                    raise HmpParseError(f"{name}: expected {n} quadwords, got {len(values)}", raw, lineno)
                # printed most significant quadword first; XSAVE stores low byte first
                data = b"".join(_hex(v, 16, name, raw, lineno).to_bytes(8, "little") for v in reversed(values))
                put(f"{kind.lower()}{idx}", data, raw, lineno)
                if kind != "XMM" and idx < 16:
                    if kind == "ZMM":
                        put(f"ymm{idx}", data[:32], raw, lineno)
                    put(f"xmm{idx}", data[:16], raw, lineno)
                continue
            if len(values) != 1 and not upper.startswith("FPR"):
                raise HmpParseError(f"{name}: expected one value, got {len(values)}", raw, lineno)
            value = values[0] if values else ""
            scalar = _scalar(upper)
            if scalar is not None:
                reg, digits, size = scalar
                put(reg, _hex(value, digits, name, raw, lineno).to_bytes(size, "little"), raw, lineno)
                continue
            if upper.startswith("FPR") and upper[3:].isdigit():
                idx = int(upper[3:])
                if idx > 7 or len(values) != 2:
                    raise HmpParseError(f"{name}: expected FPR0-7 with <significand> <exponent>", raw, lineno)
                if idx in fpr:
                    raise HmpParseError(f"register {name} appears twice", raw, lineno)
                mant = _hex(values[0], 16, name, raw, lineno)
                exp = _hex(values[1], 4, name, raw, lineno)
                fpr[idx] = mant.to_bytes(8, "little") + exp.to_bytes(2, "little")
                continue
            if upper.startswith("OPMASK") and upper[6:].isdigit():
                idx = int(upper[6:])
                if idx > 7:
                    raise HmpParseError(f"{name}: no such opmask register", raw, lineno)
                put(f"k{idx}", _hex(value, 16, name, raw, lineno).to_bytes(8, "little"), raw, lineno)
                continue
            # CR0-4, DR0-7, EFER, XCR0 and any future NAME=<hex>: 8 bytes (or wider if printed wider)
            number = _hex(value, None, name, raw, lineno)
            size = max(8, (len(value) + 1) // 2)
            put(upper.lower(), number.to_bytes(size, "little"), raw, lineno)

    if fpr:
        if "fsw" not in regs:
            raise HmpParseError("FPR lines without an FSW field (TOP unknown)")
        if sorted(fpr) != list(range(8)):
            raise HmpParseError(f"FPR lines incomplete: have FPR{sorted(fpr)}")
        top = (int.from_bytes(regs["fsw"], "little") >> 11) & 7
        for i in range(8):
            regs[f"st{i}"] = fpr[(top + i) & 7]
    if not regs:
        first = next((l for l in text.splitlines() if l.strip()), "")
        raise HmpParseError("no registers found (not info registers output?)", first or "<empty>")
    return regs


HmpCallable = Callable[[str], str]


def hmp_command(qmp_or_callable: Union[HmpCallable, object], command_line: str,
                cpu_index: int | None = None) -> str:
    """Run one HMP command: through a callable ``hmp(cmd) -> str`` or a QMP client.

    A QMP client is anything with ``cmd(name, **args)`` (``qemu.qmp.legacy.QEMUMonitorProtocol``);
    it is sent ``human-monitor-command`` (with ``cpu-index`` when given).
    """
    if callable(qmp_or_callable):
        if cpu_index is not None:
            raise TypeError("cpu_index needs a QMP client, not a callable")
        out = qmp_or_callable(command_line)
    else:
        args: dict = {"command-line": command_line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        out = qmp_or_callable.cmd("human-monitor-command", **args)
    if not isinstance(out, str):
        raise HmpParseError(f"HMP {command_line!r} returned {type(out).__name__}, not text")
    return out


def read_info_registers(qmp_or_callable: Union[HmpCallable, object], cpu_index: int | None = None) -> str:
    """The text of HMP ``info registers`` (parse it with ``parse_info_registers``)."""
    return hmp_command(qmp_or_callable, "info registers", cpu_index)
