"""Which qemu-system-x86_64 binaries a run uses, what each one is, and what it does here.

    qemus = resolve_qemus(None)        # the default: PATH's QEMU + the bootstrap's side QEMUs
    [(q.version, q.tag) for q in qemus]   # [("10.0.2", "10"), ("11.1.3", "11")]
    q.backend("kvm")                   # "qemu11-kvm": the backend part of its case ids
    kvm_cpu_model(q.path)              # KvmCpu("host", ...) or KvmCpu("host,-arch-capabilities", why)
    apx_probes(q.path, "tcg", "max")   # what this QEMU does with -cpu max,+apxf (measured)
    apx_reason(...)                    # why the apx bank cannot run: the missing piece, by name

Several QEMUs run side by side (the system QEMU 10 and QEMU 11 from a Debian 13 root
filesystem on Debian 12, a self-built one under review, ...).  With one QEMU the case ids
keep their plain form (`qemu-kvm-ymm-export`); with several each QEMU's ids carry its
version (`qemu10-kvm-ymm-export`, `qemu11-kvm-ymm-export`): the major version where that
tells them apart, else major.minor, else the whole version (and a letter for two of the
same version).

Facts are measured by running the binary (`--version`, a start under KVM, a start with
+apxf) and remembered per binary (path, size, mtime) for the life of the process.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from .errors import QemuUnavailable
from .spec import (KVM_CPU_HOST, KVM_CPU_NO_ARCH_CAPABILITIES, SHORT_RUN_TIMEOUT, KvmCpu,  # noqa: F401
                   find_qemu, kvm_cpu_model, probe_argv, run_short, stat_key)

VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")
TAG_RE = re.compile(r"\d+(?:\.\d+){0,2}[a-z]?")

# The bootstrap's side-by-side QEMUs (ci/bootstrap ensure_side_qemu): a prefix each,
# <cache>/qemu<N>/bin/qemu-system-x86_64 (a wrapper) and <cache>/qemu<N>/share/qemu.
SIDE_QEMU_GLOB = "qemu*/bin/qemu-system-x86_64"
DEFAULT_CACHE = "/var/cache/apx_tests"


class QemuListError(ValueError):
    """The QEMUs asked for cannot be told apart or used; str() is one line."""


def side_qemu_root() -> str:
    """Where ci/bootstrap keeps the side QEMUs (the same cache as ci/in-debian13's rootfs)."""
    return os.environ.get("APX_DEBIAN13_CACHE") or DEFAULT_CACHE


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@functools.lru_cache(maxsize=32)
def _version(path: str, _mtime: int, _size: int) -> tuple[str | None, str | None]:
    try:
        proc = run_short([path, "--version"])
    except subprocess.TimeoutExpired:
        return None, f"{path} --version: timed out after {SHORT_RUN_TIMEOUT:g} s"
    except OSError as exc:
        return None, f"{path} --version: {exc.strerror or exc}"
    m = VERSION_RE.search(proc.stdout)
    if m:
        return ".".join(g or "0" for g in m.groups()), None
    detail = (proc.stderr or proc.stdout).strip().splitlines()
    return None, (f"{path} --version: exit {proc.returncode}" + (f": {_one_line(detail[-1])}" if detail else "")
                  if proc.returncode else f"{path} --version: no 'QEMU emulator version' line")


def qemu_version(path: str) -> tuple[str | None, str | None]:
    """("11.1.3", None) or (None, why not in one line), remembered per binary."""
    return _version(*stat_key(path))


def version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version else ()


@dataclass(frozen=True)
class QemuBinary:
    """One QEMU of the run: its path, version, and the tag its case ids carry."""

    path: str
    version: str | None = None
    tag: str = ""               # "" (the only QEMU: qemu-kvm-...), "11" (qemu11-kvm-...), "10.0", ...
    error: str | None = None    # why it cannot be used (then version is None)
    origin: str = ""            # where it came from: --apx-qemu, PATH, ci/bootstrap (side QEMU), ...

    @property
    def name(self) -> str:
        """"qemu" or "qemu11": the prefix of its backends."""
        return f"qemu{self.tag}"

    def backend(self, accel: str) -> str:
        return f"{self.name}-{accel}"

    @property
    def major(self) -> int | None:
        return version_tuple(self.version)[0] if self.version else None

    def describe(self) -> str:
        return f"QEMU {self.version} ({self.path})" if self.version else f"{self.path} ({self.error})"


def assign_tags(versions: list[str | None]) -> list[str]:
    """Tags that tell QEMUs apart in case ids: "" for a single QEMU; else the shortest
    prefix of each version (major, major.minor, all of it) no other QEMU shares, and for
    equal versions a letter (b, c, ...) on the second and later."""
    if len(versions) <= 1:
        return [""] * len(versions)
    tags = []
    for i, version in enumerate(versions):
        parts = version.split(".") if version else ["0"]
        others = [v.split(".") if v else ["0"] for j, v in enumerate(versions) if j != i]
        tag = ".".join(parts)
        for n in range(1, len(parts) + 1):
            if all(o[:n] != parts[:n] for o in others):
                tag = ".".join(parts[:n])
                break
        same_before = sum(1 for v in versions[:i] if v == version)
        tags.append(tag + (chr(ord("a") + same_before) if same_before else ""))
    return tags


def side_qemus(root: str | None = None) -> list[str]:
    """The bootstrap's side QEMUs (wrappers) under the cache, oldest version first."""
    found = sorted(glob.glob(os.path.join(root or side_qemu_root(), SIDE_QEMU_GLOB)))
    return [p for p in found if os.path.isfile(p) and os.access(p, os.X_OK)]


def default_qemu_paths() -> list[tuple[str, str]]:
    """(path, origin) of the default QEMUs: $APX_QEMU (os.pathsep-separated) if set, else
    the qemu-system-x86_64 in PATH plus every side QEMU ci/bootstrap provided that runs
    (a broken one, e.g. after its root filesystem was removed, is left out: the probe
    still lists it)."""
    env = os.environ.get("APX_QEMU")
    if env:
        return [(p, "$APX_QEMU") for p in env.split(os.pathsep) if p]
    out: list[tuple[str, str]] = []
    system = shutil.which("qemu-system-x86_64")
    if system:
        out.append((system, "PATH"))
    seen = {os.path.realpath(p) for p, _ in out}
    for path in side_qemus():
        if os.path.realpath(path) in seen or qemu_version(path)[0] is None:
            continue
        seen.add(os.path.realpath(path))
        out.append((path, "ci/bootstrap side QEMU"))
    return out or [("qemu-system-x86_64", "PATH")]


def broken_side_qemus() -> list[QemuBinary]:
    """Side QEMUs that are there but do not run (for the probe's report)."""
    out = []
    for path in side_qemus():
        version, error = qemu_version(path)
        if version is None:
            out.append(QemuBinary(path, None, "", error, "ci/bootstrap side QEMU"))
    return out


def resolve_qemus(paths=None, *, origin: str = "--apx-qemu") -> list[QemuBinary]:
    """The QEMUs of a run, in order (the first is the primary one: Linux guests, the
    kernel under test and plain `qemu-kvm` ids use it), with their versions and tags.

    `paths`: None for the default (default_qemu_paths), a path, or a list of paths or
    QemuBinary.  One QEMU may be broken (its cases then skip saying why); of several,
    every one must report a version (QemuListError otherwise: which ids would it get?)."""
    if paths is None:
        items = default_qemu_paths()
    elif isinstance(paths, (str, os.PathLike)):
        items = [(os.fspath(paths), origin)]
    else:
        items = [(p.path, p.origin) if isinstance(p, QemuBinary) else (os.fspath(p), origin) for p in paths]
    binaries = []
    for path, where in items:
        try:
            found = find_qemu(path)
        except QemuUnavailable as exc:
            binaries.append(QemuBinary(path, None, "", str(exc), where))
            continue
        version, error = qemu_version(found)
        binaries.append(QemuBinary(found, version, "", error, where))
    # The same binary named twice runs once.
    unique: list[QemuBinary] = []
    for b in binaries:
        if not any(os.path.realpath(b.path) == os.path.realpath(u.path) for u in unique):
            unique.append(b)
    if len(unique) > 1:
        bad = [b for b in unique if b.version is None]
        if bad:
            error = bad[0].error or "no version"
            # find_qemu's errors start with the path already
            what = error if error.startswith(bad[0].path) else f"{bad[0].path}: {error}"
            raise QemuListError(f"{bad[0].origin} {what} (with several QEMUs each must report its version: "
                                f"it names their case ids)")
    tags = assign_tags([b.version for b in unique])
    return [QemuBinary(b.path, b.version, t, b.error, b.origin) for b, t in zip(unique, tags)]


def parse_backend(name: str) -> tuple[str, str] | None:
    """`qemu11-kvm` -> ("11", "qemu-kvm"); `qemu-tcg` -> ("", "qemu-tcg"); else None."""
    m = re.fullmatch(rf"qemu({TAG_RE.pattern})?-(kvm|tcg)", name or "")
    return (m.group(1) or "", f"qemu-{m.group(2)}") if m else None


def backend_label(base: str, tag: str) -> str:
    """("qemu-kvm", "11") -> "qemu11-kvm"; other backends unchanged."""
    return f"qemu{tag}-{base.split('-', 1)[1]}" if tag and base.startswith("qemu-") else base


def pick(binaries: list[QemuBinary], tag: str) -> QemuBinary | None:
    """The QEMU a case id's tag names: "" -> the primary (first) one; else the exact tag,
    or the only QEMU whose version starts with it (a run with one QEMU 11 still runs an id
    `qemu11-kvm-...` that a run with two QEMUs made)."""
    if not binaries:
        return None
    if not tag:
        return binaries[0]
    exact = [b for b in binaries if b.tag == tag]
    if exact:
        return exact[0]
    prefix = [b for b in binaries if b.version and (b.version == tag or b.version.startswith(tag + "."))]
    return prefix[0] if len(prefix) == 1 else None


def sibling_gdb(qemu: str) -> str:
    """The gdb that goes with `qemu`: a `gdb` beside it (ci/bootstrap puts gdb 16 beside
    its QEMU 11 wrapper, the pairing Debian 13 has), else gdb from PATH."""
    beside = os.path.join(os.path.dirname(qemu), "gdb")
    if not (os.path.isfile(beside) and os.access(beside, os.X_OK)):
        return "gdb"
    in_path = shutil.which("gdb")
    # /usr/bin/gdb beside /usr/bin/qemu-system-x86_64 is just PATH's gdb.
    return "gdb" if in_path and os.path.realpath(in_path) == os.path.realpath(beside) else beside


# --- APX: what a QEMU does with +apxf ---------------------------------------------------------

@dataclass(frozen=True)
class ApxProbe:
    """One start of a QEMU with -cpu MODEL,+apxf under one accelerator."""

    cpu: str                          # the -cpu given (with +apxf)
    apxf: bool | None = None          # the vCPU's apxf property afterwards; None: QEMU did not start
    warnings: tuple[str, ...] = ()    # QEMU's lines about apxf or mpx (without the program name)
    error: str | None = None          # QEMU refused to start: its last stderr line

    def warning(self, pattern: str) -> str | None:
        return next((w for w in self.warnings if re.search(pattern, w)), None)

    @property
    def mpx_conflict(self) -> str | None:
        return self.warning(r"conflicts? with MPX")

    @property
    def tcg_refuses(self) -> str | None:
        return self.warning(r"TCG doesn't support requested feature.*apxf")

    @property
    def host_refuses(self) -> str | None:
        return self.warning(r"host doesn't support requested feature.*apxf")


CPU_QOM_PATH = "/machine/unattached/device[0]"  # microvm's only vCPU (query-cpus-fast confirms it)


def _strip_program(line: str) -> str:
    """QEMU prefixes its messages with argv[0]: "qemu-system-x86_64: warning: ..."."""
    return re.sub(r"^\S*qemu\S*: ", "", line.strip())


@functools.lru_cache(maxsize=32)
def _apx_probe(path: str, _mtime: int, _size: int, accel: str, cpu: str) -> ApxProbe:
    commands = "".join(json.dumps(c) + "\n" for c in (
        {"execute": "qmp_capabilities"}, {"execute": "query-cpus-fast"},
        {"execute": "qom-get", "arguments": {"path": CPU_QOM_PATH, "property": "apxf"}},
        {"execute": "quit"}))
    try:
        proc = run_short(probe_argv(path, accel, cpu), stdin=commands)
    except subprocess.TimeoutExpired:
        return ApxProbe(cpu, None, (), f"no answer within {SHORT_RUN_TIMEOUT:g} s")
    except (OSError, QemuUnavailable) as exc:
        return ApxProbe(cpu, None, (), str(getattr(exc, "strerror", None) or exc))
    lines = [_strip_program(ln) for ln in proc.stderr.splitlines() if ln.strip()]
    warnings = tuple(ln for ln in lines if "apxf" in ln or ".mpx" in ln or "MPX" in ln)
    replies = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "return" in msg or "error" in msg:
            replies.append(msg)
    if proc.returncode != 0 or len(replies) < 3:
        return ApxProbe(cpu, None, warnings, _one_line(lines[-1]) if lines else f"exit {proc.returncode}")
    cpus = replies[1].get("return") or []
    if not cpus or cpus[0].get("qom-path") != CPU_QOM_PATH:
        return ApxProbe(cpu, None, warnings, f"the vCPU is not at {CPU_QOM_PATH}")
    return ApxProbe(cpu, replies[2].get("return") is True, warnings, None)


def apx_probe(qemu: str, accel: str, cpu: str) -> ApxProbe:
    """Start `qemu` under `accel` with `-cpu CPU` (CPU includes +apxf), read back the
    vCPU's apxf and QEMU's warnings, quit; remembered per binary, accelerator and model."""
    return _apx_probe(*stat_key(qemu), accel, cpu)


def apx_probes(qemu: str, accel: str, model: str) -> tuple[ApxProbe, ...]:
    """`-cpu MODEL,+apxf`; where QEMU dropped apxf as conflicting with MPX, also
    `-cpu MODEL,-mpx,+apxf` (what the accelerator does about APX itself)."""
    first = apx_probe(qemu, accel, f"{model},+apxf")
    if first.apxf is False and first.mpx_conflict:
        return first, apx_probe(qemu, accel, f"{model},-mpx,+apxf")
    return (first,)


# --- the reason, from facts --------------------------------------------------------------------

APX_F = "APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)"


def kvm_lacks_apx(kvm) -> list[str]:
    """What KVM lacks for APX guests: KVM_GET_SUPPORTED_CPUID's APX_F, supported XCR0
    bit 19.  `kvm`: a KvmHost (or RecordedKvmHost, or anything with apx_cpu and
    supported_xcr0)."""
    out = []
    if not kvm.apx_cpu:
        out.append(f"KVM_GET_SUPPORTED_CPUID lacks {APX_F}")
    if not kvm.supported_xcr0 >> 19 & 1:
        out.append(f"KVM supported XCR0 {kvm.supported_xcr0:#x} lacks bit 19 (APX)")
    return out


@dataclass
class ApxFacts:
    """What decides whether a QEMU can run an APX guest under one accelerator."""

    version: str                      # "11.1.3"
    apxf: bool                        # `-cpu help` lists apxf
    accel: str                        # "kvm" | "tcg"
    kvm: object | None = None         # KVM's facts (KvmHost-like) under kvm
    probes: tuple[ApxProbe, ...] = field(default_factory=tuple)  # apx_probes(), if measured
    host_cpu: str | None = None       # the host CPU's name, for the KVM reason
    host_cpu_apx: bool | None = None  # the host CPU's own APX_F (CPUID.(7,1).EDX[21]), if known


def apx_reason(facts: ApxFacts) -> str | None:
    """Why this QEMU cannot give its guest APX under this accelerator, naming the missing
    piece itself, or None.  The pieces, each with its own words:

      "host KVM lacks APX: ..."       KVM does not offer APX_F / XCR0 bit 19 (the host's
                                      CPU or kernel, whatever the QEMU)
      "QEMU 10.0.2 is too old ..."    `-cpu help` lists no apxf (QEMU >= 11 needed)
      "TCG cannot emulate APX: ..."   QEMU refuses +apxf under TCG
      "MPX conflict: ..."             QEMU drops apxf because the CPU model has MPX (APX
                                      reuses MPX's XSAVE area) while the model without MPX
                                      would have it
    A QEMU too old under KVM on a host whose KVM lacks APX gets both (host first)."""
    reasons: list[str] = []
    probes = facts.probes
    if facts.accel == "kvm" and facts.kvm is not None:
        lacking = kvm_lacks_apx(facts.kvm)
        if lacking:
            refused = next((p.host_refuses for p in probes if p.host_refuses), None)
            name = f" ({facts.host_cpu})" if facts.host_cpu else ""
            cpu = {False: f"; the CPU{name} lacks APX_F",
                   True: f"; the CPU{name} has APX_F: this kernel's KVM does not offer it"}.get(facts.host_cpu_apx, "")
            said = f" (QEMU -cpu host,+apxf: \"{refused}\")" if refused else ""
            reasons.append(f"host KVM lacks APX: {'; '.join(lacking)}{cpu}{said}")
    if not facts.apxf:
        reasons.append(f"QEMU {facts.version} is too old for APX (`-cpu help` lists no apxf; QEMU >= 11 needed)")
        if facts.accel == "tcg":
            reasons.append("QEMU's TCG does not emulate APX either")
        return "; ".join(reasons)
    if reasons:
        return "; ".join(reasons)
    if not probes:
        return None
    first = probes[0]
    if first.apxf:
        return None
    if first.mpx_conflict:
        without = probes[1] if len(probes) > 1 else None
        conflict = (f"-cpu {first.cpu}: QEMU drops apxf because the model has MPX, whose XSAVE area APX "
                    f"reuses (\"{first.mpx_conflict}\")")
        if without is not None and without.apxf:
            return f"MPX conflict: {conflict}; -cpu {without.cpu} has APX"
        if without is not None and without.tcg_refuses:
            return f"TCG cannot emulate APX: -cpu {without.cpu}: \"{without.tcg_refuses}\" (and {conflict})"
        if without is not None and without.host_refuses:
            return f"host KVM lacks APX: -cpu {without.cpu}: \"{without.host_refuses}\" (and {conflict})"
        return f"MPX conflict: {conflict}" + (f"; -cpu {without.cpu}: {_probe_text(without)}" if without else "")
    if first.tcg_refuses:
        return f"TCG cannot emulate APX: -cpu {first.cpu}: \"{first.tcg_refuses}\""
    if first.host_refuses:
        return f"host KVM lacks APX: -cpu {first.cpu}: \"{first.host_refuses}\""
    return f"QEMU {facts.version} -accel {facts.accel} -cpu {first.cpu}: {_probe_text(first)}"


def _probe_text(p: ApxProbe) -> str:
    if p.error:
        return f"QEMU did not start ({p.error})"
    return "apxf stays off" + (f" ({'; '.join(p.warnings)})" if p.warnings else " (no warning)")
