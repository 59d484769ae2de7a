"""Assemble guest payloads (guests/payload/<bank>.S) into flat, cached code.

Only LLVM's assembler is used: binutils 2.40 (Debian bookworm) cannot encode
APX (REX2), and llvm-mc >= 18 can.  The object file is turned into flat code
here in Python (see elf.py) rather than with llvm-objcopy, so one tool is
enough and the object is checked, not just copied.
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
from dataclasses import dataclass, field
from pathlib import Path

from . import elf

MIN_LLVM_MAJOR = 18  # first LLVM release that assembles APX (REX2/EVEX-promoted)
PREFERRED_LLVM_MC = "llvm-mc-19"  # what Debian bookworm's llvm-19 package installs
ASSEMBLER_FLAGS = ("--triple=x86_64", "-filetype=obj")
DISASSEMBLER_FLAGS = ("--disassemble", "--triple=x86_64", "--output-asm-variant=0")
COMMON_SOURCE = "common.S"  # shared macros; not a bank
CACHE_FORMAT = 1  # bump when the builder's output changes for the same inputs
TOOL_TIMEOUT = 60  # seconds; llvm-mc takes milliseconds on these files

_INCLUDE = re.compile(r'^\s*\.include\s+"([^"]+)"', re.MULTILINE)
_DIAGNOSTIC = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|warning|note): (?P<msg>.*)$")
_LLVM_VERSION = re.compile(r"LLVM version (\d+)\.(\d+)(?:\.(\d+))?")


class GuestBuildError(RuntimeError):
    """A payload could not be built; the message is one line saying why."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, always


@dataclass(frozen=True)
class Payload:
    """Flat guest code for one bank.

    `digest` is the sha256 of everything the build read (sources, assembler
    version, flags): it names the cache entry and changes with any source edit,
    even one that leaves the code identical.
    """

    bank: str
    code: bytes = field(repr=False)
    source_path: Path
    digest: str

    @property
    def code_sha256(self) -> str:
        return hashlib.sha256(self.code).hexdigest()


@dataclass(frozen=True)
class Instruction:
    """One disassembled instruction: where it is, its bytes, its AT&T text."""

    offset: int
    encoding: bytes
    text: str

    def __str__(self) -> str:
        return f"{self.offset:#06x}: {self.encoding.hex(' '):<30} {self.text}"


# --- where things are -------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the apx_tests package
SHIPPED_GUESTS = "_guests"  # apx_tests/_guests: the wheel's copy of guests/ (setup.py)
PREBUILT = "_prebuilt"  # apx_tests/_prebuilt: code assembled when the wheel was built (setup.py)
PREBUILT_MANIFEST = "manifest.json"


def checkout_guests_dir() -> Path | None:
    """guests/ at the top of the checkout this package sits in, or None when installed.

    A checkout is recognised by pyproject.toml next to guests/, so an unrelated
    site-packages/guests is never mistaken for it.
    """
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "guests").is_dir():
        return root / "guests"
    return None


def shipped_guests_dir() -> Path:
    """The wheel's copy of guests/ (apx_tests/_guests); absent in a checkout."""
    return PACKAGE_DIR / SHIPPED_GUESTS


def guests_dir() -> Path:
    """$APX_GUESTS_DIR, else the checkout's guests/, else the installed wheel's copy.

    The checkout wins over a copy, so the top-level guests/ stays the one source of
    truth wherever both could be seen (an editable install never writes the copy).
    """
    override = os.environ.get("APX_GUESTS_DIR")
    if override:
        path = Path(override)
        if not path.is_dir():
            raise GuestBuildError(f"guest sources not found: {path} (APX_GUESTS_DIR) is not a directory")
        return path
    path = checkout_guests_dir() or shipped_guests_dir()
    if not path.is_dir():
        raise GuestBuildError(
            f"guest sources not found: neither {PACKAGE_DIR.parent / 'guests'} (a checkout) nor {path} "
            "(an installed wheel) is a directory; set APX_GUESTS_DIR to the guests/ directory of an "
            "apx_tests checkout"
        )
    return path


