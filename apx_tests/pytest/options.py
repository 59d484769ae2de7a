"""The values of the apx options (``--apx-*`` and their ini twins, declared in
apx_tests.pytest.plugin) and ``apx_skip_or_fail``: the one place that decides between
"skip" (default) and "fail" (``--apx-require``, lab mode) when a scenario cannot run on
this host.

Helpers only, no hooks: the plugin's other modules, the shipped suite and conftests
import them.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from ..cases import expand_backends
from ..profiles import DEFAULT_PROFILE

_configs: list[pytest.Config] = []  # a stack: pytester runs sessions inside a session (plugin.py keeps it)


# --- option values ------------------------------------------------------------------

def apx_require(config: pytest.Config) -> bool:
    value = config.getoption("apx_require")
    return bool(config.getini("apx_require") if value is None else value)


def apx_backends(config: pytest.Config) -> tuple[str, ...]:
    """The selected backends, as concrete backend names (kvm, qemu-kvm, qemu-tcg)."""
    chosen = config.getoption("apx_backend") or config.getini("apx_backend") or ["all"]
    return expand_backends(chosen)


def apx_qemu_paths(config: pytest.Config) -> list[str] | None:
    """The QEMUs asked for (--apx-qemu, else the apx_qemu ini), or None for the default."""
    return list(config.getoption("apx_qemu") or config.getini("apx_qemu") or []) or None


def apx_qemu(config: pytest.Config) -> str | None:
    """The primary QEMU asked for (the first --apx-qemu / ini entry), or None for the
    default: what the Linux guests and the kernel under test run on."""
    paths = apx_qemu_paths(config)
    return paths[0] if paths else None


_qemus_key = pytest.StashKey[list]()


def apx_qemus(config: pytest.Config) -> list:
    """The run's QEMUs (apx_tests.qemu.binaries.QemuBinary: path, version, tag), resolved
    once per session; a list that cannot be used (two QEMUs, one without a version) is a
    usage error naming it."""
    if _qemus_key not in config.stash:
        from ..qemu.binaries import QemuListError, resolve_qemus
        try:
            config.stash[_qemus_key] = resolve_qemus(apx_qemu_paths(config))
        except QemuListError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[_qemus_key]


def qemu_backends_chosen(config: pytest.Config) -> bool:
    return any(b.startswith("qemu-") for b in apx_backends(config))


def apx_cpu_profile(config: pytest.Config) -> str:
    return config.getoption("apx_cpu") or config.getini("apx_cpu") or DEFAULT_PROFILE


def apx_artifacts(config: pytest.Config) -> str | None:
    value = config.getoption("apx_artifacts") or config.getini("apx_artifacts")
    if not value:
        return None
    return value if os.path.isabs(value) else str(config.rootpath / value)


# --- the decision ---------------------------------------------------------------------

def apx_skip_or_fail(reason: str, config: pytest.Config | None = None) -> NoReturn:
    """Skip the current test with ``reason``; with --apx-require fail it instead."""
    config = config or (_configs[-1] if _configs else None)
    if config is not None and apx_require(config):
        pytest.fail(f"--apx-require: {reason}", pytrace=False)
    try:
        # Report the skip at the test, not at this helper (what skipif markers do).
        exc = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without that keyword
        exc = pytest.skip.Exception(reason)
    raise exc
