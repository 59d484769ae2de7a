"""Linux guests: a real kernel, a generated initramfs, a user program holding the registers.

- Kernel: ``find_kernel()`` - an explicit path ($APX_KERNEL / ``--apx-kernel``) or the
  Debian cloud kernel cached under ``$XDG_CACHE_HOME/apx_tests/kernel/``, fetched with
  ``apt-get download`` when the cache is empty (``fetch_kernel()``).
- Programs: ``build_init()`` (guests/linux/init.c) and ``build_holder()``
  (guests/linux/holder.c + each bank's guests/payload/<bank>.S assembled around
  guests/linux/hold.S), static, cached under ``$XDG_CACHE_HOME/apx_tests/linux/``.
  The register patterns are generated from ``apx_tests.xsave`` at build time.
- ``build_initramfs()``: a newc cpio archive written in pure Python.
- ``linux_guest()`` -> ``LinuxGuest``: the paths and QEMU arguments (``-kernel``,
  ``-initrd``, ``-append``); ``parse_console()`` reads the serial log (ready lines,
  KTAP results).

Backend-neutral: nothing here starts QEMU.  See docs/linux-guests.md.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Union

from ..xsave.banks import BANKS
from .build import (
    GuestBuildError,
    _display,
    _first_error,
    _write_atomically,
    assembler_version,
    available_banks,
    find_llvm_mc,
    guests_dir,
    payload_source,
)

# --- constants shared with guests/linux/*.c ----------------------------------

HOLDER = "apx-holder"  # /bin/apx-holder in the initramfs
STAGES = 5  # holder_banks.h carries the patterns of stages 0..4 (init.c: MAX_STAGE 4)
DEFAULT_RUN = ("xmm", "ymm", "x87", "ctx-ymm")  # init.c: DEFAULT_RUN
RELEASE_LINE = "apx-release"  # init.c: sent on the console, ends the spin (apx.release=console)
DONE_PREFIX = "# apx-init: done"  # the last line /init prints before powering off
EXIT_STATUS_PASS, EXIT_STATUS_FAIL = 1, 2  # apx.exit=PORT values (QEMU exits 3 / 5)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
KERNEL_ENV = "APX_KERNEL"
CC_ENV = "APX_CC"
CACHE_FORMAT = 1  # bump when the builders' output changes for the same inputs
TOOL_TIMEOUT = 120
CFLAGS = ("-static", "-O2", "-Wall", "-s")

# What QEMU needs around the kernel; measured choices, see docs/linux-guests.md.
MACHINE_ARGS = ("-machine", "microvm", "-bios", "qboot.rom")  # qboot boots a bzImage directly
MEMORY = "256M"

READY_RE = re.compile(r"apx-holder: ready bank=(?P<bank>\w+) pid=(?P<pid>\d+)(?P<rest>[^\r\n]*)")
_KTAP_RESULT = re.compile(r"^(?P<not>not )?ok (?P<number>\d+) (?P<name>\S+)(?: # (?P<directive>.*))?$")
_KTAP_PLAN = re.compile(r"^1\.\.(\d+)$")
_STARTED = re.compile(r"^# apx-init: started uptime=(?P<uptime>[\d.]+)")
_KERNEL_NAME = re.compile(r"^vmlinuz-(?P<version>.+)$")


class KernelUnavailable(RuntimeError):
    """No Linux kernel to boot; the message is one line saying why and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


# --- the kernel ----------------------------------------------------------------


def _cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apx_tests"


def kernel_cache_dir() -> Path:
    """$XDG_CACHE_HOME/apx_tests/kernel, or ~/.cache/apx_tests/kernel."""
    return _cache_base() / "kernel"


def _version_key(path: Path) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path.name)]


def cached_kernels() -> list[Path]:
    """Kernels in the cache, newest version last."""
    d = kernel_cache_dir()
    try:
        found = [p for p in d.iterdir()
                 if _KERNEL_NAME.match(p.name) and not p.name.endswith(".tmp") and p.is_file()]
    except OSError:
        return []
    return sorted(found, key=_version_key)


