"""The human report of a probe (``apx-tests probe``, the plugin's "apx probe" section):
``report_lines(probe)``, one fact a line.  apx_tests.probe gathers the facts; this only
renders them (it imports nothing of the probe: Probe.report_lines() calls it).
"""

from __future__ import annotations


def _hex(value: int | None) -> str:
    return "unknown" if value is None else f"{value:#x}"


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _qemu_lines(q, several: bool) -> list[str]:
    """One QEMU's lines, each keyed by its name (qemu, or qemu10/qemu11 side by side)."""
    n = q.name
    if q.error and q.version is None:
        return [f"{n}: unavailable: {q.error}"]
    ids = f" (case ids {n}-kvm-*, {n}-tcg-*)" if several else ""
    origin = f", from {q.origin}" if q.origin and q.origin != "PATH" and several else ""
    lines = [
        f"{n}: {q.path} version {q.version}{ids}{origin}",
        f"{n} -cpu apxf: {_yes(q.apxf)}",
        f"{n} accelerators: {', '.join(q.accelerators) if q.accelerators is not None else 'unknown'}",
    ]
    if q.kvm_cpu or q.kvm_cpu_why:
        lines.append(f"{n} kvm -cpu: {q.kvm_cpu or 'unknown'} ({q.kvm_cpu_why})")
    for accel, why in (q.apx or {}).items():
        lines.append(f"{n} APX under {accel}: {why}")
    if q.gdb:
        lines.append(f"{n} gdb: {q.gdb} version {q.gdb_version}")
    if q.error:
        lines.append(f"{n} error: {q.error}")
    return lines


def report_lines(p) -> list[str]:
    """The human report of a Probe (apx_tests.probe.Probe), one fact a line."""
    c, k, q, g, l = p.cpu, p.kvm, p.qemu, p.gdb, p.llvm
    lines = [
        f"cpu: {c.vendor} family {c.family} model {c.model} stepping {c.stepping}"
        + (f" ({c.model_name})" if c.model_name else ""),
        f"cpu microcode: {_hex(c.microcode)}",
    ]
    if c.error:
        lines.append(f"cpu error: {c.error}")
    lines += [
        f"cpu APX_F (CPUID.(7,1).EDX[21]): {_yes(c.apx)}",
        f"cpu AVX: {_yes(c.avx)}, AVX512F: {_yes(c.avx512f)}",
        f"host XCR0: {_hex(c.xcr0)}",
        f"host XSAVE size (CPUID 0xD.0 EBX/ECX): {c.xsave_size} / {c.xsave_max_size}",
    ]
    if c.layout is not None:
        comps = ", ".join(f"{n} {v['name']}@{v['offset']}+{v['size']}" if not v.get("supervisor")
                          else f"{n} {v['name']} (supervisor)+{v['size']}" for n, v in c.layout.items())
        lines.append(f"host XSAVE layout (component name@offset+size): {comps}")
    else:
        lines.append(f"host XSAVE layout: unavailable ({c.layout_error})")
    lines.append(f"kernel: {p.kernel_release}")
    if k.present:
        lines += [
            f"kvm: {k.path} present",
            f"kvm API version: {k.api_version}",
            f"kvm supported XCR0: {_hex(k.supported_xcr0)}",
            f"kvm KVM_CAP_XSAVE2 size: {k.xsave2_size}",
            f"kvm supported CPUID APX_F: {_yes(k.apx_cpuid)}",
        ]
        if k.error:
            lines.append(f"kvm error: {k.error}")
    else:
        lines.append(f"kvm: unavailable: {k.error}")
    for q in p.qemus or [q]:
        lines += _qemu_lines(q, several=len(p.qemus) > 1)
    for b in p.side_qemus_broken:
        lines.append(f"side QEMU {b.path}: not used: {b.error}")
    lines.append(f"gdb: {g.path} version {g.version}" if g.version else f"gdb: unavailable: {g.error}")
    if l.version:
        lines.append(f"llvm-mc: {l.path} version {l.version}")
        lines.append(f"llvm-mc knows APX: {_yes(l.apx)}"
                     + (f" (movq %rax, %r16 -> {l.apx_encoding})" if l.apx_encoding else "")
                     + (f" ({l.error})" if l.error else ""))
    else:
        lines.append(f"llvm-mc: unavailable: {l.error}")
    for b in p.banks.values():
        lines.append(f"bank {b.name}: runnable on KVM" if b.kvm_runnable
                     else f"bank {b.name}: not runnable on KVM: {b.reason}")
    return lines
