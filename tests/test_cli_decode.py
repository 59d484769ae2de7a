"""`apx-tests decode` on real image files: values printed, diffs, and malformed input
(one line on stderr, exit 2, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from apx_tests import hostcpu
from apx_tests.cli import main
from apx_tests.xsave import BANKS, Layout, XsaveImage

APX = Layout.reference("intel-apx")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "apx_tests.cli", "decode", *map(str, args)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def registers(stdout: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 16) for m in re.finditer(r"^  (\w+)\s+= 0x([0-9a-f]+)$", stdout, re.M)}


def le(value: bytes) -> int:
    return int.from_bytes(value, "little")


@pytest.fixture
def apx_image(tmp_path):
    image = XsaveImage.build(APX, {})
    image.write_registers(BANKS["apx"].pattern(1))
    image.write_registers(BANKS["hi16_zmm"].pattern(1))
    path = tmp_path / "apx.xsave"
    path.write_bytes(image.to_bytes())
    return path, image


def test_decode_prints_header_components_and_registers(apx_image):
    path, image = apx_image
    proc = run_cli(path, "--cpuid", "intel-apx")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"XSTATE_BV: {1 << 19 | 1 << 7:#x} (7 hi16_zmm, 19 apx)" in out
    assert "XCOMP_BV: 0x0\n" in out
    assert "components present: 7 hi16_zmm @1664+1024, 19 apx @960+128" in out
    regs = registers(out)
    pattern = BANKS["apx"].pattern(1) | BANKS["hi16_zmm"].pattern(1)
    assert regs == {name: le(value) for name, value in pattern.items()}
    assert "bank ymm" not in out and "bank x87" not in out  # init state: not shown


def test_decode_shows_the_widest_bank_only(tmp_path):
    image = XsaveImage.build(APX, {})
    image.write_registers(BANKS["zmm_hi256"].pattern(2))
    path = tmp_path / "zmm.xsave"
    path.write_bytes(image.to_bytes())
    out = run_cli(path, "--cpuid", "intel-apx").stdout
    assert "bank zmm_hi256" in out and "bank ymm" not in out and "bank xmm " not in out
    assert registers(out)["zmm7"] == le(BANKS["zmm_hi256"].pattern(2)["zmm7"])


def test_decode_with_host_layout(tmp_path):
    layout = Layout.from_cpuid(hostcpu.cpuid)
    image = XsaveImage.build(layout, {}, size=4096)
    image.write_registers(BANKS["xmm"].pattern(3))
    path = tmp_path / "host.xsave"
    path.write_bytes(image.to_bytes())
    proc = run_cli(path)  # default: --cpuid host --layout standard
    assert proc.returncode == 0, proc.stderr
    assert "layout from host CPUID" in proc.stdout
    assert registers(proc.stdout)["xmm9"] == le(BANKS["xmm"].pattern(3)["xmm9"])


def test_decode_compacted(tmp_path):
    image = XsaveImage.build(APX, {}, compacted=True, xcomp_bv=(1 << 63) | (1 << 19) | 0x3)
    image.write_registers(BANKS["apx"].pattern(4))
    path = tmp_path / "compacted.xsave"
    path.write_bytes(image.to_bytes())
    for layout in ("compacted", "auto"):
        proc = run_cli(path, "--cpuid", "intel-apx", "--layout", layout)
        assert proc.returncode == 0, proc.stderr
        assert "compacted format" in proc.stdout
        assert "19 apx @576+128" in proc.stdout
        assert registers(proc.stdout)["r31"] == le(BANKS["apx"].pattern(4)["r31"])


def test_expect_identical_exits_0(apx_image, tmp_path):
    path, image = apx_image
    twin = tmp_path / "twin.xsave"
    twin.write_bytes(image.to_bytes())
    proc = run_cli(path, "--cpuid", "intel-apx", "--expect", twin)
    assert proc.returncode == 0
    assert f"no differences from {twin}" in proc.stdout


def test_expect_different_prints_diff_and_exits_1(apx_image, tmp_path):
    path, image = apx_image
    got = image.copy()
    got.write("r20", (0xDEAD).to_bytes(8, "little"))
    got_path = tmp_path / "got.xsave"
    got_path.write_bytes(got.to_bytes())
    proc = run_cli(got_path, "--cpuid", "intel-apx", "--expect", path)
    assert proc.returncode == 1, proc.stderr
    diff = proc.stdout.split("difference(s) from", 1)[1].splitlines()[1:]
    assert len(diff) == 1 and diff[0].startswith("  apx r20 bytes 0..7: want 0x")
    assert "got 0xadde000000000000" in diff[0]


def test_expect_init_state_equals_zeros(tmp_path):
    """XSTATE_BV[19]=1 with zeros is the same state as XSTATE_BV[19]=0 (QEMU's gdbstub)."""
    zeros = XsaveImage.build(APX, {"apx": bytes(128)})
    init = XsaveImage.build(APX, {})
    (tmp_path / "z").write_bytes(zeros.to_bytes())
    (tmp_path / "i").write_bytes(init.to_bytes())
    assert run_cli(tmp_path / "z", "--cpuid", "intel-apx", "--expect", tmp_path / "i").returncode == 0


# --- malformed input: one line, exit 2 -------------------------------------------------

def _valid(size=None) -> bytearray:
    return bytearray(XsaveImage.build(APX, {}).to_bytes() if size is None else bytes(size))


def _malformed():
    reserved = _valid()
    reserved[530] = 1
    xcomp = _valid()
    xcomp[520:528] = ((1 << 63) | 3).to_bytes(8, "little")
    truncated = XsaveImage.build(APX, {})
    truncated.write_registers(BANKS["hi16_zmm"].pattern(0))
    unsupported = _valid()
    unsupported[512:520] = (1 << 3).to_bytes(8, "little")  # MPX BNDREGS: not in this layout's XCR0
    mpx_and_apx = _valid()
    mpx_and_apx[512:520] = ((1 << 19) | (1 << 3)).to_bytes(8, "little")
    return {
        "empty": (b"", "buffer is 0 bytes, needs at least 576"),
        "short-header": (bytes(600)[:560], "buffer is 560 bytes"),
        "truncated": (truncated.to_bytes()[:2000], "buffer is 2000 bytes, layout needs 2688"),
        "reserved-header-bits": (bytes(reserved), "byte 530 is 0x01"),
        "xcomp-bv-in-standard": (bytes(xcomp), "XCOMP_BV is 0x8000000000000003 in a standard-format image"),
        "unsupported-component": (bytes(unsupported), "XSTATE_BV bit 3 (bndregs) is not in the supported XCR0"),
        "mpx-and-apx": (bytes(mpx_and_apx), "APX (bit 19) with MPX"),
    }


@pytest.mark.parametrize("name", list(_malformed()))
def test_malformed_file_one_line_exit_2(tmp_path, name):
    data, message = _malformed()[name]
    path = tmp_path / f"{name}.xsave"
    path.write_bytes(data)
    proc = run_cli(path, "--cpuid", "intel-apx", "--layout", "standard")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"apx-tests decode: {path}: ")
    assert message in lines[0]


