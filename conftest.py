"""Repository-only pytest settings (not shipped with the plugin).

The apx plugin itself is loaded by its pytest11 entry point (pyproject.toml); loading it
here as well (``pytest_plugins``) would register it twice, so this file only checks
that it is there and sets up what only this repository's own test run needs.

It also keeps the README's main job fast: ``pytest -m apx`` (no paths: the testpaths
apx_tests/suite and tests) collects the shipped suite only. Every ``apx``-marked test lives
in apx_tests/suite (tests/test_main_job.py checks that tests/ marks none), so importing
and assertion-rewriting the ~60 modules of tests/ would only deselect them all again: with
PYTHONDONTWRITEBYTECODE=1 the rewritten modules are never cached, and that took most of the
run's 10-20 s of collection here (docs/bench.md, "Collection and the main job").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# pytester: tests/test_probe_plugin.py runs small pytest sessions with the apx plugin.
pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent / "tests"
HYPOTHESIS_OPTIONS = ("hypothesis_profile", "hypothesis_verbosity", "hypothesis_seed", "hypothesis_explain")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("apx"):
        raise pytest.UsageError(
            "the apx_tests pytest plugin is not loaded (pytest11 entry point 'apx'): "
            "run ci/bootstrap and use .venv/bin/pytest (or pip install -e '.[test]')")
    if any(_option(config, name) for name in HYPOTHESIS_OPTIONS):
        hypothesis_profiles()  # --hypothesis-profile ci: registered before hypothesis' plugin loads it


def _option(config: pytest.Config, name: str):
    try:
        return config.getoption(name)
    except ValueError:  # hypothesis' pytest plugin is not loaded
        return None


def main_job(config: pytest.Config) -> bool:
    """`pytest -m apx` with no paths: the README's main job (the testpaths, marker `apx`)."""
    return (config.option.markexpr or "").strip() == "apx" and config.args_source == pytest.Config.ArgsSource.TESTPATHS


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The main job skips what lies under tests/ (it holds no apx-marked test); a path given
    on the command line (`pytest -m apx tests/`) is collected as always."""
    if main_job(config) and collection_path.is_relative_to(TESTS):
        return True
    return None


# --- hypothesis -----------------------------------------------------------------------------
# `import hypothesis` takes about a second here: only a run that collects a module using it
# pays for it.  The profile must be loaded before such a module is imported (a settings(...)
# made at import takes its defaults from the profile loaded then): pytest_collectstart runs
# before the module is imported.

_profiles_loaded = False


def hypothesis_profiles() -> None:
    """Register the profiles and load ours (once): CI (no deadline: a loaded 2-core machine
    makes timings noisy; derandomised, so a failure reproduces from the log alone) or dev."""
    global _profiles_loaded
    if _profiles_loaded:
        return
    _profiles_loaded = True
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the [test] extra is not installed: the tests that need it will say so
        return
    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collectstart(collector: pytest.Collector) -> None:
    if not _profiles_loaded and isinstance(collector, pytest.Module) and uses_hypothesis(collector.path):
        hypothesis_profiles()


def uses_hypothesis(path: Path) -> bool:
    try:
        return "hypothesis" in path.read_text(errors="replace")
    except OSError:
        return False


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """No collected module imported hypothesis: hypothesis' own pytest plugin has nothing
    left to do, but its pytest_terminal_summary imports hypothesis (0.3-1 s here) at the end
    of every run; unregistered, it does not."""
    if "hypothesis" not in sys.modules:
        plugin = session.config.pluginmanager.get_plugin("hypothesispytest")
        if plugin is not None:
            session.config.pluginmanager.unregister(plugin)
