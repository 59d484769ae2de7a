"""The Linux guests' user programs, built on the host and cached: ``build_init()``
(guests/linux/init.c) and ``build_holder()`` (guests/linux/holder.c + each bank's
guests/payload/<bank>.S assembled around guests/linux/hold.S), static, cached under
``$XDG_CACHE_HOME/apx_tests/linux/``.  The register patterns are generated from
``apx_tests.xsave`` at build time (``holder_header``).  See docs/linux-guests.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

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

# Shared with guests/linux/*.c.
HOLDER = "apx-holder"  # /bin/apx-holder in the initramfs
STAGES = 5  # holder_banks.h carries the patterns of stages 0..4 (init.c: MAX_STAGE 4)

CC_ENV = "APX_CC"
CACHE_FORMAT = 1  # bump when the builders' output changes for the same inputs
TOOL_TIMEOUT = 120
CFLAGS = ("-static", "-O2", "-Wall", "-s")


def _cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apx_tests"


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