def test_malformed_expect_file_names_that_file(apx_image, tmp_path):
    path, _ = apx_image
    bad = tmp_path / "bad-expect.xsave"
    bad.write_bytes(b"\0" * 100)
    proc = run_cli(path, "--cpuid", "intel-apx", "--expect", bad)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"apx-tests decode: {bad}: buffer is 100 bytes, needs at least 576 "
                                        "(legacy region 512 + XSAVE header 64)"]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file_one_line_exit_2(tmp_path, kind):
    path = tmp_path / "nothing" if kind == "missing" else tmp_path
    proc = run_cli(path)
    assert proc.returncode == 2
    want = "No such file or directory" if kind == "missing" else "Is a directory"
    assert proc.stderr.splitlines() == [f"apx-tests decode: {path}: {want}"]


def test_unknown_cpuid_source_is_a_usage_error(apx_image):
    path, _ = apx_image
    proc = run_cli(path, "--cpuid", "pentium-pro")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_decode_with_kvm_layout(tmp_path):
    import os
    if not os.path.exists("/dev/kvm"):
        proc = run_cli(tmp_path / "x", "--cpuid", "kvm")
        assert proc.returncode == 2 and proc.stderr.startswith("apx-tests decode: --cpuid kvm: ")
        return
    from apx_tests.kvm import Kvm
    with Kvm.open() as kvm:
        table = {(e.function, e.index): e.regs for e in kvm.supported_cpuid()}
        size = kvm.xsave2_size()
    image = XsaveImage.build(Layout.from_table(table), {}, size=size)
    image.write_registers(BANKS["x87"].pattern(0))
    path = tmp_path / "kvm.xsave"
    path.write_bytes(image.to_bytes())
    proc = run_cli(path, "--cpuid", "kvm")
    assert proc.returncode == 0, proc.stderr
    assert "layout from KVM_GET_SUPPORTED_CPUID" in proc.stdout
    assert registers(proc.stdout)["st3"] == le(BANKS["x87"].pattern(0)["st3"])


def test_main_in_process(apx_image, capsys):
    path, _ = apx_image
    assert main(["decode", str(path), "--cpuid", "intel-apx"]) == 0
    assert "bank apx" in capsys.readouterr().out
    assert main(["decode", str(path) + ".missing"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
