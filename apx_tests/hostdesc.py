"""Host descriptions as data: what a machine's CPU, kernel and KVM report, in a JSON file.

The suite was proven on one machine; machines of our kind differ (an AMD EPYC with XCR0
0x7, one with 0x207, an Intel Xeon with AMX whose KVM offers only 0xe7) and lab hosts will
have APX. A ``HostDescription`` holds the facts the probe and the XSAVE layout are computed
from, so that the skip/run decisions and layouts for every such host can be tested here,
on any machine, without that host:

- ``cpuid_table``: ``{(leaf, subleaf): (eax, ebx, ecx, edx)}`` as user space on the host sees
  it (at least leaves 0x0, 0x1, 0x7.0, 0x7.1 and every non-zero sub-leaf of 0xD); the method
  ``cpuid(leaf, sub)`` reads it (zeros when absent), in the form ``hostcpu.cpuid`` has;
- ``host_xcr0``: XGETBV(0), what the host kernel enabled (``None`` when unknown);
- ``kvm``: a ``KvmDescription`` (``None``: no usable /dev/kvm) with ``supported_xcr0``
  (KVM_X86_XCOMP_GUEST_SUPP), ``xsave2_size`` (KVM_CAP_XSAVE2), ``supported_cpuid`` (the same
  dict form, as KVM_GET_SUPPORTED_CPUID reports it) and ``api_version``;
- ``sources``: where each fact came from (a dump, QEMU's model, the SDM, a recording).

The JSON form (``to_dict``/``from_dict``/``load``)::

    {"name": "amd-zen3", "title": "...", "sources": ["..."], "host_xcr0": "0x207",
     "cpuid": {"0x0.0": ["0x00000010", "0x68747541", "0x444d4163", "0x69746e65"], ...,
               "0xd.19": [...]},
     "kvm": {"api_version": 12, "supported_xcr0": "0x207", "xsave2_size": 4096,
             "supported_cpuid": {...}}}

A key is ``LEAF.SUBLEAF``: the leaf in hex, the sub-leaf in decimal, as the project writes
``CPUID.0xD.19`` (``0xd.19`` is APX; ``0xd.0x13`` is accepted for the same). Registers and
masks are hex strings; sizes are integers. Anything malformed raises
``HostDescriptionError``: one line naming the file and the key.

This module is data only: it imports ``apx_tests.xsave`` and ``apx_tests.hostcpu`` lazily,
and ``record_this_host`` (the one function that reads the live machine) and
``KvmDescription.entries()`` (KVM's own ``CpuidEntry``) ``apx_tests.kvm``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = [
    "HostDescription", "KvmDescription", "HostDescriptionError",
    "record_this_host", "load", "parse_cpuid_key", "cpuid_key",
]

Regs = tuple[int, int, int, int]
CpuidTable = dict[tuple[int, int], Regs]

KVM_API_VERSION = 12  # the only KVM API version there has ever been (KVM_GET_API_VERSION)

# Leaves whose sub-leaf (ECX) matters: KVM marks their entries KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
_INDEXED_LEAVES = {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20,
                   0x23, 0x24, 0x29, 0x8000001D, 0x80000020, 0x80000026}

# The leaves a recording keeps: enough for the probe, the banks and the XSAVE layout.
_RECORDED_LEAVES = (0x0, 0x1, 0x7, 0xD)

_TOP_KEYS = {"name", "title", "sources", "cpuid", "host_xcr0", "kvm"}
_KVM_KEYS = {"api_version", "supported_xcr0", "xsave2_size", "supported_cpuid"}
_KEY_RE = re.compile(r"^0x(?P<leaf>[0-9a-fA-F]{1,8})(?:\.(?P<sub>0x[0-9a-fA-F]{1,8}|[0-9]{1,10}))?$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REGS_RE = re.compile(r'\[\s*("0x[0-9a-f]+"),\s*("0x[0-9a-f]+"),\s*("0x[0-9a-f]+"),\s*("0x[0-9a-f]+")\s*\]')


class HostDescriptionError(ValueError):
    """A host description is malformed; str() is one line: ``<file>: <key>: <problem>``."""

    def __init__(self, where: str, key: str, problem: str):
        self.where, self.key, self.problem = where, key, problem
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        super().__init__(" ".join(text.split()))


# --- keys and numbers ---------------------------------------------------------------------

def cpuid_key(leaf: int, sub: int) -> str:
    """``(0xd, 19)`` -> ``"0xd.19"``: leaf in hex, sub-leaf in decimal (``CPUID.0xD.19``)."""
    return f"{leaf:#x}.{sub}"


def parse_cpuid_key(key: str, where: str = "host description", context: str = "cpuid") -> tuple[int, int]:
    """``"0xd.19"`` / ``"0xd.0x13"`` / ``"0x1"`` -> ``(leaf, subleaf)``."""
    m = _KEY_RE.match(key) if isinstance(key, str) else None
    if not m:
        raise HostDescriptionError(where, f"{context}.{key}",
                                   "a CPUID key is 0xLEAF.SUBLEAF (leaf hex, sub-leaf decimal, e.g. 0xd.19)")
    sub = m.group("sub") or "0"
    return int(m.group("leaf"), 16), int(sub, 0)


def _number(value: Any, where: str, key: str, bits: int) -> int:
    """A JSON number or "0x..." string within ``bits`` bits."""
    if isinstance(value, bool):
        raise HostDescriptionError(where, key, f"expected a number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value.strip()):
        n = int(value, 16)
    else:
        raise HostDescriptionError(where, key, f"expected an integer or a \"0x...\" hex string, got {value!r}")
    if not 0 <= n < 1 << bits:
        raise HostDescriptionError(where, key, f"{value!r} does not fit in {bits} bits")
    return n


def _hex32(value: int) -> str:
    return f"{value:#010x}"


def _table_from_json(raw: Any, where: str, context: str) -> CpuidTable:
    if not isinstance(raw, dict):
        raise HostDescriptionError(where, context, f"expected an object of \"0xLEAF.SUBLEAF\": [eax, ebx, ecx, edx], "
                                                   f"got {type(raw).__name__}")
    table: CpuidTable = {}
    for key, regs in raw.items():
        leaf_sub = parse_cpuid_key(key, where, context)
        path = f"{context}.{key}"
        if leaf_sub in table:
            raise HostDescriptionError(where, path, f"CPUID {cpuid_key(*leaf_sub)} is given twice")
        if not isinstance(regs, list) or len(regs) != 4:
            raise HostDescriptionError(where, path, f"expected [eax, ebx, ecx, edx] (4 values), got {regs!r}")
        table[leaf_sub] = tuple(_number(v, where, f"{path}[{i}]", 32) for i, v in enumerate(regs))  # type: ignore
    return dict(sorted(table.items()))


def _table_to_json(table: Mapping[tuple[int, int], Regs]) -> dict[str, list[str]]:
    return {cpuid_key(leaf, sub): [_hex32(r) for r in regs] for (leaf, sub), regs in sorted(table.items())}


def _lookup(table: Mapping[tuple[int, int], Regs], leaf: int, sub: int) -> Regs:
    return tuple(table.get((leaf, sub), (0, 0, 0, 0)))  # type: ignore[return-value]


# --- the descriptions --------------------------------------------------------------------

@dataclass
class KvmDescription:
    """What KVM on a host reports to user space (the probe's KVM facts, as data).

    ``supported_cpuid`` is a dict ``{(function, index): (eax, ebx, ecx, edx)}`` — the entries of
    KVM_GET_SUPPORTED_CPUID (``entries()`` gives them as a list with KVM's attribute names).
    ``supported_xcr0`` is KVM_GET_DEVICE_ATTR(KVM_X86_XCOMP_GUEST_SUPP): not filtered by the
    caller's AMX permission, unlike leaf 0xD of ``supported_cpuid`` and ``xsave2_size``.
    """

    supported_xcr0: int
    xsave2_size: int
    supported_cpuid: CpuidTable = field(default_factory=dict)
    api_version: int = KVM_API_VERSION

    def cpuid(self, leaf: int, sub: int = 0) -> Regs:
        """The supported-CPUID entry (leaf, sub); zeros when KVM lists none."""
        return _lookup(self.supported_cpuid, leaf, sub)

    @property
    def apx_cpu(self) -> bool:
        """KVM's supported CPUID lists APX_F: CPUID.(EAX=7,ECX=1):EDX[21]."""
        return bool(self.cpuid(7, 1)[3] >> 21 & 1)

    def entries(self):
        """``supported_cpuid`` as KVM_GET_SUPPORTED_CPUID's entries (``apx_tests.kvm.system.CpuidEntry``)."""
        from .kvm.abi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        from .kvm.system import CpuidEntry
        return [CpuidEntry(leaf, sub, KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in _INDEXED_LEAVES else 0, *regs)
                for (leaf, sub), regs in sorted(self.supported_cpuid.items())]

    def layout(self, source: str = "KVM_GET_SUPPORTED_CPUID"):
        """The XSAVE layout of KVM's leaf 0xD (``apx_tests.xsave.Layout``)."""
        from .xsave import Layout
        return Layout.from_cpuid(self.cpuid, source)

    def to_dict(self) -> dict[str, Any]:
        return {"api_version": self.api_version, "supported_xcr0": f"{self.supported_xcr0:#x}",
                "xsave2_size": self.xsave2_size, "supported_cpuid": _table_to_json(self.supported_cpuid)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "host description", context: str = "kvm") -> "KvmDescription":
        if not isinstance(data, dict):
            raise HostDescriptionError(where, context, f"expected an object or null, got {type(data).__name__}")
        _check_keys(data, _KVM_KEYS, {"supported_xcr0", "xsave2_size", "supported_cpuid"}, where, context)
        return cls(
            supported_xcr0=_number(data["supported_xcr0"], where, f"{context}.supported_xcr0", 64),
            xsave2_size=_number(data["xsave2_size"], where, f"{context}.xsave2_size", 32),
            supported_cpuid=_table_from_json(data["supported_cpuid"], where, f"{context}.supported_cpuid"),
            api_version=_number(data.get("api_version", KVM_API_VERSION), where, f"{context}.api_version", 32),
        )


@dataclass
class HostDescription:
    """One host: its CPUID, the XCR0 its kernel enabled, its KVM, and where each fact came from."""

    name: str
    title: str
    sources: list[str]
    cpuid_table: CpuidTable
    host_xcr0: int | None = None
    kvm: KvmDescription | None = None
    where: str = field(default="", compare=False)  # the file it was loaded from, for messages

    def __post_init__(self) -> None:
        self.cpuid_table = dict(sorted(self.cpuid_table.items()))
        if not self.where:
            self.where = f"host description {self.name}"

    # CPUID as a callable, the form hostcpu.cpuid, Layout.from_cpuid and probe.bank_facts take.
    def cpuid(self, leaf: int, sub: int = 0) -> Regs:
        """CPUID (leaf, sub) as the host's user space sees it; zeros when not described."""
        return _lookup(self.cpuid_table, leaf, sub)

    @property
    def vendor(self) -> str:
        _, ebx, ecx, edx = self.cpuid(0, 0)
        return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode("ascii", "replace")

    @property
    def family_model_stepping(self) -> tuple[int, int, int]:
        from .hostcpu import family_model_stepping
        return family_model_stepping(self.cpuid(1, 0)[0], self.vendor)

    @property
    def apx_cpu(self) -> bool:
        """APX_F (CPUID.(7,1):EDX[21]) where leaf 7 has sub-leaf 1 (CPUID.(7,0):EAX >= 1)."""
        return self.cpuid(0, 0)[0] >= 7 and self.cpuid(7, 0)[0] >= 1 and bool(self.cpuid(7, 1)[3] >> 21 & 1)

    @property
    def supported_xcr0(self) -> int:
        """CPUID.(0xD,0) EDX:EAX: the user components the CPU supports."""
        eax, _, _, edx = self.cpuid(0xD, 0)
        return eax | edx << 32

    def layout(self):
        """The host's XSAVE layout (``apx_tests.xsave.Layout.from_cpuid`` over ``cpuid``)."""
        from .xsave import Layout
        return Layout.from_cpuid(self.cpuid, f"{self.where} cpuid")

    # --- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "sources": list(self.sources),
            "host_xcr0": None if self.host_xcr0 is None else f"{self.host_xcr0:#x}",
            "cpuid": _table_to_json(self.cpuid_table),
            "kvm": None if self.kvm is None else self.kvm.to_dict(),
        }

    def to_json(self) -> str:
        """``to_dict`` as JSON text, one CPUID entry per line (the form of tests/hosts/*.json)."""
        text = json.dumps(self.to_dict(), indent=2)
        # json.dumps puts each register on its own line; one entry per line reads like a dump.
        return _REGS_RE.sub(lambda m: "[" + ", ".join(m.group(i) for i in range(1, 5)) + "]", text) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "host description", *, validate: bool = True) -> "HostDescription":
        """Build and check a description; ``validate`` also reads both XSAVE layouts so that a
        leaf 0xD that the layout model rejects (overlaps, APX with MPX...) fails here, naming
        the file, instead of in whatever test uses it later."""
        if not isinstance(data, dict):
            raise HostDescriptionError(where, "", f"expected a JSON object, got {type(data).__name__}")
        _check_keys(data, _TOP_KEYS, {"name", "title", "sources", "cpuid"}, where, "")
        name, title, sources = data["name"], data["title"], data["sources"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise HostDescriptionError(where, "name", f"expected a lower-case name like amd-zen3, got {name!r}")
        if not isinstance(title, str) or not title.strip():
            raise HostDescriptionError(where, "title", f"expected a non-empty string, got {title!r}")
        if not isinstance(sources, list) or not sources:
            raise HostDescriptionError(where, "sources", "expected a non-empty list saying where each fact came from")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s.strip():
                raise HostDescriptionError(where, f"sources[{i}]", f"expected a non-empty string, got {s!r}")
        xcr0 = data.get("host_xcr0")
        kvm = data.get("kvm")
        desc = cls(
            name=name, title=title, sources=list(sources),
            cpuid_table=_table_from_json(data["cpuid"], where, "cpuid"),
            host_xcr0=None if xcr0 is None else _number(xcr0, where, "host_xcr0", 64),
            kvm=None if kvm is None else KvmDescription.from_dict(kvm, where, "kvm"),
            where=where,
        )
        if validate:
            desc.validate()
        return desc

    def validate(self) -> None:
        """Cross-field checks; each failure is a ``HostDescriptionError`` naming the key."""
        from .xsave import XsaveError

        for leaf in (0x0, 0x1):
            if (leaf, 0) not in self.cpuid_table:
                raise HostDescriptionError(self.where, f"cpuid.{cpuid_key(leaf, 0)}",
                                           "missing (vendor and family/model/stepping come from it)")
        try:
            self.layout()
        except XsaveError as exc:
            raise HostDescriptionError(self.where, "cpuid", f"leaf 0xD: {exc.problem}") from None
        if self.host_xcr0 is not None:
            if not self.host_xcr0 & 1:
                raise HostDescriptionError(self.where, "host_xcr0", f"{self.host_xcr0:#x} lacks bit 0 (x87), "
                                                                    "which XCR0 always has")
            extra = self.host_xcr0 & ~self.supported_xcr0
            if extra:
                raise HostDescriptionError(
                    self.where, "host_xcr0", f"{self.host_xcr0:#x} enables {extra:#x}, which CPUID.(0xD,0) "
                                             f"EDX:EAX {self.supported_xcr0:#x} does not support")
        if self.kvm is not None:
            try:
                self.kvm.layout(f"{self.where} kvm.supported_cpuid")
            except XsaveError as exc:
                raise HostDescriptionError(self.where, "kvm.supported_cpuid", f"leaf 0xD: {exc.problem}") from None
            if self.kvm.xsave2_size < 4096:
                raise HostDescriptionError(self.where, "kvm.xsave2_size",
                                           f"{self.kvm.xsave2_size} is below 4096, the size of struct kvm_xsave")

    @classmethod
    def load(cls, path: str | os.PathLike, *, validate: bool = True) -> "HostDescription":
        where = os.fspath(path)
        try:
            with open(where, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise HostDescriptionError(where, "", exc.strerror or str(exc)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HostDescriptionError(where, "", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
                from None
        return cls.from_dict(data, where, validate=validate)

    @classmethod
    def record_this_host(cls, name: str, title: str | None = None, **kwargs) -> "HostDescription":
        """``record_this_host`` (the module function): a description of the live machine."""
        return record_this_host(name, title, **kwargs)


def load(path: str | os.PathLike) -> HostDescription:
    return HostDescription.load(path)


def _check_keys(data: dict, allowed: set[str], required: set[str], where: str, context: str) -> None:
    prefix = f"{context}." if context else ""
    for key in data:
        if key not in allowed:
            raise HostDescriptionError(where, f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in data:
            raise HostDescriptionError(where, f"{prefix}{key}", "missing")


# --- recording the live host ---------------------------------------------------------------

def _recorded_subleaves(cpuid, leaf: int, max_leaf: int) -> Iterable[int]:
    """Which sub-leaves of ``leaf`` a recording keeps."""
    if leaf > max_leaf:
        return ()
    if leaf == 7:
        return range(0, min(cpuid(7, 0)[0], 15) + 1)  # 7.0 EAX: the highest sub-leaf
    if leaf == 0xD:
        return range(0, 64)  # one sub-leaf per XSAVE component; zero ones are dropped
    return (0,)


def _without_apic_id(leaf: int, regs: Regs) -> Regs:
    """Leaf 1 EBX[31:24] is the initial APIC ID of whichever CPU ran CPUID: noise in a recording
    (two recordings of one host would differ), so it is written as 0."""
    if leaf != 1:
        return regs
    eax, ebx, ecx, edx = regs
    return (eax, ebx & 0x00FFFFFF, ecx, edx)


def read_cpuid_table(cpuid, leaves: Iterable[int] = _RECORDED_LEAVES) -> CpuidTable:
    """The recorded leaves through ``cpuid(leaf, sub)``; all-zero sub-leaves (other than .0) are left out,
    since ``HostDescription.cpuid`` answers zeros for them anyway."""
    max_leaf = cpuid(0, 0)[0]
    table: CpuidTable = {}
    for leaf in leaves:
        for sub in _recorded_subleaves(cpuid, leaf, max_leaf):
            regs = _without_apic_id(leaf, tuple(int(r) & 0xFFFFFFFF for r in cpuid(leaf, sub)))
            if sub == 0 or any(regs):
                table[(leaf, sub)] = regs  # type: ignore[assignment]
    return table


def _record_kvm(path: str) -> tuple[KvmDescription | None, str]:
    """(KVM facts, what was read or why not): None when /dev/kvm does not open."""
    from .kvm.system import Kvm, KvmError

    try:
        kvm = Kvm.open(path)
    except KvmError as exc:
        return None, f"KVM: none ({exc.strerror or exc})"
    with kvm:
        try:
            entries = kvm.supported_cpuid()
            desc = KvmDescription(supported_xcr0=kvm.supported_xcr0(), xsave2_size=kvm.xsave2_size(),
                                  supported_cpuid={}, api_version=kvm.api_version())
        except KvmError as exc:  # opened, but a query failed: no half-filled KVM description
            return None, f"KVM: none ({path} opened, but {exc.strerror or exc})"
        for e in entries:
            if e.function in _RECORDED_LEAVES and (e.index == 0 or any(e.regs)):
                desc.supported_cpuid[(e.function, e.index)] = _without_apic_id(e.function, e.regs)
    return desc, (f"KVM facts from {path}: KVM_GET_SUPPORTED_CPUID (leaves 0x0, 0x1, 0x7, 0xD), "
                  "KVM_GET_DEVICE_ATTR(KVM_X86_XCOMP_GUEST_SUPP), KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on a VM, "
                  "KVM_GET_API_VERSION; this process did not ask ARCH_REQ_XCOMP_GUEST_PERM, so AMX is filtered "
                  "from leaf 0xD and from the XSAVE2 size")


def record_this_host(name: str, title: str | None = None, *, kvm_path: str = "/dev/kvm",
                     date: str | None = None) -> HostDescription:
    """Describe the machine this runs on: host CPUID (leaves 0x0, 0x1, 0x7.*, 0xD.*), XGETBV(0)
    and, when ``kvm_path`` opens, KVM's facts. Raises ``hostcpu.HostCpuError`` off x86-64."""
    from . import hostcpu

    table = read_cpuid_table(hostcpu.cpuid)
    xcr0 = hostcpu.xgetbv(0) if hostcpu.osxsave() else None
    vendor = hostcpu.vendor()
    family, model, stepping = hostcpu.family_model_stepping(table[(1, 0)][0], vendor)
    info = hostcpu.cpuinfo_first()
    microcode = hostcpu.microcode()
    if title is None:
        title = (f"{info.get('model name') or vendor} ({vendor} family {family} model {model} "
                 f"stepping {stepping})")
    kvm, kvm_note = _record_kvm(kvm_path)
    when = date or datetime.date.today().isoformat()
    sources = [
        f"recorded on {when} on a machine of our kind with `apx-tests probe --describe-host {name}`: "
        f"CPUID through apx_tests.hostcpu, XGETBV(0) for host_xcr0 (kernel {os.uname().release}"
        + (f", microcode {microcode:#x}" if microcode is not None else "") + ")",
        kvm_note,
    ]
    return HostDescription(name=name, title=title, sources=sources, cpuid_table=table, host_xcr0=xcr0, kvm=kvm)
