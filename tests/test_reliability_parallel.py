"""Parallel safety: the shipped `-m apx` suite under pytest-xdist (`-n 2`) gives the same
outcome for every case as a plain run, and nothing two workers run shares a port or a path.

Time-bounded: every KVM case (all banks) plus the qemu-tcg cases of the ymm bank, once
serially and once on two workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apx_tests.guests import boot
from apx_tests.guests.build import build_payload
from apx_tests.qemu.host import QemuHost
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.spec import MachineSpec, temp_prefix

REPO = Path(__file__).resolve().parents[1]
SELECTION = ["-m", "apx", "--apx-backend", "kvm", "--apx-backend", "qemu-tcg", "-k", "not qemu or ymm"]


def outcomes(junit: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return out


def run_suite(tmp_path: Path, name: str, *extra: str) -> dict[str, str]:
    junit = tmp_path / f"{name}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           str(REPO / "apx_tests" / "suite" / "test_scenarios.py"), *SELECTION,
                           f"--junitxml={junit}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    return outcomes(junit)


def test_two_workers_give_the_same_outcomes(tmp_path):
    pytest.importorskip("xdist", reason="pytest-xdist is in the [test] extra (ci/bootstrap installs it)")
    serial = run_suite(tmp_path, "serial")
    parallel = run_suite(tmp_path, "parallel", "-n", "2")
    assert serial, "no case ran"
    assert list(serial.values()).count("passed") >= 10, serial
    assert parallel == serial, {k: (serial.get(k), parallel.get(k))
                                for k in serial.keys() | parallel.keys() if serial.get(k) != parallel.get(k)}


def test_machines_share_no_port_and_no_path():
    """Every socket a QEMU uses is a Unix socket in its own 0700 directory named after our
    pid; nothing listens on TCP; the only shared paths are read-only inputs (the boot
    image, qboot)."""
    try:
        host = QemuHost("tcg")
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    image = boot.build_boot_image(build_payload("ymm").code)
    spec = MachineSpec.create(accel="tcg", kernel=image.path, qemu=host.qemu)
    workdir = f"/dev/shm/{temp_prefix()}x"
    argv = spec.argv(workdir, incoming=f"file:{workdir}/state-1.mig")
    text = " ".join(argv)
    for word in ("tcp:", "host=", "port=", "localhost", "127.0.0.1", "0.0.0.0", ":1234", "vnc", "spice"):
        assert word not in text, (word, argv)
    paths = [p for a in argv for p in a.replace(",", " ").replace("=", " ").split() if p.startswith("/")]
    shared = {p for p in paths if not p.startswith(workdir)}
    assert shared <= {spec.qemu, spec.bios, spec.kernel}, shared
    assert temp_prefix() == f"apx-qemu-{os.getpid()}-"
    host.close()