def prebuilt_dir() -> Path:
    """Where an installed wheel keeps the payloads (and boot stub) assembled when it was built."""
    return PACKAGE_DIR / PREBUILT


def payload_dir() -> Path:
    return guests_dir() / "payload"


def available_banks() -> list[str]:
    """Bank names that have a payload source (guests/payload/<bank>.S)."""
    return sorted(p.stem for p in payload_dir().glob("*.S") if p.name != COMMON_SOURCE)


def payload_source(bank: str) -> Path:
    path = payload_dir() / f"{bank}.S"
    if bank == Path(COMMON_SOURCE).stem or not path.is_file():
        known = ", ".join(available_banks())
        raise GuestBuildError(f"no guest payload for bank {bank!r} ({_display(path)} missing); known: {known}")
    return path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/apx_tests/guests, or ~/.cache/apx_tests/guests."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "apx_tests" / "guests"


def _display(path: Path) -> str:
    """A path as a developer would type it: relative to the repo when inside it.

    Inside an installed wheel's copy a relative name (_guests/...) would point
    nowhere a reader can go, so that copy's paths stay absolute.
    """
    try:
        root = guests_dir().resolve()
        resolved = Path(path).resolve()
        if root == shipped_guests_dir().resolve():
            resolved.relative_to(root)  # ValueError when outside: then shown as given
            return str(resolved)
        return str(resolved.relative_to(root.parent))
    except (ValueError, GuestBuildError):
        return str(path)


# --- the assembler ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _llvm_version_of(path: str, _mtime_ns: int, _size: int) -> tuple[int, str] | None:
    """(major, version line) of an LLVM tool, or None if it is not one.

    Memoised per binary identity, so a cached build runs no tool at all.
    """
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _LLVM_VERSION.search(out)
    if not match:
        return None
    line = next(line.strip() for line in out.splitlines() if "LLVM version" in line)
    return int(match.group(1)), line


def _llvm_version(path: str) -> tuple[int, str] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _llvm_version_of(path, st.st_mtime_ns, st.st_size)


def find_llvm_mc(purpose: str = "assemble guests/payload/apx.S") -> str:
    """Path of an llvm-mc that can assemble APX (LLVM >= 18).

    $APX_LLVM_MC wins when set (and must be good: a wrong explicit choice is an
    error, not a reason to quietly use another); then llvm-mc-19, other
    versioned names, and plain llvm-mc - which on bookworm is LLVM 14, too old.
    """
    want = f"llvm-mc ≥ {MIN_LLVM_MAJOR}"
    explicit = os.environ.get("APX_LLVM_MC")
    if explicit:
        path = shutil.which(explicit) or explicit
        version = _llvm_version(path)
        if version is None:
            raise GuestBuildError(f"APX_LLVM_MC={explicit} is not a runnable llvm-mc; {want} needed to {purpose}")
        if version[0] < MIN_LLVM_MAJOR:
            raise GuestBuildError(f"APX_LLVM_MC={explicit} is LLVM {version[0]}; {want} needed to {purpose}")
        return path

    names = [PREFERRED_LLVM_MC] + [f"llvm-mc-{n}" for n in range(40, MIN_LLVM_MAJOR - 1, -1)] + ["llvm-mc"]
    for name in dict.fromkeys(names):  # ordered, without the duplicate llvm-mc-19
        path = shutil.which(name)
        if path is None:
            continue
        version = _llvm_version(path)
        if version is not None and version[0] >= MIN_LLVM_MAJOR:
            return path
    raise GuestBuildError(f"{want} not found (install llvm-19); needed to {purpose}")


def have_llvm_mc() -> bool:
    """Whether find_llvm_mc() would succeed (for skip conditions)."""
    try:
        find_llvm_mc()
    except GuestBuildError:
        return False
    return True


