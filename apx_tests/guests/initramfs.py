"""The initramfs writer: a newc cpio archive in pure Python (``build_initramfs``), the
entries it takes (``File``, ``Directory``, ``CharDevice``, or a path / bytes), the base
entries every guest gets, and ``read_initramfs`` to read one back.  No tools, no I/O
beyond the output file.  See docs/linux-guests.md.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

from .build import GuestBuildError, _write_atomically


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
