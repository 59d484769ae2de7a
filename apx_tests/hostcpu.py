"""Host CPUID and XGETBV from Python, without a C compiler.

Two tiny x86-64 functions are written into an anonymous page (mapped read-write,
then made read-execute with mprotect, so the page is never writable and executable
at once) and called through ctypes:

- ``cpuid(leaf, subleaf)`` -> ``(eax, ebx, ecx, edx)``
- ``xgetbv(index)`` -> ``int`` (only when CPUID.1:ECX.OSXSAVE[27] is set; otherwise
  the instruction would raise #UD and kill the interpreter, so we refuse first)

Plus helpers built on them: ``vendor()``, ``family_model_stepping()``, ``microcode()``
(read from /proc/cpuinfo, which is the only place user space can see it).  And the texts
reasons are written in: ``parse_cpuid_requirement()`` (the CPUID bits a bank's requirement
names, ``CpuidBit``) and ``xcr0_bits_text()`` (the probe and the KVM backend share them).

Machine code (checked with ``llvm-mc-19 --triple=x86_64 --show-encoding``)::

    cpuid(uint32 leaf=edi, uint32 subleaf=esi, uint32 out[4]=rdx)
      53              push %rbx          ; rbx is callee-saved, cpuid clobbers it
      49 89 d0        mov  %rdx, %r8
      89 f8           mov  %edi, %eax
      89 f1           mov  %esi, %ecx
      0f a2           cpuid
      41 89 00        mov  %eax, (%r8)
      41 89 58 04     mov  %ebx, 4(%r8)
      41 89 48 08     mov  %ecx, 8(%r8)
      41 89 50 0c     mov  %edx, 12(%r8)
      5b              pop  %rbx
      c3              ret

    uint64 xgetbv(uint32 index=edi)
      89 f9           mov  %edi, %ecx
      0f 01 d0        xgetbv
      48 c1 e2 20     shl  $32, %rdx
      48 09 d0        or   %rdx, %rax
      c3              ret
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import re
import threading
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "HostCpuError",
    "cpuid",
    "xgetbv",
    "osxsave",
    "vendor",
    "family_model_stepping",
    "microcode",
    "cpuinfo_first",
    "CPUID_CODE",
    "XGETBV_CODE",
    "CpuidBit",
    "parse_cpuid_requirement",
    "XCR0_BIT_NAMES",
    "xcr0_bits_text",
]

CPUID_CODE = bytes.fromhex(
    "53" "4989d0" "89f8" "89f1" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3"
)
XGETBV_CODE = bytes.fromhex("89f9" "0f01d0" "48c1e220" "4809d0" "c3")

_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_PAGE = 4096


class HostCpuError(RuntimeError):
    """The host CPU cannot be asked (not x86-64, no executable memory, no OSXSAVE...)."""


_lock = threading.Lock()
_funcs: dict[str, Callable] | None = None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _build() -> dict[str, Callable]:
    """Map one page, copy both functions into it, make it R+X, return callables."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise HostCpuError(f"host is {platform.machine()}, not x86-64: no cpuid/xgetbv")
    libc = _libc()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.restype = ctypes.c_int
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = libc.mmap(None, _PAGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise HostCpuError(f"mmap of a code page failed: {os.strerror(err)}")
    xgetbv_off = 64
    ctypes.memmove(addr, CPUID_CODE, len(CPUID_CODE))
    ctypes.memmove(addr + xgetbv_off, XGETBV_CODE, len(XGETBV_CODE))
    if libc.mprotect(addr, _PAGE, _PROT_READ | _PROT_EXEC) != 0:
        err = ctypes.get_errno()
        raise HostCpuError(f"mprotect(PROT_READ|PROT_EXEC) failed: {os.strerror(err)}")
    # The page is never unmapped: the functions live as long as the process.
    cpuid_t = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                               ctypes.POINTER(ctypes.c_uint32 * 4))
    xgetbv_t = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)
    return {"cpuid": cpuid_t(addr), "xgetbv": xgetbv_t(addr + xgetbv_off)}


def _get(name: str) -> Callable:
    global _funcs
    with _lock:
        if _funcs is None:
            _funcs = _build()
        return _funcs[name]


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """Execute CPUID with EAX=leaf, ECX=subleaf on this CPU; return (eax, ebx, ecx, edx)."""
    if not (0 <= leaf <= 0xFFFFFFFF and 0 <= subleaf <= 0xFFFFFFFF):
        raise ValueError(f"cpuid leaf/subleaf out of 32-bit range: {leaf:#x}/{subleaf:#x}")
    out = (ctypes.c_uint32 * 4)()
    _get("cpuid")(leaf, subleaf, ctypes.byref(out))
    return (out[0], out[1], out[2], out[3])


def osxsave() -> bool:
    """CPUID.1:ECX.OSXSAVE[27]: the OS has set CR4.OSXSAVE, so XGETBV is allowed."""
    return bool(cpuid(1, 0)[2] >> 27 & 1)


def xgetbv(index: int = 0) -> int:
    """Execute XGETBV(ECX=index). Index 0 is XCR0; 1 is XINUSE (needs CPUID.(0xD,1).EAX[2])."""
    if not osxsave():
        raise HostCpuError("XGETBV not available: CPUID.1:ECX.OSXSAVE[27]=0")
    if index == 1 and not (cpuid(0xD, 1)[0] >> 2 & 1):
        raise HostCpuError("XGETBV(1) not available: CPUID.(EAX=0xD,ECX=1):EAX[2]=0")
    if index not in (0, 1):
        # Any other index raises #GP, which would kill the interpreter.
        raise ValueError(f"XGETBV index {index} is not defined (only 0 and 1)")
    return int(_get("xgetbv")(index))