def check_kernel_image(path: Path) -> Path:
    """`path` if it looks like something QEMU's -kernel boots (bzImage or ELF), else raise."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as exc:
        raise KernelUnavailable(f"kernel {path}: {exc.strerror or exc}") from None
    if head[0x202:0x206] != b"HdrS" and head[:4] != b"\x7fELF":
        raise KernelUnavailable(f"kernel {path} is neither a bzImage nor an ELF vmlinux")
    return path


def find_kernel(explicit: str | os.PathLike | None = None, *, fetch: bool = True) -> Path:
    """The kernel to boot.

    `explicit` (the --apx-kernel option), else $APX_KERNEL, else the newest kernel in
    the cache, else (when `fetch`) the current Debian cloud kernel fetched into the cache.
    """
    for value, source in ((explicit, "--apx-kernel"), (os.environ.get(KERNEL_ENV), f"${KERNEL_ENV}")):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise KernelUnavailable(f"kernel {path} (from {source}) is not a file")
            return check_kernel_image(path)
    cached = cached_kernels()
    if cached:
        return cached[-1]
    if not fetch:
        raise KernelUnavailable(f"no Linux guest kernel: none cached in {kernel_cache_dir()} "
                                f"(run ci/bootstrap, or set {KERNEL_ENV} / --apx-kernel)")
    return fetch_kernel()


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, timeout=kw.pop("timeout", TOOL_TIMEOUT), **kw)
    except FileNotFoundError:
        raise KernelUnavailable(f"{what}: {argv[0]} not found (not a Debian system? set {KERNEL_ENV} "
                                "or --apx-kernel to a bzImage)") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"{what}: {argv[0]} failed: {exc}") from None


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1].strip()


def kernel_package() -> str:
    """The binary package linux-image-cloud-amd64 depends on now (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    what = f"cannot resolve {KERNEL_META_PACKAGE}"
    result = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], what)
    match = re.search(rb"Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not match:
        detail = _last_line(result.stderr + result.stdout) if result.returncode else "no linux-image dependency listed"
        raise KernelUnavailable(f"{what} with apt-cache: {detail}")
    return match.group(1).decode()


def fetch_kernel(package: str | None = None) -> Path:
    """Download `package` (default: kernel_package()) with apt-get into a temporary
    directory and copy its boot/vmlinuz-* (and boot/config-*) into the cache."""
    package = package or kernel_package()
    dest = kernel_cache_dir()
    with tempfile.TemporaryDirectory(prefix="apx-kernel-") as tmp:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:  # root: apt's _apt sandbox user cannot write a 0700 temp dir
            argv += ["-o", "APT::Sandbox::User=root"]
        result = _run(argv + [package], f"cannot download {package}", cwd=tmp, timeout=600)
        debs = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise KernelUnavailable(f"cannot download {package} with apt-get: "
                                    f"{_last_line(result.stderr + result.stdout)}")
        return extract_kernel(debs[0], dest)


def extract_kernel(deb: Path, dest: Path) -> Path:
    """Copy boot/vmlinuz-* and boot/config-* from a kernel .deb into `dest`.

    Reads dpkg-deb's data tarball as a stream and stops after boot/ (which comes
    first in Debian kernel packages), so the modules are never unpacked.
    """
    kernel = None
    with tempfile.TemporaryFile() as errors:
        try:
            # Its own process group: dpkg-deb forks a decompressor, and both must go
            # when we stop reading early.
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                    stderr=errors, start_new_session=True)
        except OSError as exc:
            raise KernelUnavailable(f"cannot unpack {deb.name}: dpkg-deb: {exc.strerror or exc}") from None
        failure = None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if not name.startswith("boot/"):
                        if kernel is not None and name.split("/")[0] not in ("", "boot"):
                            break  # boot/ is done
                        continue
                    base = name[len("boot/"):]
                    if member.isfile() and (base.startswith("vmlinuz-") or base.startswith("config-")):
                        _write_atomically(dest / base, tar.extractfile(member).read())
                        (dest / base).chmod(0o644)
                        if base.startswith("vmlinuz-"):
                            kernel = dest / base
        except (tarfile.TarError, OSError) as exc:
            failure = str(exc)
        finally:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
            proc.stdout.close()
            proc.wait()
        errors.seek(0)
        stderr = errors.read()
    if kernel is None:
        detail = _last_line(stderr) if stderr.strip() else (failure or "no boot/vmlinuz-* in it")
        raise KernelUnavailable(f"cannot unpack {deb.name}: {detail}")
    return check_kernel_image(kernel)


# Compressed-kernel magics in a bzImage payload (arch/x86/boot/compressed).
_PAYLOAD_FORMATS = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x02\x21\x4c\x18", "lz4"),
                    (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"))
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point note
_SHT_NOTE = 7


def has_pvh_entry(elf_image: bytes) -> bool:
    """Whether an ELF vmlinux carries a PVH entry (Xen note XEN_ELFNOTE_PHYS32_ENTRY)."""
    from .elf import ElfError, read_sections

    try:
        sections = read_sections(elf_image)
    except ElfError:
        return False
    for section in sections:
        if section.type != _SHT_NOTE:
            continue
        data, pos = section.data, 0
        while pos + 12 <= len(data):
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3 & ~3) + (descsz + 3 & ~3)
    return False


