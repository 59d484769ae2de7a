"""Our hand-written KVM ABI against the C headers: a C program prints what gcc knows."""

import ctypes
import shutil
import subprocess

import pytest

from apx_tests.kvm import abi

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in sorted(abi.IOCTLS):
        lines.append(f'  printf("const {name} %llu\\n", (unsigned long long)({name}));')
    for struct in abi.STRUCTS:
        cname = struct.__name__
        lines.append(f'  printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in struct._fields_:
            if field.startswith("padding"):
                continue
            lines.append(f'  printf("offset {cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    # kvm_run: only the fields the VMM reads.
    for field in ("exit_reason", "immediate_exit", "cr8", "apic_base"):
        lines.append(f'  printf("offset kvm_run.{field} %zu\\n", offsetof(struct kvm_run, {field}));')
    for field in ("io", "internal", "fail_entry"):
        lines.append(f'  printf("offset kvm_run.exit.{field} %zu\\n", offsetof(struct kvm_run, {field}));')
    for field in ("direction", "size", "port", "count", "data_offset"):
        lines.append(f'  printf("offset kvm_run_io.{field} %zu\\n", offsetof(struct kvm_run, io.{field}) - offsetof(struct kvm_run, io));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory):
    work = tmp_path_factory.mktemp("kvm_abi")
    (work / "abi.c").write_text(_c_program())
    subprocess.run(["gcc", "-o", str(work / "abi"), str(work / "abi.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(work / "abi")], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        facts[(kind, key)] = int(value)
    return facts


def test_ioctl_numbers_match_header(c_facts):
    ours = {name: value for name, value in abi.IOCTLS.items()}
    theirs = {key: value for (kind, key), value in c_facts.items() if kind == "const"}
    assert ours == theirs


@pytest.mark.parametrize("struct", abi.STRUCTS, ids=lambda s: s.__name__)
def test_struct_size_and_offsets_match_header(c_facts, struct):
    name = struct.__name__
    assert ctypes.sizeof(struct) == c_facts[("size", name)]
    for field, _ in struct._fields_:
        if not field.startswith("padding"):
            assert getattr(struct, field).offset == c_facts[("offset", f"{name}.{field}")], field


def test_kvm_run_fields_match_header(c_facts):
    for field in ("exit_reason", "immediate_exit", "cr8", "apic_base"):
        assert getattr(abi.kvm_run, field).offset == c_facts[("offset", f"kvm_run.{field}")]
    exit_offset = abi.kvm_run.exit.offset
    for field in ("io", "internal", "fail_entry"):
        assert exit_offset + getattr(abi._kvm_run_exit, field).offset == c_facts[("offset", f"kvm_run.exit.{field}")]
    for field in ("direction", "size", "port", "count", "data_offset"):
        assert getattr(abi.kvm_run_io, field).offset == c_facts[("offset", f"kvm_run_io.{field}")]


def test_reference_numbers_from_apx_facts():
    # Independent of gcc: the values the reference sheet lists for the ABI we rely on.
    assert abi.KVM_GET_XSAVE == 0x9000AEA4
    assert abi.KVM_SET_XSAVE == 0x5000AEA5
    assert abi.KVM_GET_XSAVE2 == 0x9000AECF
    assert abi.KVM_GET_XCRS == 0x8188AEA6 and abi.KVM_SET_XCRS == 0x4188AEA7
    assert abi.KVM_GET_REGS == 0x8090AE81 and abi.KVM_SET_REGS == 0x4090AE82
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert abi.KVM_GET_DEVICE_ATTR == 0x4018AEE2
