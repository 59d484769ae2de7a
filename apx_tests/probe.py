"""What this host can do: CPU, XCR0, XSAVE layout, KVM, QEMU, gdb, LLVM, and per bank
whether a KVM scenario can run here or exactly why not.

``probe()`` never raises for a missing or failing tool: every group has an ``error``
field (one line) and the facts it could not learn stay ``None``. ``Probe.to_dict()`` is
JSON-serialisable; ``Probe.report_lines()`` is the human report of ``apx-tests probe``
(rendered by apx_tests.probe_text).  Whether a bank runs on KVM is not derived here: the
KVM backend answers from these facts (``KvmBackend.facts_unavailable``, bank_facts()).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from . import hostcpu
# Re-exported: the requirement and XCR0 texts live in hostcpu, where the KVM backend reads them too.
from .hostcpu import XCR0_BIT_NAMES, CpuidBit, parse_cpuid_requirement, xcr0_bits_text

__all__ = [
    "Probe", "CpuFacts", "KvmFacts", "QemuFacts", "ToolFacts", "LlvmFacts", "BankFacts",
    "probe", "probe_cpu", "probe_kvm", "probe_qemu", "probe_gdb", "probe_llvm", "bank_facts",
    "parse_qemu_version", "parse_gdb_version", "parse_llvm_version", "xcr0_bits_text",
    "parse_cpuid_requirement", "CpuidBit", "find_qemu", "find_llvm_mc", "BANK_ORDER", "XCR0_BIT_NAMES",
]

BANK_ORDER = ("apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87", "pkru")

TOOL_TIMEOUT = 30  # seconds for one external command


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _err(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return _one_line(exc.strerror)  # KvmError(errno, "KVM_...: message"): no "[Errno n]"
    return _one_line(str(exc) or type(exc).__name__)


# --- groups of facts --------------------------------------------------------------------

@dataclass
class CpuFacts:
    vendor: str | None = None
    family: int | None = None
    model: int | None = None
    stepping: int | None = None
    microcode: int | None = None
    model_name: str | None = None
    apx: bool | None = None            # CPUID.(EAX=7,ECX=1):EDX[21] (APX_F)
    avx: bool | None = None            # CPUID.1:ECX[28]
    avx512f: bool | None = None        # CPUID.(EAX=7,ECX=0):EBX[16]
    osxsave: bool | None = None        # CPUID.1:ECX[27]
    xcr0: int | None = None            # XGETBV(0)
    xsave_size: int | None = None      # CPUID.(0xD,0).EBX: standard size for current XCR0
    xsave_max_size: int | None = None  # CPUID.(0xD,0).ECX: standard size for all supported
    xcr0_supported: int | None = None  # CPUID.(0xD,0).EDX:EAX
    layout: dict[str, dict[str, int]] | None = None  # component -> {offset, size}
    layout_error: str | None = None
    error: str | None = None


@dataclass
class KvmFacts:
    path: str = "/dev/kvm"
    present: bool = False
    error: str | None = None
    api_version: int | None = None
    supported_xcr0: int | None = None
    xsave2_size: int | None = None
    apx_cpuid: bool | None = None      # KVM_GET_SUPPORTED_CPUID lists APX_F


@dataclass
class QemuFacts:
    path: str | None = None
    version: str | None = None         # "10.0.2"
    version_line: str | None = None
    apxf: bool | None = None           # `-cpu help` lists the apxf flag
    accelerators: list[str] | None = None
    error: str | None = None
    tag: str = ""                      # what its case ids carry with several QEMUs ("11": qemu11-kvm-...)
    origin: str | None = None          # PATH, --apx-qemu, $APX_QEMU, ci/bootstrap side QEMU
    kvm_cpu: str | None = None         # -cpu of its KVM guests (host, or host,-arch-capabilities)
    kvm_cpu_why: str | None = None     # what a start under -cpu host showed
    apx: dict[str, str] | None = None  # accelerator -> "available" or why not (the missing piece)
    gdb: str | None = None             # the gdb its gdb observer uses, when not PATH's
    gdb_version: str | None = None

    @property
    def name(self) -> str:
        """"qemu", or "qemu11" when several QEMUs run: the prefix of its backends and lines."""
        return f"qemu{self.tag}"


@dataclass
class ToolFacts:
    path: str | None = None
    version: str | None = None
    error: str | None = None


@dataclass
class LlvmFacts:
    path: str | None = None            # llvm-mc
    version: str | None = None
    apx: bool | None = None            # assembles `movq %rax, %r16` to a REX2 (0xd5) encoding
    apx_encoding: str | None = None
    error: str | None = None


@dataclass
class BankFacts:
    name: str
    xcr0_mask: int
    kvm_runnable: bool
    reason: str | None = None          # why not, naming every missing piece


@dataclass
class Probe:
    cpu: CpuFacts
    kernel_release: str
    kvm: KvmFacts
    qemu: QemuFacts
    gdb: ToolFacts
    llvm: LlvmFacts
    banks: dict[str, BankFacts] = field(default_factory=dict)
    qemus: list[QemuFacts] = field(default_factory=list)  # every QEMU of the run; qemu is the first
    side_qemus_broken: list[QemuFacts] = field(default_factory=list)  # ci/bootstrap's, not running

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bank(self, name: str) -> BankFacts:
        try:
            return self.banks[name]
        except KeyError:
            raise KeyError(f"unknown bank {name!r}; known: {', '.join(self.banks)}") from None

    def report_lines(self) -> list[str]:
        from .probe_text import report_lines
        return report_lines(self)


# --- helpers ----------------------------------------------------------------------------

def _run(argv: list[str], stdin: str | None = None, timeout: float | None = None) -> str:
    """Run a tool; return stdout; raise RuntimeError with one line on any failure."""
    timeout = TOOL_TIMEOUT if timeout is None else timeout
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"},
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise RuntimeError(f"{argv[0]}: not found") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)}: timed out after {timeout:g} s") from None
    except OSError as exc:
        raise RuntimeError(f"{argv[0]}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}"
                           + (f": {_one_line(detail[0])}" if detail else ""))
    return proc.stdout


def parse_qemu_version(text: str) -> str | None:
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def parse_gdb_version(text: str) -> str | None:
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.match(r"GNU gdb\b.*?\s(\d+(?:\.\d+)+)\S*\s*$", first)
    return m.group(1) if m else None


def parse_llvm_version(text: str) -> str | None:
    m = re.search(r"LLVM version (\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


# --- probes of one thing each -----------------------------------------------------------

def probe_cpu() -> CpuFacts:
    facts = CpuFacts()
    cpuid = hostcpu.cpuid
    info = hostcpu.cpuinfo_first()
    facts.model_name = info.get("model name")
    facts.microcode = hostcpu.microcode()
    try:
        facts.vendor = hostcpu.vendor()
        leaf1 = cpuid(1, 0)
        facts.family, facts.model, facts.stepping = hostcpu.family_model_stepping(leaf1[0], facts.vendor)
        facts.osxsave = _bit(leaf1[2], 27)
        facts.avx = _bit(leaf1[2], 28)
        max_leaf = cpuid(0, 0)[0]
        if max_leaf >= 7:
            facts.avx512f = _bit(cpuid(7, 0)[1], 16)
            facts.apx = _bit(cpuid(7, 1)[3], 21) if cpuid(7, 0)[0] >= 1 else False
        else:
            facts.avx512f = facts.apx = False
        if facts.osxsave:
            facts.xcr0 = hostcpu.xgetbv(0)
        if max_leaf >= 0xD and _bit(leaf1[2], 26):
            eax, ebx, ecx, edx = cpuid(0xD, 0)
            facts.xsave_size, facts.xsave_max_size = ebx, ecx
            facts.xcr0_supported = eax | edx << 32
    except (hostcpu.HostCpuError, OSError, ValueError) as exc:
        facts.error = _err(exc)
        return facts
    facts.layout, facts.layout_error = _host_layout(cpuid)
    return facts


def _host_layout(cpuid) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    try:
        from .xsave import Layout
    except ImportError as exc:
        return None, f"apx_tests.xsave not importable: {_err(exc)}"
    try:
        layout = Layout.from_cpuid(cpuid)
    except Exception as exc:  # noqa: BLE001 - any layout failure becomes a field
        return None, _err(exc)
    return _layout_dict(layout), None


def _layout_dict(layout) -> dict[str, dict[str, Any]]:
    """component number (as str, for JSON) -> {name, offset, size} of an xsave.Layout."""
    return {str(n): {"name": c.name, "offset": c.offset, "size": c.size, "supervisor": c.supervisor}
            for n, c in sorted(layout.components.items())}


def probe_kvm(path: str = "/dev/kvm") -> KvmFacts:
    facts = KvmFacts(path=path)
    try:
        from .kvm import Kvm, KvmError
    except ImportError as exc:
        facts.error = f"apx_tests.kvm not importable: {_err(exc)}"
        return facts
    try:
        kvm = Kvm.open(path)
    except KvmError as exc:
        facts.error = _err(exc)
        return facts
    facts.present = True
    problems: list[str] = []
    with kvm:
        for name, getter in (("api_version", kvm.api_version), ("supported_xcr0", kvm.supported_xcr0),
                             ("xsave2_size", kvm.xsave2_size)):
            try:
                setattr(facts, name, getter())
            except (KvmError, OSError) as exc:
                problems.append(f"{name}: {_err(exc)}")
        try:
            facts.apx_cpuid = any(e.function == 7 and e.index == 1 and _bit(e.edx, 21)
                                  for e in kvm.supported_cpuid())
        except (KvmError, OSError) as exc:
            problems.append(f"supported_cpuid: {_err(exc)}")
    if problems:
        facts.error = "; ".join(problems)
    return facts


def find_qemu(explicit: str | None = None) -> str | None:
    candidate = explicit or (os.environ.get("APX_QEMU") or "").split(os.pathsep)[0] or "qemu-system-x86_64"
    if os.sep in candidate:
        return candidate
    return shutil.which(candidate)


def probe_qemu(binary: str | None = None) -> QemuFacts:
    facts = QemuFacts()
    path = find_qemu(binary)
    if path is None:
        facts.error = f"{binary or 'qemu-system-x86_64'}: not found in PATH"
        return facts
    facts.path = path
    try:
        out = _run([path, "--version"])
        facts.version_line = out.strip().splitlines()[0] if out.strip() else ""
        facts.version = parse_qemu_version(out)
        if facts.version is None:
            raise RuntimeError(f"{path} --version: no 'QEMU emulator version' in {facts.version_line!r}")
        cpu_help = _run([path, "-cpu", "help"])
        facts.apxf = re.search(r"(?<![\w-])apxf(?![\w-])", cpu_help) is not None
        accel = _run([path, "-accel", "help"])
        lines = [ln.strip() for ln in accel.splitlines() if ln.strip()]
        facts.accelerators = [ln for ln in lines if not ln.endswith(":")]
    except RuntimeError as exc:
        facts.error = _err(exc)
    return facts


def probe_gdb(binary: str = "gdb") -> ToolFacts:
    facts = ToolFacts(path=shutil.which(binary))
    if facts.path is None:
        facts.error = f"{binary}: not found in PATH"
        return facts
    try:
        out = _run([facts.path, "--version"])
        facts.version = parse_gdb_version(out)
        if facts.version is None:
            facts.error = f"{facts.path} --version: unrecognised output {_one_line(out[:80])!r}"
    except RuntimeError as exc:
        facts.error = _err(exc)
    return facts


def find_llvm_mc() -> tuple[str | None, str | None]:
    """(path, problem): the llvm-mc the guest builder would use (apx_tests.guests.build
    decides: $APX_LLVM_MC, then llvm-mc-19 and other LLVM >= 18); if it finds none, the
    llvm-mc that is there anyway (so the report can say what it is), with the reason."""
    try:
        from .guests.build import GuestBuildError, find_llvm_mc as builder_llvm_mc
    except ImportError as exc:
        return shutil.which("llvm-mc-19") or shutil.which("llvm-mc"), \
            f"apx_tests.guests not importable: {_err(exc)}"
    try:
        return builder_llvm_mc(purpose="assemble the APX guest payloads"), None
    except GuestBuildError as exc:
        explicit = os.environ.get("APX_LLVM_MC")
        fallback = (shutil.which(explicit) or explicit) if explicit else shutil.which("llvm-mc")
        return fallback, _err(exc)


def probe_llvm() -> LlvmFacts:
    path, problem = find_llvm_mc()
    facts = LlvmFacts(path=path, error=problem)
    if facts.path is None:
        facts.error = problem or "llvm-mc: not found in PATH (Debian: llvm-19)"
        return facts
    try:
        facts.version = parse_llvm_version(_run([facts.path, "--version"]))
    except RuntimeError as exc:
        facts.error = "; ".join(filter(None, [problem, _err(exc)]))
        return facts
    try:
        out = _run([facts.path, "--triple=x86_64", "--show-encoding"], stdin="movq %rax, %r16\n")
        m = re.search(r"encoding:\s*\[([^\]]*)\]", out)
        facts.apx_encoding = m.group(1) if m else None
        facts.apx = bool(m) and m.group(1).split(",")[0].strip().lower() == "0xd5"
    except RuntimeError as exc:
        # An assembler without APX rejects %r16: that is an answer, not a probe failure.
        facts.apx = False
        facts.apx_encoding = None
        facts.error = "; ".join(filter(None, [problem, f"APX test assembly rejected: {_err(exc)}"]))
    return facts


# --- banks ------------------------------------------------------------------------------

def _banks() -> dict[str, Any]:
    from .xsave import BANKS
    return BANKS


def bank_facts(cpu: CpuFacts, kvm: KvmFacts,
               cpuid: Callable[[int, int], tuple[int, int, int, int]] | None = None
               ) -> dict[str, BankFacts]:
    """Per bank: can a KVM scenario run here, and if not every missing piece: the KVM
    backend's answer from these facts (apx_tests.kvm.backend.KvmBackend.facts_unavailable),
    asked here, not derived."""
    cpuid = cpuid or hostcpu.cpuid
    try:
        banks = _banks()
    except ImportError as exc:
        why = f"apx_tests.xsave not importable: {_err(exc)}"
        return {name: BankFacts(name, 0, False, why) for name in BANK_ORDER}
    try:
        from .kvm.backend import KvmBackend
    except ImportError as exc:
        why = f"apx_tests.kvm not importable: {_err(exc)}"
        return {name: BankFacts(name, banks[name].xcr0_mask if name in banks else 0, False, why)
                for name in BANK_ORDER}
    out: dict[str, BankFacts] = {}
    for name in [n for n in BANK_ORDER if n in banks] + sorted(set(banks) - set(BANK_ORDER)):
        bank = banks[name]
        reason = KvmBackend.facts_unavailable(bank, cpu, kvm, cpuid)
        out[name] = BankFacts(name, bank.xcr0_mask, reason is None, reason)
    return out


# --- QEMUs side by side -----------------------------------------------------------------

class _KvmApx:
    """KvmFacts as apx_tests.qemu.binaries.kvm_lacks_apx reads KVM (apx_cpu, supported_xcr0)."""

    def __init__(self, kvm: KvmFacts):
        self.apx_cpu = bool(kvm.apx_cpuid)
        self.supported_xcr0 = kvm.supported_xcr0 or 0


def probe_qemus(qemu=None, kvm: KvmFacts | None = None, cpu: CpuFacts | None = None,
                gdb: ToolFacts | None = None) -> tuple[list[QemuFacts], list[QemuFacts]]:
    """Every QEMU of a run (`qemu`: None for the default ones -- PATH's QEMU and
    ci/bootstrap's side QEMUs --, a path, or a list), each with its tag, the -cpu of its
    KVM guests and, per accelerator, whether APX can run and what is missing (measured:
    short QEMU starts, remembered per binary); and the side QEMUs that do not run."""
    try:
        from .qemu.binaries import QemuListError, broken_side_qemus, resolve_qemus
    except ImportError as exc:
        return [QemuFacts(error=f"apx_tests.qemu not importable: {_err(exc)}")], []
    try:
        binaries = resolve_qemus(qemu)
    except QemuListError as exc:
        return [QemuFacts(error=_err(exc))], []
    def one(b) -> QemuFacts:
        facts = probe_qemu(b.path if b.version or os.sep in b.path else None if qemu is None else b.path)
        facts.tag, facts.origin = b.tag, b.origin
        if facts.version is not None:
            _qemu_measurements(facts, kvm, cpu, gdb)
        return facts
    # Each QEMU's facts are a handful of short QEMU runs, waited for: the QEMUs side by
    # side are probed at once (about half the probe's time with two).
    with ThreadPoolExecutor(max_workers=max(1, len(binaries))) as pool:
        out = list(pool.map(one, binaries))
    broken = [] if qemu is not None else [
        QemuFacts(path=b.path, error=b.error, origin=b.origin) for b in broken_side_qemus()]
    return out, broken


def _qemu_measurements(facts: QemuFacts, kvm: KvmFacts | None, cpu: CpuFacts | None,
                       gdb: ToolFacts | None) -> None:
    from .qemu.binaries import ApxFacts, apx_probes, apx_reason, kvm_cpu_model, sibling_gdb
    from .qemu.errors import QemuError
    try:
        choice = kvm_cpu_model(facts.path)
        facts.kvm_cpu, facts.kvm_cpu_why = choice.cpu, choice.why
    except QemuError as exc:
        facts.kvm_cpu_why = _err(exc)
    facts.apx = {}
    for accel in ("kvm", "tcg"):
        if facts.accelerators is not None and accel not in facts.accelerators:
            facts.apx[accel] = f"QEMU {facts.version} has no {accel} accelerator"
            continue
        if accel == "kvm" and (kvm is None or not kvm.present):
            facts.apx[accel] = f"KVM unavailable ({kvm.error if kvm else 'not probed'})"
            continue
        model = (facts.kvm_cpu or "host") if accel == "kvm" else "max"
        try:
            probes = apx_probes(facts.path, accel, model) if facts.apxf else ()
        except QemuError as exc:
            facts.apx[accel] = f"not measured: {_err(exc)}"
            continue
        why = apx_reason(ApxFacts(facts.version, bool(facts.apxf), accel,
                                  _KvmApx(kvm) if accel == "kvm" else None, probes,
                                  host_cpu=cpu.model_name if cpu is not None else None,
                                  host_cpu_apx=cpu.apx if cpu is not None else None))
        facts.apx[accel] = why or "available"
    paired = sibling_gdb(facts.path)
    if paired != "gdb":
        facts.gdb = paired
        other = probe_gdb(paired)
        facts.gdb_version = other.version or f"unavailable: {other.error}"


# --- all of it --------------------------------------------------------------------------

def probe(qemu=None, kvm_path: str = "/dev/kvm") -> Probe:
    """`qemu`: None (the default QEMUs: PATH's and ci/bootstrap's side QEMUs), a path,
    or a list of paths (several side by side)."""
    cpu = probe_cpu()
    kvm = probe_kvm(kvm_path)
    with ThreadPoolExecutor(max_workers=2) as pool:  # tool runs, waited for: side by side
        gdb_run, llvm_run = pool.submit(probe_gdb), pool.submit(probe_llvm)
        gdb = gdb_run.result()
        qemus, broken = probe_qemus(qemu, kvm, cpu, gdb)
        llvm = llvm_run.result()
    result = Probe(cpu=cpu, kernel_release=os.uname().release, kvm=kvm, qemu=qemus[0],
                   gdb=gdb, llvm=llvm, qemus=qemus, side_qemus_broken=broken)
    result.banks = bank_facts(cpu, kvm)
    return result


# --- host descriptions: the same facts from data instead of the live host --------------------
# (apx_tests.hostdesc). bank_facts() already takes its CPUID as a function; these build the
# CpuFacts/KvmFacts it needs from a HostDescription, so that skip reasons for hosts we do not
# have (Zen 2, Sapphire Rapids, Diamond Rapids...) are computed by the same code as here.

__all__ += ["cpu_facts_from_cpuid", "cpu_facts_from_description", "kvm_facts_from_description",
            "probe_from_description"]


def cpu_facts_from_cpuid(cpuid: Callable[[int, int], tuple[int, int, int, int]], xcr0: int | None,
                         model_name: str | None = None) -> CpuFacts:
    """``CpuFacts`` as ``probe_cpu`` reads them, from any ``cpuid(leaf, sub)`` and a known XCR0
    (``None``: unknown). Microcode is not part of CPUID and stays ``None``."""
    facts = CpuFacts(model_name=model_name, xcr0=xcr0)
    leaf0, leaf1 = cpuid(0, 0), cpuid(1, 0)
    facts.vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0[1], leaf0[3], leaf0[2])).decode(
        "ascii", "replace")
    facts.family, facts.model, facts.stepping = hostcpu.family_model_stepping(leaf1[0], facts.vendor)
    facts.osxsave = _bit(leaf1[2], 27)
    facts.avx = _bit(leaf1[2], 28)
    if leaf0[0] >= 7:
        facts.avx512f = _bit(cpuid(7, 0)[1], 16)
        facts.apx = _bit(cpuid(7, 1)[3], 21) if cpuid(7, 0)[0] >= 1 else False
    else:
        facts.avx512f = facts.apx = False
    if leaf0[0] >= 0xD and _bit(leaf1[2], 26):
        eax, ebx, ecx, edx = cpuid(0xD, 0)
        facts.xsave_size, facts.xsave_max_size = ebx, ecx
        facts.xcr0_supported = eax | edx << 32
    facts.layout, facts.layout_error = _host_layout(cpuid)
    return facts


def cpu_facts_from_description(desc) -> CpuFacts:
    """The host CPU of an ``apx_tests.hostdesc.HostDescription``."""
    return cpu_facts_from_cpuid(desc.cpuid, desc.host_xcr0, desc.title)


def kvm_facts_from_description(desc) -> KvmFacts:
    """KVM of a ``HostDescription``; a description without KVM reads as /dev/kvm missing."""
    kvm = desc.kvm
    if kvm is None:
        return KvmFacts(path=f"host description {desc.name}", present=False,
                        error=f"host description {desc.name} has no KVM")
    return KvmFacts(path=f"host description {desc.name}", present=True, api_version=kvm.api_version,
                    supported_xcr0=kvm.supported_xcr0, xsave2_size=kvm.xsave2_size, apx_cpuid=kvm.apx_cpu)


def probe_from_description(desc) -> Probe:
    """A ``Probe`` of a described host: CPU, KVM and banks from the description; the tools
    (QEMU, gdb, LLVM) are not part of a host description and say so."""
    cpu = cpu_facts_from_description(desc)
    kvm = kvm_facts_from_description(desc)
    why = f"not part of host description {desc.name}"
    result = Probe(cpu=cpu, kernel_release=f"(host description {desc.name})", kvm=kvm,
                   qemu=QemuFacts(error=why), gdb=ToolFacts(error=why), llvm=LlvmFacts(error=why))
    result.banks = bank_facts(cpu, kvm, desc.cpuid)
    return result