def vendor() -> str:
    """The 12-character vendor string of CPUID leaf 0 (EBX, EDX, ECX)."""
    _, ebx, ecx, edx = cpuid(0, 0)
    return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode("ascii", "replace")


def family_model_stepping(eax: int | None = None, vendor_id: str | None = None) -> tuple[int, int, int]:
    """Display family, model and stepping from CPUID.1:EAX.

    Rules (Intel SDM vol. 2 CPUID; AMD APM vol. 3 CPUID Fn0000_0001_EAX):
    family = base family, plus extended family (bits 27:20) when base family is 0xF;
    model = base model, plus extended model (bits 19:16) << 4 when base family is 0xF,
    and on Intel also when base family is 6.
    """
    if eax is None:
        eax = cpuid(1, 0)[0]
    if vendor_id is None:
        vendor_id = vendor()
    stepping = eax & 0xF
    base_model = (eax >> 4) & 0xF
    base_family = (eax >> 8) & 0xF
    ext_model = (eax >> 16) & 0xF
    ext_family = (eax >> 20) & 0xFF
    family = base_family + (ext_family if base_family == 0xF else 0)
    use_ext_model = base_family == 0xF or (base_family == 6 and vendor_id != "AuthenticAMD")
    model = base_model + ((ext_model << 4) if use_ext_model else 0)
    return family, model, stepping


@functools.lru_cache(maxsize=None)
def _cpuinfo_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cpuinfo_first(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of the first processor block of /proc/cpuinfo ({} if unreadable)."""
    try:
        text = _cpuinfo_text(path)
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def microcode(path: str = "/proc/cpuinfo") -> int | None:
    """The microcode revision the kernel reports for CPU 0, or None if it reports none."""
    value = cpuinfo_first(path).get("microcode")
    if not value:
        return None
    try:
        return int(value, 0)
    except ValueError:
        return None


# --- the CPUID bits a requirement text names ---------------------------------------------

@dataclass(frozen=True)
class CpuidBit:
    """One CPUID bit a bank needs, parsed from its ``cpuid_requirement`` text."""
    leaf: int
    subleaf: int
    register: str  # "eax".."edx"
    bit: int
    name: str

    def value(self, cpuid) -> int:
        regs = dict(zip(("eax", "ebx", "ecx", "edx"), cpuid(self.leaf, self.subleaf)))
        return regs[self.register] >> self.bit & 1

    def describe(self, value: int) -> str:
        """'APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)', the notation of the SDM."""
        leaf = str(self.leaf) if self.leaf < 10 else f"{self.leaf:#x}"
        where = (f"CPUID.(EAX={leaf},ECX={self.subleaf})" if self.leaf in _SUBLEAF_LEAVES or self.subleaf
                 else f"CPUID.{leaf}")
        return f"{self.name} ({where}:{self.register.upper()}[{self.bit}]={value})"


# Leaves whose meaning depends on ECX (the SDM writes them as CPUID.(EAX=n,ECX=m)).
_SUBLEAF_LEAVES = {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20, 0x23, 0x24, 0x29}


_REQ_RE = re.compile(
    r"(?:CPUID\.(?:\(EAX=(?P<leaf>\w+),\s*ECX=(?P<sub>\w+)\)|(?P<leaf1>\w+)):)?"
    r"(?P<reg>E[ABCD]X)\[(?P<lo>\d+)(?:\.\.(?P<hi>\d+))?\]\s*\((?P<names>[^)]*)\)")


def parse_cpuid_requirement(text: str) -> list[CpuidBit]:
    """The CPUID bits named in a bank's requirement text, e.g.
    ``"CPUID.(EAX=7,ECX=0):EBX[16] (AVX512F), CPUID.1:ECX[27] (OSXSAVE) and EBX[30] (AVX512BW, ...)"``.
    A register without a leaf refers to the leaf named before it. Other conditions in the
    text (XCR0 bits, CR4 flags) are not CPUID bits and are checked elsewhere or not at all.
    """
    out: list[CpuidBit] = []
    leaf = sub = None
    for m in _REQ_RE.finditer(text):
        if m.group("leaf") is not None:
            leaf, sub = int(m.group("leaf"), 0), int(m.group("sub"), 0)
        elif m.group("leaf1") is not None:
            leaf, sub = int(m.group("leaf1"), 0), 0
        if leaf is None:
            continue
        lo = int(m.group("lo"))
        hi = int(m.group("hi") or lo)
        names = [n.strip() for n in m.group("names").split(",")]
        for i, bit in enumerate(range(lo, hi + 1)):
            name = names[i] if hi > lo and i < len(names) else names[0]
            out.append(CpuidBit(leaf, sub, m.group("reg").lower(), bit, name.split()[0] if name else "?"))
    return out


# --- XCR0 bits by name (SDM spelling), for reasons ---------------------------------------

XCR0_BIT_NAMES = {
    0: "x87", 1: "SSE", 2: "AVX", 3: "BNDREGS", 4: "BNDCSR", 5: "opmask", 6: "ZMM_Hi256",
    7: "Hi16_ZMM", 9: "PKRU", 17: "XTILECFG", 18: "XTILEDATA", 19: "APX",
}


def xcr0_bits_text(bits: int) -> str:
    """'bits 5-7 (opmask, ZMM_Hi256, Hi16_ZMM)' / 'bit 19 (APX)'."""
    numbers = [b for b in range(64) if bits >> b & 1]
    if not numbers:
        return "no bits"
    runs: list[tuple[int, int]] = []
    for b in numbers:
        if runs and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    names = ", ".join(XCR0_BIT_NAMES.get(b, f"bit{b}") for b in numbers)
    return f"{'bit' if len(numbers) == 1 else 'bits'} {spans} ({names})"
