"""`apx-tests probe` run as a real process: JSON and text agree with independent sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hostfacts import read_cpuinfo

from apx_tests import hostcpu
from apx_tests.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "apx_tests.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def probe_json():
    proc = run_cli("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def probe_text():
    proc = run_cli("probe")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()




def test_json_cpu_matches_proc_cpuinfo(probe_json):
    info = read_cpuinfo()
    cpu = probe_json["cpu"]
    assert cpu["vendor"] == info["vendor_id"]
    assert [cpu["family"], cpu["model"], cpu["stepping"]] == [
        int(info["cpu family"]), int(info["model"]), int(info["stepping"])]
    assert cpu["xcr0"] == hostcpu.xgetbv(0)


def test_json_qemu_matches_qemu(probe_json):
    qemu = shutil.which("qemu-system-x86_64")
    first = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert probe_json["qemu"]["version"] == first.split("version ", 1)[1].split()[0]


def test_text_is_one_fact_per_line(probe_text, probe_json):
    assert all(":" in line for line in probe_text)
    keys = [line.split(":", 1)[0] for line in probe_text]
    assert len(keys) == len(set(keys)), "a fact printed twice"
    info = read_cpuinfo()
    assert probe_text[0].startswith(f"cpu: {info['vendor_id']} family {info['cpu family']} "
                                    f"model {info['model']} stepping {info['stepping']}")
    assert f"host XCR0: {hostcpu.xgetbv(0):#x}" in probe_text
    for name, bank in probe_json["banks"].items():
        want = (f"bank {name}: runnable on KVM" if bank["kvm_runnable"]
                else f"bank {name}: not runnable on KVM: {bank['reason']}")
        assert want in probe_text


def test_text_kvm_lines(probe_text, probe_json):
    kvm = probe_json["kvm"]
    if os.path.exists("/dev/kvm"):
        assert "kvm API version: 12" in probe_text
        assert f"kvm supported XCR0: {kvm['supported_xcr0']:#x}" in probe_text
        assert f"kvm KVM_CAP_XSAVE2 size: {kvm['xsave2_size']}" in probe_text
    else:
        assert any(line.startswith("kvm: unavailable: ") for line in probe_text)


def test_probe_with_missing_qemu_and_kvm(tmp_path):
    proc = run_cli("probe", "--qemu", str(tmp_path / "qemu"), "--kvm", str(tmp_path / "kvm"))
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert f"kvm: unavailable: {tmp_path / 'kvm'}: No such file or directory" in lines
    assert any(ln.startswith("qemu: unavailable: ") and "qemu" in ln for ln in lines)
    assert any(ln.startswith("bank apx: not runnable on KVM: ") and "KVM unavailable" in ln for ln in lines)


def test_main_returns_int(capsys):
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel_release"] == os.uname().release


def test_console_script_installed():
    """The `apx-tests` entry point of pyproject.toml, as installed in this environment."""
    script = os.path.join(os.path.dirname(sys.executable), "apx-tests")
    if not os.path.exists(script):
        pytest.skip(f"not running from an installed venv ({script} missing)")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("apx-tests ")


def test_usage_errors_exit_2():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_cli()
    assert proc.returncode == 2
