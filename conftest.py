"""Repository-only pytest settings (not shipped with the plugin).

The apx plugin itself is loaded by its pytest11 entry point (pyproject.toml); loading it
here as well (``pytest_plugins``) would register it twice, so this file only checks
that it is there and sets up what only this repository's own test run needs.
"""

from __future__ import annotations

import os

import pytest

# pytester: tests/test_probe_plugin.py runs small pytest sessions with the apx plugin.
pytest_plugins = ["pytester"]

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the [test] extra is not installed: the tests that need it will say so
    settings = None

if settings is not None:
    # CI: no deadline (a loaded 2-core machine makes timings noisy), derandomised so a
    # failure reproduces from the log alone.
    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("apx"):
        raise pytest.UsageError(
            "the apx_tests pytest plugin is not loaded (pytest11 entry point 'apx'): "
            "run ci/bootstrap and use .venv/bin/pytest (or pip install -e '.[test]')")