def assembler_version(llvm_mc: str) -> str:
    version = _llvm_version(llvm_mc)
    return version[1] if version else "unknown"


def _run_tool(argv: list[str], *, input: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input, capture_output=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot run {argv[0]}: {exc}") from exc


def _first_error(stderr: str, source: Path) -> str:
    """llvm-mc's first error as one line naming a real file and line.

    An error inside a macro is reported at "<instantiation>"; the notes that
    follow name the invoking lines, the last one being the bank file itself.
    """
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        match = _DIAGNOSTIC.match(line)
        if not match or match["kind"] != "error":
            continue
        if match["file"] == "<instantiation>":
            where = f"<instantiation>:{match['line']}"
            expanded = lines[index + 1].strip() if index + 1 < len(lines) else ""
            notes = [m for m in map(_DIAGNOSTIC.match, lines[index + 1 :]) if m and m["kind"] == "note"]
            in_a_file = [m for m in notes if m["file"] != "<instantiation>"]
            if in_a_file:
                where = f"{_display(Path(in_a_file[0]['file']))}:{in_a_file[0]['line']}"
            return f"{where}: error: {match['msg']} (in macro expansion: {expanded})"
        return f"{_display(Path(match['file']))}:{match['line']}: error: {match['msg']}"
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no diagnostics"
    return f"{_display(source)}: llvm-mc failed: {detail}"


def assemble_object(source: Path, llvm_mc: str | None = None) -> bytes:
    """Assemble one payload source into an ELF64 object (not cached)."""
    source = Path(source)
    llvm_mc = llvm_mc or find_llvm_mc(f"assemble {_display(source)}")
    with tempfile.TemporaryDirectory(prefix="apx-guest-") as tmp:
        obj = Path(tmp) / (source.stem + ".o")
        argv = [llvm_mc, *ASSEMBLER_FLAGS, "-I", str(source.parent), "-o", str(obj), str(source)]
        result = _run_tool(argv)
        if result.returncode != 0 or not obj.is_file():
            raise GuestBuildError(_first_error(result.stderr.decode(errors="replace"), source))
        return obj.read_bytes()


def flat_code(obj: bytes, source: Path) -> bytes:
    """The .text bytes of a payload object, after checking they stand alone.

    A relocation means the code refers to an address the assembler could not
    resolve (an undefined symbol, an absolute address): loaded at an arbitrary
    base it would be wrong, so that is an error, as is data in other sections
    that a flat .text copy would drop.
    """
    try:
        sections = elf.read_sections(obj)
    except elf.ElfError as exc:
        raise GuestBuildError(f"{_display(source)}: assembler output unreadable: {exc}") from exc
    relocated = [s.name for s in sections if s.is_relocation]
    if relocated:
        undefined = elf.undefined_symbols(obj)
        why = f"undefined symbols: {', '.join(undefined)}" if undefined else f"sections {', '.join(relocated)}"
        raise GuestBuildError(
            f"{_display(source)}: payload needs relocations ({why}); "
            "use only %rdi-relative addressing and local labels"
        )
    stray = [s.name for s in sections if s.is_allocated and s.name != ".text" and s.size]
    if stray:
        raise GuestBuildError(
            f"{_display(source)}: payload has bytes outside .text ({', '.join(stray)}); a flat payload is .text only"
        )
    text = next((s.data for s in sections if s.name == ".text"), b"")
    if not text:
        raise GuestBuildError(f"{_display(source)}: payload assembled to no code")
    return text


# --- building with a cache --------------------------------------------------


def _sources_of(source: Path) -> list[Path]:
    """The source and everything it .includes (transitively), in first-seen order."""
    seen: dict[Path, None] = {}
    pending = [source]
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen[path] = None
        try:
            text = path.read_text()
        except OSError:
            continue  # llvm-mc will report the missing include with file and line
        pending += [(path.parent / name).resolve() for name in _INCLUDE.findall(text)]
    return list(seen)


def source_digest(source: Path) -> str:
    """sha256 of `source` and everything it .includes: names relative to guests_dir()
    and contents. It does not depend on where guests/ is, so a wheel's prebuilt code
    can be matched against the sources installed next to it."""
    root = guests_dir().resolve()
    names = []
    for path in _sources_of(Path(source).resolve()):
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = str(path)
        names.append([name, hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None])
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()


def _build_digest(bank: str, source: Path, llvm_mc: str) -> str:
    inputs = {
        "format": CACHE_FORMAT,
        "bank": bank,
        "assembler": assembler_version(llvm_mc),
        "flags": list(ASSEMBLER_FLAGS),
        "sources": source_digest(source),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write via a temporary file and rename, so readers never see half a file; `mode`
    (e.g. 0o755) is set before the rename, so no reader sees the file 0600 either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if mode is not None:
                os.fchmod(out.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def build_payload(bank: str) -> Payload:
    """Flat code for `bank`, from the cache when nothing it depends on changed.

    Without a usable llvm-mc, an installed wheel's prebuilt payload serves if it was
    assembled from exactly the sources installed with it (prebuilt()).
    """
    source = payload_source(bank)
    try:
        llvm_mc = find_llvm_mc(f"assemble {_display(source)}")
    except GuestBuildError as missing:
        code, entry = prebuilt(bank, f"payload for bank {bank}", source, missing)
        return Payload(bank=bank, code=code, source_path=source, digest=entry["digest"])
    digest = _build_digest(bank, source, llvm_mc)
    cached = cache_dir() / f"{bank}-{digest}.bin"
    try:
        code = cached.read_bytes()
    except OSError:
        code = b""
    if not code:
        code = flat_code(assemble_object(source, llvm_mc), source)
        try:
            _write_atomically(cached, code)
        except OSError:
            pass  # the cache only saves time; an unwritable one must not fail a build
    return Payload(bank=bank, code=code, source_path=source, digest=digest)


# --- prebuilt code (a wheel's apx_tests/_prebuilt, a remote bundle's payloads/) ---
#
# <name>.bin     the code: a bank's flat payload, or the boot stub (name "boot-stub")
# <name>.error   instead of .bin when the build failed where the files were made
# manifest.json  name -> {"file", "digest" (the build's), "source_digest", "code_sha256", ...}

BOOT_STUB = "boot-stub"  # not a bank name: those are identifiers without '-'


def prebuilt(name: str, what: str, source: Path, missing: GuestBuildError,
             directory: Path | None = None) -> tuple[bytes, dict]:
    """(code, manifest entry) of the prebuilt `name`, if it was built from exactly what
    `source` holds now; else GuestBuildError: `missing` (why it cannot be built here),
    plus why the prebuilt copy cannot stand in, when there is one at all."""
    directory = directory or prebuilt_dir()
    manifest_path = directory / PREBUILT_MANIFEST
    if not manifest_path.is_file():
        raise missing  # a checkout or a bundle-less run: nothing prebuilt to offer
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get(name, {}), dict):
            raise ValueError("not a mapping of names to entries")
    except (OSError, ValueError) as exc:
        raise GuestBuildError(f"{missing}; and {manifest_path} is unreadable ({exc})") from None
    entry = manifest.get(name)
    if entry is None:
        error = directory / f"{name}.error"
        why = f"it failed when the wheel was built: {error.read_text()}" if error.is_file() else \
            f"{manifest_path} has no {name}"
        raise GuestBuildError(f"{missing}; no prebuilt {what} either: {why}") from None
    if entry.get("source_digest") != source_digest(source):
        raise GuestBuildError(f"{missing}; the prebuilt {what} in {directory} was built from other "
                              f"sources than {_display(source)}") from None
    path = directory / str(entry.get("file"))
    try:
        code = path.read_bytes()
    except OSError as exc:
        raise GuestBuildError(f"{missing}; the prebuilt {what} {path} is unreadable "
                              f"({exc.strerror or exc})") from None
    if hashlib.sha256(code).hexdigest() != entry.get("code_sha256"):
        raise GuestBuildError(f"{missing}; the prebuilt {what} {path} does not match the sha256 "
                              f"in {manifest_path}") from None
    return code, entry


def write_prebuilt(add, banks: list[str] | None = None, *, extra=()
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Build `banks` (default: all) here, and each `extra` item (name, make) — make()
    returns (code, source path, build digest, manifest fields), as boot.PREBUILT_STUB does
    for the boot stub — and hand the files to add(name, data): <name>.bin or
    <name>.error, then manifest.json.

    One writer for the wheel (setup.py) and the remote bundle (remote/bundle.py).
    Returns (bank -> code sha256, name -> one-line error); a bank list that cannot be
    read is the error "*".
    """
    manifest: dict[str, dict] = {}
    errors: dict[str, str] = {}
    built: dict[str, str] = {}

    def record(name: str, make) -> None:
        try:
            code, source, digest, extra = make()
        except GuestBuildError as exc:
            errors[name] = str(exc)
            add(f"{name}.error", str(exc).encode())
            return
        sha = hashlib.sha256(code).hexdigest()
        add(f"{name}.bin", code)
        manifest[name] = {"file": f"{name}.bin", "digest": digest, "source_digest": source_digest(source),
                          "code_sha256": sha, **extra}
        if name in wanted:
            built[name] = sha

    def payload(bank: str):
        p = build_payload(bank)
        return p.code, p.source_path, p.digest, {}

    try:
        wanted = banks if banks is not None else available_banks()
    except GuestBuildError as exc:
        wanted, errors["*"] = [], str(exc)
    for bank in wanted:
        record(bank, lambda: payload(bank))
    for name, make in extra:
        record(name, make)
    add(PREBUILT_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return built, errors


# --- looking at the code ----------------------------------------------------


def disassemble(code: bytes, *, show_encoding: bool = False) -> str:
    """llvm-mc's AT&T disassembly of flat 64-bit code."""
    argv = [find_llvm_mc("disassemble payload code"), *DISASSEMBLER_FLAGS]
    if show_encoding:
        argv.append("--show-encoding")
    result = _run_tool(argv, input=" ".join(f"0x{b:02x}" for b in code).encode())
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0 or "invalid instruction encoding" in stderr:
        first = stderr.strip().splitlines()[0] if stderr.strip() else f"exit status {result.returncode}"
        raise GuestBuildError(f"llvm-mc could not disassemble the code: {first}")
    return result.stdout.decode()


def decode(code: bytes) -> list[Instruction]:
    """The code as instructions with offsets and their bytes.

    llvm-mc prints a re-encoding of each instruction (with "A" for branch
    displacements it leaves to a fixup); walking it against the real bytes
    gives offsets, and proves the listing describes *these* bytes.
    """
    instructions = []
    offset = 0
    for line in disassemble(code, show_encoding=True).splitlines():
        text, sep, comment = line.partition("# encoding: [")
        if not sep:
            continue
        tokens = comment.rstrip("]").split(",")
        want = [int(t, 16) if t.startswith("0x") else None for t in tokens]
        actual = code[offset : offset + len(want)]
        if len(actual) != len(want) or any(w is not None and w != a for w, a in zip(want, actual)):
            raise GuestBuildError(f"disassembly does not match the code at offset {offset:#x} ({text.strip()})")
        instructions.append(Instruction(offset, bytes(actual), " ".join(text.split())))
        offset += len(want)
    if offset != len(code):
        raise GuestBuildError(f"disassembly covers {offset} of {len(code)} bytes")
    return instructions


def listing(code: bytes) -> str:
    """An offset / bytes / instruction listing, for artifacts and failure reports."""
    return "\n".join(str(insn) for insn in decode(code)) + "\n"