def _decompress(payload: bytes, kind: str) -> bytes | None:
    """The kernel image in a bzImage payload; None when this host cannot unpack `kind`.
    The kernel build appends the uncompressed size (4 bytes) after the stream."""
    import bz2
    import lzma
    import zlib

    body = payload[:-4]
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
        tool = shutil.which(kind)  # lz4, zstd: Debian packages lz4 / zstd
        if tool is None:
            return None
        result = subprocess.run([tool, "-d", "-c", "-q"], input=body, capture_output=True, timeout=TOOL_TIMEOUT)
        return result.stdout if result.returncode == 0 else None
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error, subprocess.SubprocessError):
        return None


def _unpack_bzimage(data: bytes) -> bytes | None:
    """The uncompressed kernel inside a bzImage (its payload, boot protocol 2.08+), or None."""
    if data[0x202:0x206] != b"HdrS" or len(data) < 0x250:
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    kind = next((name for magic, name in _PAYLOAD_FORMATS if payload.startswith(magic)), None)
    return _decompress(payload, kind) if kind else None


def kernel_release(kernel: str | os.PathLike) -> str:
    """The release `kernel` was built as (its guest's `uname -r`): the first word of a
    bzImage's header version string (boot protocol: kernel_version at 0x20E, +0x200), else
    what its name says after vmlinuz-, else its name."""
    path = Path(kernel)
    try:
        with open(path, "rb") as f:
            head = f.read(0x8000)
    except OSError:
        head = b""
    if head[0x202:0x206] == b"HdrS" and len(head) >= 0x210:
        pointer = struct.unpack_from("<H", head, 0x20E)[0]
        words = head[pointer + 0x200:pointer + 0x300].split(b"\0")[0].split() if pointer else []
        if words:
            return words[0].decode(errors="replace")
    match = _KERNEL_NAME.match(path.name)
    return match.group("version") if match else path.name


# The name Linux gives XSAVE component 19 in xfeature_names[] (arch/x86/kernel/fpu/xstate.c)
# once it supports APX state; a kernel without it never sets XCR0[19].
APX_XSTATE_NAME = b"APX registers\0"


