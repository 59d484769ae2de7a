"""The QEMU boot image: guests/boot/multiboot.S + a bank payload -> a multiboot v1 kernel.

QEMU loads the image with ``-kernel`` (multiboot, flat image with the a.out kludge:
no ELF, no linker).  The stub switches to long mode, records CPUID leaf 0xD in
BOOTINFO, sets XCR0 with XSETBV and IRETQs to the payload at CPL3 with %rdi = the
mailbox -- the same payload bytes the KVM micro-VMM runs (docs/guests.md).

    stub = boot_stub()                        # assembled once, cached by source digest
    image = build_boot_image(payload_code)    # BootImage(path, digest, ...), cached by content
    mailbox_file(bank_bytes)                  # the 16 KiB mailbox QEMU preloads (-device loader)
    info = read_bootinfo(guest_memory_bytes)  # what the stub found: XCR0 set, CPUID 0xD
    info.layout()                             # the guest's XSAVE layout (apx_tests.xsave.Layout)

Every address is a ``.set`` constant in multiboot.S; this module reads them back from
the assembled object's symbol table (absolute symbols), so the .S file is the one
place the memory map is written down.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..xsave import Layout
from . import elf, protocol
from .build import (
    BOOT_STUB,
    GuestBuildError,
    _display,
    _write_atomically,
    assemble_object,
    assembler_version,
    cache_dir,
    find_llvm_mc,
    flat_code,
    guests_dir,
    prebuilt,
    source_digest,
)

BOOT_FORMAT = 1  # bump when the image format changes for the same inputs
BOOT_SOURCE = "multiboot.S"
DEFAULT_MAILBOX_GPA = 0x200000  # 2 MiB: above the image and its bss, below any RAM size we use

# Boot failures the stub reports through isa-debug-exit (multiboot.S BOOT_FAIL_*).
BOOT_FAILURES = {
    0x40: "CPUID.1:ECX[26] (XSAVE) is 0: the CPU model QEMU gives the guest has no XSAVE",
    0x41: "the requested XCR0 has bits CPUID.(EAX=0xD,ECX=0) does not offer",
}

# The symbols boot.py needs from the stub (all absolute .set constants).
_NEEDED = ("IMAGE_BASE", "PAYLOAD_ADDR", "PAYLOAD_MAX", "IMAGE_END", "BSS_END", "PARAMS_ADDR",
           "PARAM_MAGIC", "PARAM_MAILBOX", "PARAM_XCR0", "PARAMS_MAGIC", "BOOTINFO_ADDR", "BI_MAGIC",
           "BI_XCR0", "BI_CPUID1_ECX", "BI_FAIL", "BI_LEAF_D", "LEAF_D_COUNT", "BOOTINFO_MAGIC",
           "USTACK_TOP", "KSTACK_TOP")

_SHN_ABS = 0xFFF1
_SYMBOL = struct.Struct("<IBBHQQ")


def boot_source() -> Path:
    path = guests_dir() / "boot" / BOOT_SOURCE
    if not path.is_file():
        raise GuestBuildError(f"boot stub source missing: {_display(path)}")
    return path


def boot_cache_dir() -> Path:
    """Next to the payload cache: $XDG_CACHE_HOME/apx_tests/boot."""
    return cache_dir().parent / "boot"


@dataclass(frozen=True)
class BootStub:
    """The assembled stub: flat code (IMAGE_BASE..PAYLOAD_ADDR) and its constants."""

    code: bytes = field(repr=False)
    symbols: dict[str, int] = field(repr=False)
    digest: str

    def __getitem__(self, name: str) -> int:
        return self.symbols[name]


@dataclass(frozen=True)
class BootImage:
    """A ready-to-boot multiboot kernel file for one payload."""

    path: Path
    digest: str
    payload_sha256: str
    mailbox_gpa: int
    xcr0: int  # 0 = the stub picks (every user component CPUID offers, except AMX)
    stub: BootStub = field(repr=False)


@dataclass(frozen=True)
class BootInfo:
    """What the stub wrote to BOOTINFO before entering the payload."""

    valid: bool
    xcr0: int
    cpuid1_ecx: int
    fail: int
    leaf_d: dict[tuple[int, int], tuple[int, int, int, int]]

    def layout(self, source: str = "guest CPUID leaf 0xD (QEMU boot stub)") -> Layout:
        return Layout.from_table(self.leaf_d, source)

    @property
    def supported_xcr0(self) -> int:
        eax, _, _, edx = self.leaf_d.get((0xD, 0), (0, 0, 0, 0))
        return eax | edx << 32


def _absolute_symbols(obj: bytes) -> dict[str, int]:
    sections = elf.read_sections(obj)
    out: dict[str, int] = {}
    for index, section in enumerate(sections):
        if section.type != elf.SHT_SYMTAB:
            continue
        strtab = elf._linked_section(obj, index, sections)
        for offset in range(0, len(section.data), _SYMBOL.size):
            name_offset, _info, _other, shndx, value, _size = _SYMBOL.unpack_from(section.data, offset)
            if shndx == _SHN_ABS and name_offset:
                end = strtab.find(b"\0", name_offset)
                out[strtab[name_offset:end].decode("ascii", "replace")] = value
    return out


def _stub_digest(source: Path, llvm_mc: str) -> str:
    inputs = {
        "format": BOOT_FORMAT,
        "assembler": assembler_version(llvm_mc),
        "sources": source_digest(source),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _checked_stub(code: bytes, symbols: dict[str, int], source: Path, digest: str) -> BootStub:
    """A BootStub, after checking the constants boot.py needs and the stub's size."""
    missing = [n for n in _NEEDED if n not in symbols]
    if missing:
        raise GuestBuildError(f"{_display(source)}: boot stub lacks the constants {', '.join(missing)}")
    expected = symbols["PAYLOAD_ADDR"] - symbols["IMAGE_BASE"]
    if len(code) != expected:
        raise GuestBuildError(f"{_display(source)}: stub is {len(code)} bytes, must end exactly at "
                              f"PAYLOAD_ADDR (image offset {expected:#x}); check the .org directives")
    return BootStub(code, symbols, digest)


