"""``apx-tests``: the command line of apx_tests.

    apx-tests probe [--json] [--qemu PATH] [--kvm PATH] [--describe-host NAME]
    apx-tests decode FILE [--layout standard|compacted|auto] [--cpuid host|kvm|NAME] [--expect FILE2]

``probe`` reports what this host can do (see docs/probe.md). ``decode`` parses an XSAVE
image (e.g. a KVM_GET_XSAVE2 dump) with the layout of the host CPU, of KVM, or of a saved
reference CPU, prints its header, its components and the registers of each bank it
holds; with ``--expect`` it prints what differs and exits 1 when anything does.
Malformed input is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import __version__

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2


class _CliError(Exception):
    """One line for stderr; exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apx-tests",
        description="x86 extended state (APX R16-R31 and stand-in banks) through KVM and QEMU")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("probe", help="report what this host can do (CPU, XCR0, KVM, QEMU, gdb, LLVM, banks)",
                       description="Report what this host can do, one fact per line (or JSON).")
    p.add_argument("--json", action="store_true", help="print the probe as one JSON object")
    p.add_argument("--qemu", metavar="PATH", help="qemu-system-x86_64 binary (default: $APX_QEMU or PATH)")
    p.add_argument("--kvm", metavar="PATH", default="/dev/kvm", help="KVM device (default: /dev/kvm)")
    p.add_argument("--describe-host", metavar="NAME",
                   help="print this host as a host description (JSON, as tests/hosts/NAME.json): CPUID, "
                        "XCR0 and KVM's facts; see docs/probe.md")
    p.set_defaults(func=_cmd_probe)

    from .xsave import REFERENCE_CPUID  # noqa: PLC0415 - keep `apx-tests --help` import-light

    d = sub.add_parser("decode", help="decode an XSAVE image; with --expect, diff against another",
                       description="Decode an XSAVE image: XSTATE_BV/XCOMP_BV, components present, "
                                   "the registers of each bank present (hex, little-endian values).")
    d.add_argument("file", metavar="FILE", help="the XSAVE image (raw bytes)")
    d.add_argument("--layout", choices=("standard", "compacted", "auto"), default="standard",
                   help="image format (default: standard, as KVM_GET_XSAVE2 returns; "
                        "auto: from XCOMP_BV bit 63)")
    d.add_argument("--cpuid", default="host", metavar="SOURCE",
                   choices=["host", "kvm", *REFERENCE_CPUID],
                   help="where the layout (CPUID leaf 0xD) comes from: host (this CPU, default), "
                        f"kvm (KVM_GET_SUPPORTED_CPUID), or a saved table: {', '.join(REFERENCE_CPUID)}")
    d.add_argument("--expect", metavar="FILE2", help="expected image: print the differences, exit 1 if any")
    d.set_defaults(func=_cmd_decode)
    return parser


# --- probe ------------------------------------------------------------------------------

def _cmd_probe(args: argparse.Namespace) -> int:
    from .probe import probe

    if args.describe_host is not None:
        return _describe_host(args.describe_host, args.kvm)
    result = probe(qemu=args.qemu, kvm_path=args.kvm)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        for line in result.report_lines():
            print(line)
    return EXIT_OK


def _describe_host(name: str, kvm_path: str) -> int:
    from .hostcpu import HostCpuError
    from .hostdesc import HostDescription, HostDescriptionError, record_this_host

    try:
        desc = record_this_host(name, kvm_path=kvm_path)
        # Round-trip through the loader: what is printed is a file `HostDescription.load` accepts.
        desc = HostDescription.from_dict(desc.to_dict(), f"host description {name}")
    except (HostCpuError, HostDescriptionError) as exc:
        raise _CliError(f"--describe-host {name}: {exc}") from None
    sys.stdout.write(desc.to_json())
    return EXIT_OK


# --- decode -----------------------------------------------------------------------------

