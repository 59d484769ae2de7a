"""`apx-tests decode` on an image captured from this host's KVM at test time: the
registers a real guest loaded are what decode prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from apx_tests.guests import protocol
from apx_tests.guests.build import build_payload
from apx_tests.kvm.backend import KvmBackend, KvmHost
from apx_tests.xsave import BANKS, XsaveImage


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    host = KvmHost()
    backend = KvmBackend(host)
    bank = next(b for b in backend_banks() if backend.unavailable_reason(b) is None)
    session = backend.start(bank, build_payload(bank.name).code)
    try:
        session.run_to(protocol.STAGE_STARTED)
        session.write_area(protocol.LOAD_AREA, bank.pack(bank.pattern(1)))
        session.run_to(protocol.STAGE_LOADED)
        path = tmp_path_factory.mktemp("decode") / "kvm-xsave2.bin"
        path.write_bytes(session.export_raw())
    finally:
        session.close()
        host.close()
    return bank, path


def backend_banks():
    return [BANKS[name] for name in ("hi16_zmm", "ymm", "xmm")]


def _decode(*args):
    return subprocess.run([sys.executable, "-m", "apx_tests.cli", "decode", *args],
                          capture_output=True, text=True, timeout=60)


def test_decode_shows_the_registers_the_guest_loaded(captured):
    bank, path = captured
    out = _decode(str(path), "--cpuid", "kvm")
    assert out.returncode == 0, out.stderr
    for name, value in bank.pattern(1).items():
        assert f"0x{int.from_bytes(value, 'little'):0{2 * len(value)}x}" in out.stdout, name


def test_decode_expect_names_a_changed_register(captured, tmp_path):
    bank, path = captured
    data = bytearray(path.read_bytes())
    register = bank.registers[5]
    host = KvmHost()
    try:
        image = XsaveImage(host.layout, bytes(data))
    finally:
        host.close()
    value = bytearray(image.read(register.name))
    value[-1] ^= 0xFF
    image.write(register.name, bytes(value))
    other = tmp_path / "changed.bin"
    other.write_bytes(image.to_bytes())
    out = _decode(str(other), "--cpuid", "kvm", "--expect", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert register.name in out.stdout


def test_decode_truncated_capture_is_one_line(captured, tmp_path):
    _, path = captured
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:600])
    out = _decode(str(cut), "--cpuid", "kvm")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and str(cut) in out.stderr
    assert "Traceback" not in out.stderr