@functools.lru_cache(maxsize=8)
def _stub_for(digest: str, source: str, llvm_mc: str) -> BootStub:
    cached = boot_cache_dir() / f"stub-{digest}.json"
    try:
        record = json.loads(cached.read_text())
        return BootStub(bytes.fromhex(record["code"]), record["symbols"], digest)
    except (OSError, ValueError, KeyError):
        pass
    obj = assemble_object(Path(source), llvm_mc)
    stub = _checked_stub(flat_code(obj, Path(source)), _absolute_symbols(obj), Path(source), digest)
    try:
        _write_atomically(cached, json.dumps({"code": stub.code.hex(), "symbols": stub.symbols}).encode())
    except OSError:
        pass
    return stub


def boot_stub() -> BootStub:
    """The assembled stub, cached on disk by source digest (and in memory per process).

    Without a usable llvm-mc, an installed wheel's prebuilt stub serves if it was
    assembled from exactly the multiboot.S installed with it (build.prebuilt()).
    """
    source = boot_source()
    try:
        llvm_mc = find_llvm_mc(f"assemble {_display(source)}")
    except GuestBuildError as missing:
        code, entry = prebuilt(BOOT_STUB, "boot stub", source, missing)
        symbols = entry.get("symbols")
        if not isinstance(symbols, dict):
            raise GuestBuildError(f"{missing}; the prebuilt boot stub has no symbols in its manifest") from None
        return _checked_stub(code, symbols, source, entry["digest"])
    return _stub_for(_stub_digest(source, llvm_mc), str(source), llvm_mc)


def image_bytes(stub: BootStub, payload: bytes, *, mailbox_gpa: int = DEFAULT_MAILBOX_GPA,
                xcr0: int = 0) -> bytes:
    """The kernel file: stub, payload at PAYLOAD_ADDR padded to IMAGE_END, PARAMS patched."""
    if not payload:
        raise GuestBuildError("boot image: empty payload")
    if len(payload) > stub["PAYLOAD_MAX"]:
        raise GuestBuildError(f"boot image: payload is {len(payload)} bytes, the stub has room for "
                              f"{stub['PAYLOAD_MAX']}")
    if mailbox_gpa % 4096 or not stub["USTACK_TOP"] <= mailbox_gpa < 1 << 30:
        raise GuestBuildError(f"boot image: mailbox GPA {mailbox_gpa:#x} must be 4 KiB aligned, above "
                              f"the stub's bss ({stub['USTACK_TOP']:#x}) and inside the first GiB")
    image = bytearray(stub.code)
    image += payload
    image += bytes(stub["IMAGE_END"] - stub["IMAGE_BASE"] - len(image))
    params = stub["PARAMS_ADDR"] - stub["IMAGE_BASE"]
    magic = struct.unpack_from("<I", image, params + stub["PARAM_MAGIC"])[0]
    if magic != stub["PARAMS_MAGIC"]:
        raise GuestBuildError(f"boot image: no PARAMS block at image offset {params:#x}")
    struct.pack_into("<Q", image, params + stub["PARAM_MAILBOX"], mailbox_gpa)
    struct.pack_into("<Q", image, params + stub["PARAM_XCR0"], xcr0)
    return bytes(image)