def _layout(source: str):
    from .xsave import Layout, XsaveError

    try:
        if source == "host":
            from . import hostcpu
            return Layout.from_cpuid(hostcpu.cpuid, "host CPUID")
        if source == "kvm":
            from .kvm import Kvm, KvmError
            try:
                with Kvm.open() as kvm:
                    table = {(e.function, e.index): e.regs for e in kvm.supported_cpuid()}
            except KvmError as exc:
                raise _CliError(f"--cpuid kvm: {exc.strerror or exc}") from None
            return Layout.from_table(table, "KVM_GET_SUPPORTED_CPUID")
        return Layout.reference(source)
    except XsaveError as exc:
        raise _CliError(f"--cpuid {source}: {exc}") from None
    except Exception as exc:  # hostcpu.HostCpuError and the like: one line, no traceback
        raise _CliError(f"--cpuid {source}: {exc}") from None


def _read_image(path: str, layout, fmt: str):
    from .xsave import XsaveImage

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _CliError(f"{path}: {exc.strerror or exc}") from None
    compacted = {"standard": False, "compacted": True, "auto": None}[fmt]
    return XsaveImage(layout, data, compacted=compacted, where=path)


def _bit_names(mask: int) -> str:
    from .xsave import component_name

    names = [f"{n} {component_name(n)}" for n in range(64) if mask >> n & 1]
    return ", ".join(names) if names else "none"


def _banks_shown(image) -> list:
    """Banks whose own (highest) component is present, minus those a wider shown bank covers
    (xmm inside ymm inside zmm_hi256)."""
    from .xsave import BANKS

    shown = [b for b in BANKS.values()
             if all(image.layout.has(c) for c in b.components) and image.present(max(b.components))]
    return [b for b in shown
            if not any(set(b.components) < set(other.components) for other in shown)]


def decode_lines(image) -> list[str]:
    fmt = "compacted" if image.compacted else "standard"
    lines = [
        f"file: {image.where} ({image.size} bytes, {fmt} format, layout from {image.layout.where})",
        f"XSTATE_BV: {image.xstate_bv:#x} ({_bit_names(image.xstate_bv)})",
        f"XCOMP_BV: {image.xcomp_bv:#x}"
        + (f" (compacted; {_bit_names(image.xcomp_bv & ~(1 << 63))})" if image.xcomp_bv >> 63 else ""),
        f"MXCSR: {image.mxcsr:#010x}",
    ]
    present = [f"{c.number} {c.name} @{image.component_offset(c.number)}+{c.size}"
               for c in image.layout.components.values()
               if image.present(c.number) and image.component_offset(c.number) is not None]
    lines.append("components present: " + (", ".join(present) or "none (all in init state)"))
    for bank in _banks_shown(image):
        lines.append(f"bank {bank.name} ({bank.description}):")
        width = max(len(r.name) for r in bank.registers)
        for reg in bank.registers:
            value = int.from_bytes(image.read(reg), "little")
            lines.append(f"  {reg.name:<{width}} = {value:#0{2 + 2 * reg.width}x}")
    return lines


def _cmd_decode(args: argparse.Namespace) -> int:
    from .xsave import XsaveError, diff_images

    try:
        layout = _layout(args.cpuid)
        image = _read_image(args.file, layout, args.layout)
        expected = _read_image(args.expect, layout, args.layout) if args.expect else None
        lines = decode_lines(image)
        differences = diff_images(expected, image) if expected is not None else []
    except XsaveError as exc:  # message starts with the file it is about
        raise _CliError(str(exc)) from None
    for line in lines:
        print(line)
    if expected is None:
        return EXIT_OK
    if not differences:
        print(f"no differences from {args.expect}")
        return EXIT_OK
    print(f"{len(differences)} difference(s) from {args.expect} (want = {args.expect}, got = {args.file}):")
    for d in differences:
        print(f"  {d}")
    return EXIT_DIFFERENT


# --- entry point ------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except _CliError as exc:
        print(f"apx-tests {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `apx-tests probe | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
