"""What the shipped suite's modules share: the Linux guests' environment and their shared
boot, which starts early.

The Linux-guest items (test_linux.py) run last, and the shared boot (linux_ready.ReadyGuest,
a TCG guest's ~3 s of one core) starts in a background thread before the session's first
item, so the guest boots while the KVM and QEMU items run on the other core; the first
Linux item then only waits for what is left of it.  Not under pytest-xdist (a worker does
not know whether the Linux items will be its own: apx_tests.pytest.xdist_scopes keeps them
together) and not when no selected Linux item can run here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from apx_tests.guests import build, linux_kernel
from apx_tests.guests.linux_kernel import KernelUnavailable
from apx_tests.pytest.options import apx_cpu_profile, apx_qemu
from apx_tests.profiles import PROFILES
from apx_tests.qemu.backend import QemuBackend
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.host import QemuHost
from apx_tests.qemu.linux_accel import choose_accel, unavailable_reason
from apx_tests.qemu.linux_ready import ReadyGuest
from apx_tests.qemu.spec import find_qemu

LINUX_MODULE = Path(__file__).resolve().parent / "test_linux.py"


def _is_linux(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve() == LINUX_MODULE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Linux-guest items go last (in their own order): see the module docstring.
    Under pytest-xdist they go first: the longest unit of work starts at once on one worker
    (apx_tests/pytest/xdist_scopes.py hands units out in collection order)."""
    linux = [item for item in items if _is_linux(item)]
    if linux:
        others = [item for item in items if not _is_linux(item)]
        items[:] = linux + others if os.environ.get("PYTEST_XDIST_WORKER") else others + linux


def linux_environment(config: pytest.Config) -> dict | str:
    """QEMU, the guest kernel and the accelerator this host boots it under, or why the
    Linux items cannot run (a missing QEMU, kernel or build tool)."""
    try:
        qemu = find_qemu(apx_qemu(config))
    except QemuUnavailable as exc:
        return str(exc)
    if not build.have_llvm_mc() or shutil.which("gcc") is None:
        return "the Linux guest programs need llvm-mc >= 18 and gcc (ci/bootstrap installs them)"
    try:
        kernel = linux_kernel.find_kernel(fetch=False)
    except KernelUnavailable as exc:
        return str(exc)
    choice = choose_accel(qemu, kernel)  # remembered for the session (no probe boot on kvm_pvm)
    return {"qemu": qemu, "kernel": kernel, "cpu": None, "profile_unavailable": None, "accel": choice.accel,
            "accel_why": choice.why, "backend": None, "ready": None}


@pytest.fixture(scope="session", autouse=True)
def linux_ready_early(request: pytest.FixtureRequest):
    """The shared boot, started before the first item (see the module docstring), or None."""
    ready = None
    items = [item for item in request.session.items if _is_linux(item)]
    if items and os.environ.get("PYTEST_XDIST_WORKER") is None \
            and not PROFILES[apx_cpu_profile(request.config)].restricts:
        env = linux_environment(request.config)
        if isinstance(env, dict) and env["accel"] == "tcg" and any(
                unavailable_reason(item.callspec.params["bank"], "tcg", qemu=env["qemu"], kernel=env["kernel"])
                is None for item in items if hasattr(item, "callspec") and "bank" in item.callspec.params):
            ready = ReadyGuest(accel="tcg", qemu=env["qemu"], kernel=env["kernel"])
            ready.start()
    try:
        yield ready
    finally:
        if ready is not None:
            ready.close()


@pytest.fixture(scope="session")
def linux_env(pytestconfig, linux_ready_early):
    """linux_environment(), the CPU profile's `-cpu` and the shared boot (the early one when
    it matches), or a skip saying what is missing."""
    env = linux_environment(pytestconfig)
    if isinstance(env, str):
        pytest.skip(env)
    profile = PROFILES[apx_cpu_profile(pytestconfig)]
    if not profile.restricts and env["accel"] == "tcg":
        early = linux_ready_early
        if early is not None and early.matches(accel="tcg", qemu=env["qemu"], kernel=env["kernel"], cpu=None):
            env["ready"] = early  # closed by linux_ready_early
            yield env
            return
        with ReadyGuest(accel=env["accel"], qemu=env["qemu"], kernel=env["kernel"]) as env["ready"]:
            yield env
        return
    # The profile's -cpu, and whether the accelerator's guest can provide it (and under KVM
    # which banks the guest CPU has): one probe boot of the QEMU backend's stub under that
    # -cpu (the Linux guest's CPU is the same model).
    host = QemuHost(env["accel"], env["qemu"], profile=profile)
    try:
        env.update(cpu=host.spec_cpu if profile.restricts else None, profile_unavailable=host.profile_unavailable(),
                   backend=QemuBackend(host=host) if env["accel"] == "kvm" else None)
        with ReadyGuest(accel=env["accel"], qemu=env["qemu"], kernel=env["kernel"], cpu=env["cpu"]) as env["ready"]:
            yield env
    finally:
        host.close()