def build_boot_image(payload: bytes, *, mailbox_gpa: int = DEFAULT_MAILBOX_GPA, xcr0: int = 0) -> BootImage:
    """The multiboot kernel for `payload`, cached by content hash in boot_cache_dir()."""
    stub = boot_stub()
    payload = bytes(payload)
    payload_sha = hashlib.sha256(payload).hexdigest()
    key = json.dumps({"format": BOOT_FORMAT, "stub": stub.digest, "payload": payload_sha,
                      "mailbox": mailbox_gpa, "xcr0": xcr0}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = boot_cache_dir() / f"image-{digest}.bin"
    if not path.is_file():
        data = image_bytes(stub, payload, mailbox_gpa=mailbox_gpa, xcr0=xcr0)
        try:
            _write_atomically(path, data)
        except OSError as exc:
            raise GuestBuildError(f"cannot write the boot image to {path}: {exc.strerror or exc}") from None
    return BootImage(path, digest, payload_sha, mailbox_gpa, xcr0, stub)


def mailbox_bytes(bank_bytes: int) -> bytes:
    """The 16 KiB mailbox QEMU preloads: header with go = GO_HOLD (the guest waits at
    stage 0 until the host releases it), areas zero."""
    return protocol.pack_mailbox_header(bank_bytes=bank_bytes).ljust(protocol.MAILBOX_SIZE, b"\0")


def mailbox_file(bank_bytes: int) -> Path:
    """mailbox_bytes(bank_bytes) as a cached file (for -device loader,file=...)."""
    data = mailbox_bytes(bank_bytes)
    path = boot_cache_dir() / f"mailbox-{hashlib.sha256(data).hexdigest()[:32]}.bin"
    if not path.is_file():
        try:
            _write_atomically(path, data)
        except OSError as exc:
            raise GuestBuildError(f"cannot write the mailbox image to {path}: {exc.strerror or exc}") from None
    return path


def read_bootinfo(stub: BootStub, data: bytes) -> BootInfo:
    """Decode BOOTINFO from `data` (the guest's bytes at stub['BOOTINFO_ADDR'])."""
    magic = struct.unpack_from("<I", data, stub["BI_MAGIC"])[0]
    xcr0 = struct.unpack_from("<Q", data, stub["BI_XCR0"])[0]
    cpuid1_ecx = struct.unpack_from("<I", data, stub["BI_CPUID1_ECX"])[0]
    fail = struct.unpack_from("<I", data, stub["BI_FAIL"])[0]
    base = stub["BI_LEAF_D"]
    leaf_d = {}
    for i in range(stub["LEAF_D_COUNT"]):
        regs = struct.unpack_from("<4I", data, base + 16 * i)
        if i < 2 or any(regs):
            leaf_d[(0xD, i)] = regs
    return BootInfo(magic == stub["BOOTINFO_MAGIC"], xcr0, cpuid1_ecx, fail, leaf_d)


def bootinfo_size(stub: BootStub) -> int:
    return stub["BI_LEAF_D"] + 16 * stub["LEAF_D_COUNT"]


def describe_boot_failure(status: int) -> str | None:
    """The stub's failure for an isa-debug-exit status, or None if it is not one."""
    return BOOT_FAILURES.get(status)


def _stub_for_prebuilt():
    stub = boot_stub()
    return stub.code, boot_source(), stub.digest, {"symbols": stub.symbols}


# The boot stub as an extra item of build.write_prebuilt (a wheel ships it beside the payloads).
PREBUILT_STUB = (BOOT_STUB, _stub_for_prebuilt)
