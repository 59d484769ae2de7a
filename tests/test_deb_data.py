"""Kernel packages read with dpkg-deb (apx_tests.guests.linux_kernel.DebData), by the
Linux-guest kernel fetch (extract_kernel) and the kernel under test (kut.kernel.unpack_deb):
real .deb files built here with dpkg-deb --build; bad ones give one line naming the file,
and no dpkg-deb is left behind."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from apx_tests import procfs
from apx_tests.guests.linux_kernel import DebData, KernelUnavailable, extract_kernel
from apx_tests.kut.kernel import KernelError, unpack_deb

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb (not a Debian host)")

# A bzImage needs "HdrS" at 0x202 to pass check_kernel_image; the rest is never booted here
# (incompressible, so a cut .deb ends inside it).
FAKE_BZIMAGE = bytes(0x202) + b"HdrS" + random.Random(7).randbytes(200000)


def build_deb(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"{name}.root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: apx_tests <apx@example.org>\n"
        f"Description: test package\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    deb = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def no_dpkg_deb_left():
    return [p.pid for p in procfs.descendants() if p.comm.startswith("dpkg-deb")] == []


KERNEL_FILES = {"boot/vmlinuz-9.9.9-test": FAKE_BZIMAGE, "boot/config-9.9.9-test": b"CONFIG_KVM=m\n",
                "lib/modules/9.9.9-test/modules.order": b"kernel/arch/x86/kvm/kvm.ko\n"}


def test_extract_kernel_takes_boot_only(tmp_path):
    deb = build_deb(tmp_path, "linux-image-test", KERNEL_FILES)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract_kernel(deb, dest) == dest / "vmlinuz-9.9.9-test"
    assert (dest / "vmlinuz-9.9.9-test").read_bytes() == FAKE_BZIMAGE
    assert (dest / "config-9.9.9-test").read_bytes() == b"CONFIG_KVM=m\n"
    assert sorted(p.name for p in dest.iterdir()) == ["config-9.9.9-test", "vmlinuz-9.9.9-test"]
    assert no_dpkg_deb_left()


def test_a_package_without_a_kernel(tmp_path):
    deb = build_deb(tmp_path, "not-a-kernel", {"usr/share/doc/x/README": b"hello\n"})
    with pytest.raises(KernelUnavailable) as err:
        extract_kernel(deb, tmp_path)
    assert str(err.value) == "cannot unpack not-a-kernel.deb: no boot/vmlinuz-* in it"
    with pytest.raises(KernelError) as err:
        unpack_deb(deb, tmp_path / "kut")
    assert str(err.value) == "not-a-kernel.deb: no boot/vmlinuz-* in it: not a linux-image package"
    assert not (tmp_path / "kut").exists() and no_dpkg_deb_left()


@pytest.mark.parametrize("keep", [0, 100, 1500, 60000])
def test_a_truncated_package_is_one_line_naming_it(tmp_path, keep):
    whole = build_deb(tmp_path, "linux-image-test", KERNEL_FILES)
    cut = tmp_path / "cut.deb"
    cut.write_bytes(whole.read_bytes()[:keep])
    for call, error in ((lambda: extract_kernel(cut, tmp_path), KernelUnavailable),
                        (lambda: unpack_deb(cut, tmp_path / "kut"), KernelError)):
        with pytest.raises(error) as err:
            call()
        message = str(err.value)
        assert message.startswith("cannot unpack cut.deb: ") and "\n" not in message, message
        assert len(message) > len("cannot unpack cut.deb: ")
    assert not (tmp_path / "kut").exists() and no_dpkg_deb_left()


def test_a_missing_dpkg_deb_is_one_line(tmp_path, monkeypatch):
    deb = build_deb(tmp_path, "linux-image-test", KERNEL_FILES)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(KernelError) as err:
        with DebData(deb, KernelError):
            pass
    assert str(err.value).startswith("cannot unpack linux-image-test.deb: dpkg-deb: ")


def test_stopping_early_ends_dpkg_deb(tmp_path):
    deb = build_deb(tmp_path, "linux-image-test", {**KERNEL_FILES, "usr/share/big": bytes(4 << 20)})
    with DebData(deb, KernelError) as data:
        first = next(iter(data.members()))
        assert first is not None
    assert not data.complete and data.failure is None and no_dpkg_deb_left()
    with DebData(deb, KernelError) as data:
        names = [m.name.removeprefix("./") for m in data.members()]
    assert data.complete and "usr/share/big" in names and no_dpkg_deb_left()