def kernel_knows_apx(kernel: str | os.PathLike) -> bool | None:
    """Whether `kernel` supports APX state (names XSAVE component 19), read from the image
    itself; None when it cannot be read or unpacked here."""
    path = Path(kernel)
    try:
        st = path.stat()
    except OSError:
        return None
    return _knows_apx(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _knows_apx(path: str, _mtime_ns: int, _size: int) -> bool | None:
    elf = pvh_kernel(path)  # the unpacked image boots use, cached: usually no second unpack
    try:
        data = Path(elf or path).read_bytes()
    except OSError:
        return None
    image = data if data[:4] == b"\x7fELF" else _unpack_bzimage(data)
    return None if not image else APX_XSTATE_NAME in image


def pvh_kernel(kernel: str | os.PathLike) -> Path | None:
    """An ELF vmlinux with a PVH entry for `kernel`, or None.

    QEMU boots such an ELF directly (PVH), skipping the bzImage's own decompression:
    about 0.5 s less per boot under TCG here. An ELF `kernel` is returned as is when it
    has the entry; a bzImage is unpacked once (gzip/xz/lzma/bzip2 in Python, lz4 and
    zstd with their command-line tools) and cached as $XDG_CACHE_HOME/apx_tests/linux/
    vmlinux-<sha256 of the bzImage>. None when it cannot be had: use the bzImage.
    """
    kernel = Path(kernel)
    try:
        data = kernel.read_bytes()
    except OSError:
        return None
    if data[:4] == b"\x7fELF":
        return kernel if has_pvh_entry(data) else None
    if data[0x202:0x206] != b"HdrS" or len(data) < 0x250:
        return None
    target = build_cache_dir() / f"vmlinux-{hashlib.sha256(data).hexdigest()[:32]}"
    if target.is_file() and target.stat().st_size:
        return target
    image = _unpack_bzimage(data)
    if not image or not has_pvh_entry(image):
        return None
    try:
        _write_atomically(target, image)
    except OSError:
        return None
    return target


# --- building the programs -----------------------------------------------------


def linux_dir() -> Path:
    return guests_dir() / "linux"


def build_cache_dir() -> Path:
    """$XDG_CACHE_HOME/apx_tests/linux, or ~/.cache/apx_tests/linux."""
    return _cache_base() / "linux"


def find_cc() -> str:
    """$APX_CC or gcc; it must link static glibc programs (Debian: gcc, libc6-dev)."""
    name = os.environ.get(CC_ENV) or "gcc"
    path = shutil.which(name)
    if path is None:
        source = f"{CC_ENV}={name}" if os.environ.get(CC_ENV) else "gcc"
        raise GuestBuildError(f"{source} not found (install gcc and libc6-dev); needed to build the Linux guest programs")
    return path


def _cc_version(cc: str) -> str:
    try:
        st = os.stat(cc)
    except OSError:
        return "unknown"
    return _cc_version_of(cc, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _cc_version_of(cc: str, _mtime_ns: int, _size: int) -> str:
    """First line of `cc --version`, memoised per binary identity."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def _cc_error(stderr: str, cc: str) -> str:
    lines = stderr.splitlines()
    for line in lines:
        if "cannot find -lc" in line or "cannot find -lm" in line:
            return f"{cc} cannot link statically: {line.strip()} (install libc6-dev)"
    for line in lines:
        if ": error:" in line or ": fatal error:" in line or "undefined reference" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no diagnostics"


def _compile(cc: str, sources: list[Path], out: Path, include: Path | None = None) -> None:
    argv = [cc, *CFLAGS, "-o", str(out)]
    if include is not None:
        argv += ["-I", str(include)]
    argv += [str(s) for s in sources]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot run {cc}: {exc}") from None
    if result.returncode != 0 or not out.is_file():
        raise GuestBuildError(_cc_error(result.stderr, Path(cc).name))


def _digest(kind: str, **inputs) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "kind": kind, **inputs}, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> list:
    return [_display(path), hashlib.sha256(path.read_bytes()).hexdigest()]


def _write_executable(path: Path, data: bytes) -> None:
    _write_atomically(path, data, mode=0o755)


def _cached_build(name: str, digest: str, build) -> Path:
    """The cached output `name-digest`, building it with build(out_path) if missing."""
    target = build_cache_dir() / f"{name}-{digest[:32]}"
    if target.is_file() and target.stat().st_size:
        return target
    with tempfile.TemporaryDirectory(prefix="apx-linux-build-") as tmp:
        out = Path(tmp) / name
        build(Path(tmp), out)
        data = out.read_bytes()
    try:
        _write_executable(target, data)
        return target
    except OSError:  # an unwritable cache only costs time: keep a private copy
        fallback = Path(tempfile.mkdtemp(prefix="apx-linux-")) / name
        fallback.write_bytes(data)
        fallback.chmod(0o755)
        return fallback


def build_init() -> Path:
    """Static /init from guests/linux/init.c (cached)."""
    source = linux_dir() / "init.c"
    if not source.is_file():
        raise GuestBuildError(f"Linux guest source missing: {_display(source)}")
    cc = find_cc()
    digest = _digest("init", cc=_cc_version(cc), flags=list(CFLAGS), sources=[_file_digest(source)])
    return _cached_build("init", digest, lambda tmp, out: _compile(cc, [source], out))


def holder_banks() -> list[str]:
    """Banks the holder carries: those with a payload source and an XSAVE model entry."""
    have = set(available_banks())
    return [name for name in BANKS if name in have]


def _c_string(text: str) -> str:
    return json.dumps(text)  # ASCII JSON strings are valid C string literals


def _c_bytes(data: bytes, indent: str = "    ") -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    return ",\n".join(indent + row for row in rows)


def holder_header(banks: Iterable[str], wrong_expect: tuple[str, int] | None = None) -> str:
    """C source of holder_banks.h: per bank its registers, XCR0 and CPUID needs, and
    ``bank.pattern(stage)`` for stages 0..STAGES-1 packed in bank order.

    `wrong_expect` = (register, byte): the expected tables of that register's bank get
    that byte inverted (a holder that must report a mismatch, for negative tests).
    """
    from ..probe import parse_cpuid_requirement  # probe imports nothing from guests

    banks = list(banks)
    wrong_bank = None
    if wrong_expect is not None:
        reg_name, byte = wrong_expect
        owners = [b for b in banks if reg_name in BANKS[b].names]
        if not owners:
            raise GuestBuildError(f"wrong_expect: no register {reg_name!r} in the holder's banks ({', '.join(banks)})")
        wrong_bank = owners[0]
        width = BANKS[wrong_bank].register(reg_name).width
        if not 0 <= byte < width:
            raise GuestBuildError(f"wrong_expect: {reg_name} has bytes 0..{width - 1}, not {byte}")
    out = ["/* holder_banks.h - generated by apx_tests.guests.linux from apx_tests.xsave; do not edit. */",
           f"#define APX_STAGES {STAGES}", ""]
    entries = []
    for name in banks:
        bank = BANKS[name]
        widths = {r.width for r in bank.registers}
        if len(widths) != 1:
            raise GuestBuildError(f"bank {name}: registers of different widths cannot be held")
        width = widths.pop()
        regs = ", ".join(_c_string(r) for r in bank.names)
        needs = parse_cpuid_requirement(bank.cpuid_requirement)
        reg_index = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}
        need_rows = [f"    {{{n.leaf:#x}, {n.subleaf}, {reg_index[n.register]}, {n.bit}, {_c_string(n.describe(0))}}},"
                     for n in needs]
        load = b"".join(bank.pack(bank.pattern(stage)) for stage in range(STAGES))
        out += [f"extern void apx_hold_{name}(void *block);",
                f"extern const char apx_hold_{name}_spin_start[], apx_hold_{name}_spin_end[];",
                f"static const char *const apx_regs_{name}[] = {{{regs}}};",
                f"static const struct apx_cpuid_need apx_needs_{name}[] = {{",
                *(need_rows or ["    {0, 0, 0, 0, 0},"]), "};",
                f"static const uint8_t apx_load_{name}[{len(load)}] = {{", _c_bytes(load), "};"]
        expect_sym = f"apx_load_{name}"
        if name == wrong_bank:
            offset = bank.names.index(wrong_expect[0]) * width + wrong_expect[1]
            expect = bytearray(load)
            for stage in range(STAGES):
                expect[stage * bank.size + offset] ^= 0xFF
            out += [f"/* deliberately wrong: {wrong_expect[0]} byte {wrong_expect[1]} inverted in every stage */",
                    f"static const uint8_t apx_expect_{name}[{len(expect)}] = {{", _c_bytes(bytes(expect)), "};"]
            expect_sym = f"apx_expect_{name}"
        out.append("")
        entries.append(f"    {{{_c_string(name)}, {len(bank.registers)}, {width}, {bank.size}, {bank.xcr0_mask:#x}ULL, "
                       f"apx_regs_{name}, apx_needs_{name}, {len(needs)}, apx_load_{name}, {expect_sym}, "
                       f"apx_hold_{name}, apx_hold_{name}_spin_start, apx_hold_{name}_spin_end}},")
    out += ["static const struct apx_bank_desc apx_banks[] = {", *entries, "};",
            f"static const unsigned apx_nbanks = {len(entries)};", ""]
    return "\n".join(out)


def _hold_common(name: str) -> str:
    """The `common.S` a bank file includes when built for the holder (see hold.S)."""
    template = (linux_dir() / "hold.S").read_text()
    return f"{template}\n    .macro PAYLOAD\n    HOLD_FUNCTION apx_hold_{name}\n    .endm\n"


def _assemble_hold(llvm_mc: str, bank: str, workdir: Path) -> Path:
    """guests/payload/<bank>.S with hold.S as its common.S -> workdir/hold_<bank>.o"""
    bank_dir = workdir / f"hold-{bank}"
    bank_dir.mkdir()
    (bank_dir / "common.S").write_text(_hold_common(bank))
    obj = workdir / f"hold_{bank}.o"
    source = payload_source(bank).resolve()
    argv = [llvm_mc, "--triple=x86_64", "-filetype=obj", "-o", str(obj), str(source)]
    try:
        result = subprocess.run(argv, capture_output=True, cwd=bank_dir, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot run {llvm_mc}: {exc}") from None
    if result.returncode != 0 or not obj.is_file():
        # The generated common.S is hold.S line for line (plus the PAYLOAD macro at the end).
        stderr = result.stderr.decode(errors="replace").replace(str(bank_dir / "common.S"), "common.S")
        stderr = re.sub(r"^common\.S:", f"{linux_dir() / 'hold.S'}:", stderr, flags=re.M)
        raise GuestBuildError(_first_error(stderr, source))
    return obj


def build_holder(banks: Iterable[str] | None = None, *, wrong_expect: tuple[str, int] | None = None) -> Path:
    """Static /bin/apx-holder carrying `banks` (default: all holder_banks()), cached.

    `wrong_expect` = (register, byte) builds a holder whose expected table is wrong in
    that byte: it loads the right values and must report `not ok` naming the register.
    """
    banks = list(banks) if banks is not None else holder_banks()
    unknown = [b for b in banks if b not in BANKS]
    if unknown:
        raise GuestBuildError(f"no bank {', '.join(unknown)} (have {', '.join(BANKS)})")
    sources = [linux_dir() / "holder.c", linux_dir() / "hold.S"]
    for path in sources:
        if not path.is_file():
            raise GuestBuildError(f"Linux guest source missing: {_display(path)}")
    bank_sources = [payload_source(b) for b in banks]
    header = holder_header(banks, wrong_expect)
    cc = find_cc()
    llvm_mc = find_llvm_mc("assemble the Linux register holder (guests/linux/hold.S)")
    digest = _digest("holder", cc=_cc_version(cc), assembler=assembler_version(llvm_mc), flags=list(CFLAGS),
                     banks=banks, header=hashlib.sha256(header.encode()).hexdigest(),
                     sources=[_file_digest(p) for p in sources + bank_sources])

    def build(tmp: Path, out: Path) -> None:
        (tmp / "holder_banks.h").write_text(header)
        objects = [_assemble_hold(llvm_mc, b, tmp) for b in banks]
        _compile(cc, [linux_dir() / "holder.c", *objects], out, include=tmp)

    name = HOLDER if wrong_expect is None else f"{HOLDER}-wrong"
    return _cached_build(name, digest, build)


# --- the initramfs -------------------------------------------------------------


@dataclass(frozen=True)
class Directory:
    mode: int = 0o755


@dataclass(frozen=True)
class CharDevice:
    major: int
    minor: int
    mode: int = 0o600


@dataclass(frozen=True)
class File:
    data: bytes = field(repr=False)
    mode: int = 0o644


Entry = Union[bytes, os.PathLike, str, File, Directory, CharDevice]

_NEWC_MAGIC = b"070701"
_S_IFDIR, _S_IFREG, _S_IFCHR = 0o040000, 0o100000, 0o020000
# What every guest initramfs has, whatever the caller adds.
BASE_ENTRIES: dict[str, Entry] = {
    "dev": Directory(), "dev/console": CharDevice(5, 1), "proc": Directory(0o555),
    "sys": Directory(0o555), "run": Directory(), "bin": Directory(), "root": Directory(0o700),
}


def _newc(name: str, mode: int, data: bytes, ino: int, nlink: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out = bytearray(_NEWC_MAGIC + b"".join(b"%08X" % v for v in fields) + encoded)
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _normalise(path: str) -> str:
    parts = [p for p in str(path).split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"initramfs path {path!r}: must name something below / without '..'")
    return "/".join(parts)


def _as_entry(value: Entry, where: str) -> File | Directory | CharDevice:
    if isinstance(value, (File, Directory, CharDevice)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return File(bytes(value))
    path = Path(value)
    try:
        return File(path.read_bytes(), path.stat().st_mode & 0o777)
    except OSError as exc:
        raise GuestBuildError(f"initramfs {where}: cannot read {path}: {exc.strerror or exc}") from None


def build_initramfs(files: Mapping[str, Entry], out: str | os.PathLike, *, compress: bool = False) -> Path:
    """Write a newc cpio archive holding `files` (and BASE_ENTRIES) to `out`.

    Keys are paths inside the archive (leading / optional); values are bytes (mode
    0644), a Path (its bytes and permission bits), or File/Directory/CharDevice.
    Missing parent directories are added (0755). Output is reproducible: entries
    sorted, owner root, mtime 0. `compress`: gzip it (the kernel takes both).
    """
    entries: dict[str, File | Directory | CharDevice] = {}
    for where, value in {**BASE_ENTRIES, **dict(files)}.items():
        name = _normalise(where)
        entries[name] = _as_entry(value, name)
    for name in list(entries):
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entry = entries.setdefault(parent, Directory())
            if not isinstance(entry, Directory):
                raise ValueError(f"initramfs path {name!r}: {parent!r} is not a directory")
    archive = bytearray()
    for ino, name in enumerate(sorted(entries), start=1):  # sorted: parents before children
        e = entries[name]
        if isinstance(e, Directory):
            archive += _newc(name, _S_IFDIR | e.mode, b"", ino, 2)
        elif isinstance(e, CharDevice):
            archive += _newc(name, _S_IFCHR | e.mode, b"", ino, 1, (e.major, e.minor))
        else:
            archive += _newc(name, _S_IFREG | e.mode, e.data, ino, 1)
    archive += _newc("TRAILER!!!", 0, b"", 0, 1)
    data = gzip.compress(bytes(archive), compresslevel=6, mtime=0) if compress else bytes(archive)
    out = Path(out)
    _write_atomically(out, data)
    return out


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = field(repr=False)
    rdev: tuple[int, int] = (0, 0)


def read_initramfs(data: bytes) -> dict[str, CpioEntry]:
    """Parse a newc archive (gzip or plain) back into entries (for tests and debugging)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    out: dict[str, CpioEntry] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != _NEWC_MAGIC:
            raise ValueError(f"not a newc cpio header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = CpioEntry(name, fields[1], bytes(body), (fields[9], fields[10]))


def guest_files(*, extra_holders: Mapping[str, os.PathLike] | None = None,
                banks: Iterable[str] | None = None) -> dict[str, Entry]:
    """The standard guest: /init and /bin/apx-holder, plus `extra_holders`
    ({program name: built binary}, run with apx.run items BANK@PROGRAM)."""
    programs = {"init": build_init(), f"bin/{HOLDER}": build_holder(banks)}
    for name, path in (extra_holders or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"holder program name {name!r}: use letters, digits, '_', '.', '-'")
        programs[f"bin/{name}"] = Path(path)
    # Mode 0755 whatever the cached file's mode: the kernel runs /init only if executable.
    return {where: File(_as_entry(path, where).data, 0o755) for where, path in programs.items()}


# --- the command line and what QEMU gets ----------------------------------------


_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl $32,%rdx; or %rdx,%rax; ret


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz (TCG guests read the host TSC), measured against
    CLOCK_MONOTONIC over 20 ms; /proc/cpuinfo's "cpu MHz" if it cannot be measured;
    None when neither works."""
    try:
        import ctypes
        import ctypes.util
        import mmap

        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_RDTSC_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        t0, c0 = time.monotonic_ns(), rdtsc()
        while time.monotonic_ns() - t0 < 20_000_000:
            pass
        t1, c1 = time.monotonic_ns(), rdtsc()
        khz = (c1 - c0) * 1_000_000 // (t1 - t0)
        if khz > 0:
            return int(khz)
    except Exception:  # no W+X mapping (hardened hosts), not x86: fall back
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(run: Iterable[str] = DEFAULT_RUN, *, load: int = 1, expect: int | None = None,
                   spin_ms: int | None = None, release: str = "deadline", cpu: int | None = None,
                   exit_port: int | None = None, timeout_ms: int | None = None, accel: str = "tcg",
                   tsc_khz: int | None = None, extra: Iterable[str] = ()) -> str:
    """The -append string: serial console, quiet, and the apx.* settings /init reads.

    Under TCG it adds tsc_early_khz= (the host's TSC rate): without it the kernel's
    PIT calibration of the TSC fails now and then on a loaded host and the boot hangs.
    """
    items = list(run)
    for item in items:
        if not re.fullmatch(r"(ctx-)?\w+(@[A-Za-z0-9_.-]+)?", item):
            raise ValueError(f"apx.run item {item!r}: want [ctx-]BANK[@PROGRAM]")
    for what, stage in (("load", load), ("expect", expect)):
        if stage is not None and not 0 <= stage < STAGES:
            raise ValueError(f"{what} stage {stage}: the holder has stages 0..{STAGES - 1}")
    if release not in ("deadline", "console"):
        raise ValueError(f"release {release!r}: 'deadline' or 'console'")
    words = ["console=ttyS0", "quiet", "panic=-1"]
    if accel == "tcg":
        khz = tsc_khz or host_tsc_khz()
        if khz:
            words.append(f"tsc_early_khz={khz}")
    words.append(f"apx.run={','.join(items)}")
    words.append(f"apx.load={load}")
    for key, value in (("expect", expect), ("spin_ms", spin_ms), ("cpu", cpu), ("timeout_ms", timeout_ms)):
        if value is not None:
            words.append(f"apx.{key}={value}")
    if release == "console":
        words.append("apx.release=console")
    if exit_port is not None:
        words.append(f"apx.exit={exit_port:#x}")
    words += list(extra)
    return " ".join(words)


@dataclass(frozen=True)
class LinuxGuest:
    """A bootable guest: what to hand QEMU. Nothing here runs QEMU."""

    kernel: Path
    initramfs: Path
    cmdline: str

    def boot_args(self) -> list[str]:
        """-kernel, -initrd, -append."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", self.cmdline]

    def qemu_args(self, accel: str = "tcg", *, machine: Iterable[str] = MACHINE_ARGS, smp: int = 1) -> list[str]:
        """Everything but the console and monitor: machine, CPU, memory, no devices, boot.

        Add e.g. ``-serial file:LOG`` (or ``-serial stdio`` / a socket chardev when the
        console must take input) and ``-qmp ...``."""
        cpu = "max" if accel == "tcg" else "host"
        return [*machine, "-accel", accel, "-cpu", cpu, "-m", MEMORY, "-smp", str(smp),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", *self.boot_args()]


def linux_guest(workdir: str | os.PathLike, run: Iterable[str] = DEFAULT_RUN, *,
                kernel: str | os.PathLike | None = None, pvh: bool = True, compress: bool = False,
                extra_holders: Mapping[str, os.PathLike] | None = None, **cmdline) -> LinuxGuest:
    """Build (or reuse cached) programs, write `workdir`/initramfs.cpio, find the kernel.

    `kernel` as for find_kernel(); with `pvh` its PVH vmlinux when one can be had
    (pvh_kernel()), else the bzImage. `cmdline` keywords go to kernel_cmdline()."""
    kernel_path = find_kernel(kernel)
    if pvh:
        kernel_path = pvh_kernel(kernel_path) or kernel_path
    out = Path(workdir) / ("initramfs.cpio.gz" if compress else "initramfs.cpio")
    build_initramfs(guest_files(extra_holders=extra_holders), out, compress=compress)
    return LinuxGuest(kernel_path, out, kernel_cmdline(run, **cmdline))


# --- reading the console ---------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """`apx-holder: ready bank=B pid=N key=value...`: the bank is loaded and spinning."""

    bank: str
    pid: int
    fields: dict[str, str]
    line: int  # index in the console's lines

    @property
    def spin_range(self) -> tuple[int, int] | None:
        """[start, end) of the holder's spin loop: a vCPU at CPL3 with RIP in it runs the
        holder with its bank in the registers."""
        start, sep, end = self.fields.get("spin", "").partition("-")
        try:
            return (int(start, 16), int(end, 16)) if sep else None
        except ValueError:
            return None


@dataclass(frozen=True)
class KtapResult:
    number: int
    ok: bool
    name: str
    directive: str  # text after " # ": "SKIP reason" or a failure reason, or ""

    @property
    def skipped(self) -> bool:
        return self.ok and self.directive.upper().startswith("SKIP")

    @property
    def reason(self) -> str:
        return self.directive[4:].strip() if self.skipped else self.directive


@dataclass
class ConsoleReport:
    ktap_version: int | None = None
    plan: int | None = None
    results: list[KtapResult] = field(default_factory=list)
    ready: list[Ready] = field(default_factory=list)
    started_uptime: float | None = None  # guest seconds since boot when /init started
    done: bool = False  # /init printed its last line
    lines: list[str] = field(default_factory=list)

    def result(self, name: str) -> KtapResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def complete(self) -> bool:
        """All planned results are there and /init finished."""
        return self.done and self.plan is not None and len(self.results) == self.plan

    @property
    def failures(self) -> list[KtapResult]:
        return [r for r in self.results if not r.ok]


def parse_console(text: str | bytes) -> ConsoleReport:
    """Ready lines and KTAP results from a serial console log (kernel lines ignored).

    Only complete lines count: a log read while the guest writes may end in half a
    line, which is left for the next read."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    report = ConsoleReport()
    report.lines = [line.rstrip("\r") for line in text.split("\n")[:-1]]
    for index, line in enumerate(report.lines):
        stripped = line.strip()
        if stripped.startswith("KTAP version "):
            try:
                report.ktap_version = int(stripped.split()[2])
            except (IndexError, ValueError):
                pass
        elif m := _KTAP_PLAN.match(stripped):
            report.plan = int(m.group(1))
        elif m := _KTAP_RESULT.match(stripped):
            report.results.append(KtapResult(int(m["number"]), not m["not"], m["name"], (m["directive"] or "").strip()))
        elif m := READY_RE.search(line):
            fields = dict(kv.split("=", 1) for kv in m["rest"].split() if "=" in kv)
            report.ready.append(Ready(m["bank"], int(m["pid"]), fields, index))
        elif m := _STARTED.match(stripped):
            report.started_uptime = float(m["uptime"])
        elif stripped.startswith(DONE_PREFIX):
            report.done = True
    return report


# --- command line: python -m apx_tests.guests.linux ---------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m apx_tests.guests.linux",
                                     description="Linux guest kernel and initramfs for apx_tests")
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel", help="print the kernel path (fetching it into the cache if none is cached)")
    k.add_argument("--no-fetch", action="store_true", help="fail instead of downloading")
    i = sub.add_parser("initramfs", help="build the standard initramfs")
    i.add_argument("out")
    i.add_argument("--gzip", action="store_true")
    c = sub.add_parser("cmdline", help="print a kernel command line")
    c.add_argument("--run", default=",".join(DEFAULT_RUN))
    c.add_argument("--spin-ms", type=int)
    c.add_argument("--release", choices=("deadline", "console"), default="deadline")
    args = parser.parse_args(argv)
    try:
        if args.command == "kernel":
            print(find_kernel(fetch=not args.no_fetch))
        elif args.command == "initramfs":
            print(build_initramfs(guest_files(), args.out, compress=args.gzip))
        else:
            print(kernel_cmdline(args.run.split(","), spin_ms=args.spin_ms, release=args.release))
    except (KernelUnavailable, GuestBuildError, ValueError) as exc:
        print(f"apx_tests: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
