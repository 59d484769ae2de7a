"""The Linux guests' kernel: ``find_kernel()`` - an explicit path ($APX_KERNEL /
``--apx-kernel``) or the Debian cloud kernel cached under
``$XDG_CACHE_HOME/apx_tests/kernel/``, fetched with ``apt-get download`` when the cache
is empty (``fetch_kernel()``) - and what a kernel image says about itself
(``kernel_release``, ``kernel_knows_apx``, ``pvh_kernel``: the vmlinux with a PVH entry
that QEMU's -kernel boots on microvm).  See docs/linux-guests.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .build import _write_atomically
from .linux_programs import TOOL_TIMEOUT, _cache_base, build_cache_dir

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
KERNEL_ENV = "APX_KERNEL"
_KERNEL_NAME = re.compile(r"^vmlinuz-(?P<version>.+)$")


class KernelUnavailable(RuntimeError):
    """No Linux kernel to boot; the message is one line saying why and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


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


class DebData:
    """The data tarball of a .deb, streamed from ``dpkg-deb --fsys-tarfile`` (one read, no
    unpacking to disk).  dpkg-deb runs in its own process group: it forks a decompressor,
    and both must go when the reader stops early.  A tar or I/O error while reading ends
    the ``with`` block quietly and is kept in ``failure``; afterwards ``stderr`` holds what
    dpkg-deb said and ``complete`` whether it read to the end and exited 0.

        with DebData(deb, KernelError) as data:
            for member in data.members():
                ... data.read(member) ...
    """

    def __init__(self, deb: Path, error: type[Exception]):
        self.deb, self.error = deb, error
        self.failure: str | None = None
        self.stderr = b""
        self.complete = False
        self._read_all = False
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "DebData":
        self._errors = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(self.deb)], stdout=subprocess.PIPE,
                                          stderr=self._errors, start_new_session=True)
        except OSError as exc:
            self._errors.close()
            raise self.error(f"cannot unpack {self.deb.name}: dpkg-deb: {exc.strerror or exc}") from None
        return self

    def members(self):
        self._tar = tarfile.open(fileobj=self._proc.stdout, mode="r|")
        yield from self._tar
        self._read_all = True

    def read(self, member: tarfile.TarInfo) -> bytes:
        return self._tar.extractfile(member).read()

    def __exit__(self, exc_type, exc, tb) -> bool:
        quiet = exc_type is not None and issubclass(exc_type, (tarfile.TarError, OSError))
        if quiet:
            self.failure = str(exc)
        if not self._read_all:
            try:
                os.killpg(self._proc.pid, 9)
            except OSError:
                pass
        self._proc.stdout.close()
        self._proc.wait()
        self.complete = self._read_all and self._proc.returncode == 0
        self._errors.seek(0)
        self.stderr = self._errors.read()
        self._errors.close()
        return quiet


def extract_kernel(deb: Path, dest: Path) -> Path:
    """Copy boot/vmlinuz-* and boot/config-* from a kernel .deb into `dest`.

    Stops reading after boot/ (which comes first in Debian kernel packages), so the
    modules are never unpacked.
    """
    kernel = None
    with DebData(deb, KernelUnavailable) as data:
        for member in data.members():
            name = member.name.removeprefix("./")
            if not name.startswith("boot/"):
                if kernel is not None and name.split("/")[0] not in ("", "boot"):
                    break  # boot/ is done
                continue
            base = name[len("boot/"):]
            if member.isfile() and (base.startswith("vmlinuz-") or base.startswith("config-")):
                _write_atomically(dest / base, data.read(member))
                (dest / base).chmod(0o644)
                if base.startswith("vmlinuz-"):
                    kernel = dest / base
    if kernel is None:
        detail = _last_line(data.stderr) if data.stderr.strip() else (data.failure or "no boot/vmlinuz-* in it")
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
