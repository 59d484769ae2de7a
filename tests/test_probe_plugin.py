"""The pytest plugin: marker, options and their ini twins, the once-per-session probe
fixture, and apx_skip_or_fail (skip, or fail under --apx-require)."""

from __future__ import annotations

import pytest

from apx_tests.pytest import plugin

SKIP_OR_FAIL = """
import pytest
from apx_tests.pytest.options import apx_skip_or_fail

pytestmark = pytest.mark.apx

def test_cannot_run():
    apx_skip_or_fail("apx: CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)")

def test_runs():
    pass
"""


@pytest.fixture(autouse=True)
def _quiet_rewrite_warning(pytester):
    # apx_tests is already imported by the outer session: the inner one cannot rewrite it.
    pytester.makeini("[pytest]\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n")


def test_skips_by_default(pytester):
    pytester.makepyfile(SKIP_OR_FAIL)
    result = pytester.runpytest("-ra", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_skips_by_default.py:*: apx: CPU lacks APX_F*"])


def test_fails_with_apx_require(pytester):
    pytester.makepyfile(SKIP_OR_FAIL)
    result = pytester.runpytest("-ra", "--apx-require")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["--apx-require: apx: CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[[]21[]]=0)",
                                 "FAILED *::test_cannot_run - Failed: --apx-requir*"])
    assert "Traceback" not in result.stdout.str()


def test_apx_require_from_ini(pytester):
    pytester.makepyfile(SKIP_OR_FAIL)
    pytester.makeini("[pytest]\napx_require = true\n"
                     "filterwarnings = ignore::pytest.PytestAssertRewriteWarning\n")
    pytester.runpytest().assert_outcomes(passed=1, failed=1)


def test_marker_selects(pytester):
    pytester.makepyfile(SKIP_OR_FAIL)
    pytester.makepyfile(test_other="def test_plain():\n    pass\n")  # not marked apx
    result = pytester.runpytest("-m", "apx", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)


def test_probe_fixture_computed_once_per_session(pytester, monkeypatch):
    calls = []
    real = plugin.probe

    def counting_probe(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(plugin, "probe", counting_probe)
    pytester.makepyfile(
        test_a="def test_a(apx_probe):\n    assert apx_probe.kernel_release\n",
        test_b="def test_b(apx_probe):\n    assert apx_probe.banks['x87'].name == 'x87'\n",
    )
    result = pytester.runpytest_inprocess("--apx-qemu=/nonexistent/qemu", "--junitxml=out.xml")
    result.assert_outcomes(passed=2)
    assert calls == [{"qemu": ["/nonexistent/qemu"]}]  # the run's QEMUs (several may run side by side)
    result.stdout.fnmatch_lines(["*= apx probe =*", "qemu: unavailable: *"])
    junit = (pytester.path / "out.xml").read_text()
    assert '<property name="apx.bank.x87"' in junit


def test_no_probe_no_probe_section(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest()
    assert "apx probe" not in result.stdout.str()


@pytest.mark.parametrize("args, ini, want", [
    ([], None, ("kvm", "qemu-kvm", "qemu-tcg", "qemu-tcg-linux")),
    (["--apx-backend", "kvm"], None, ("kvm",)),
    (["--apx-backend", "qemu", "--apx-backend", "kvm"], None, ("kvm", "qemu-kvm", "qemu-tcg", "qemu-tcg-linux")),
    ([], "qemu", ("qemu-kvm", "qemu-tcg", "qemu-tcg-linux")),
    (["--apx-backend", "qemu-tcg"], None, ("qemu-tcg",)),
    (["--apx-backend", "linux"], None, ("qemu-tcg-linux",)),
    (["--apx-backend", "all"], "qemu", ("kvm", "qemu-kvm", "qemu-tcg", "qemu-tcg-linux")),
])
def test_backend_selection(pytester, args, ini, want):
    if ini:
        pytester.makeini(f"[pytest]\napx_backend = {ini}\n")  # (warning filter not needed here)
    pytester.makeconftest(
        "from apx_tests.pytest.options import apx_backends\n"
        "def pytest_configure(config):\n"
        "    config._apx_seen = apx_backends(config)\n")
    pytester.makepyfile(f"def test_x(pytestconfig):\n    assert pytestconfig._apx_seen == {want!r}\n")
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_bad_backend_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--apx-backend", "vmware")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    pytester.makeini("[pytest]\napx_backend = vmware\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*apx_backend ini: unknown backend(s) vmware*"])


def test_artifacts_and_qemu_options(pytester):
    pytester.makeini("[pytest]\napx_artifacts = out/art\napx_qemu = /opt/q\n")
    pytester.makepyfile(
        "from apx_tests.pytest.options import apx_artifacts, apx_qemu\n"
        "def test_x(pytestconfig):\n"
        "    assert apx_artifacts(pytestconfig) == str(pytestconfig.rootpath / 'out/art')\n"
        "    assert apx_qemu(pytestconfig) == '/opt/q'\n")
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.makepyfile(
        "from apx_tests.pytest.options import apx_artifacts, apx_qemu\n"
        "def test_x(pytestconfig):\n"
        "    assert apx_artifacts(pytestconfig) == '/abs/dir'\n"
        "    assert apx_qemu(pytestconfig) == '/usr/bin/q'\n")
    # (--opt=PATH: a bare path argument would become pytest's rootdir, /abs/dir/.pytest_cache)
    pytester.runpytest("--apx-artifacts=/abs/dir", "--apx-qemu=/usr/bin/q").assert_outcomes(passed=1)
    # Several QEMUs side by side: the ini list, or --apx-qemu repeated; the first is the
    # primary one (Linux guests, the kernel under test).  Each must report a version (it
    # names their case ids): two stand-ins that only answer --version.
    q10, q11 = (pytester.path / "q10", pytester.path / "q11")
    for path, version in ((q10, "10.0.2"), (q11, "11.1.3")):
        path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
        path.chmod(0o755)
    pytester.makeini(f"[pytest]\napx_qemu = {q10} {q11}\n")
    pytester.makepyfile(
        "from apx_tests.pytest.options import apx_qemu, apx_qemu_paths, apx_qemus\n"
        "def test_x(pytestconfig):\n"
        f"    assert apx_qemu_paths(pytestconfig) == [{str(q10)!r}, {str(q11)!r}]\n"
        f"    assert apx_qemu(pytestconfig) == {str(q10)!r}\n"
        "    assert [(q.version, q.tag) for q in apx_qemus(pytestconfig)] == [('10.0.2', '10'), ('11.1.3', '11')]\n")
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.makepyfile(
        "from apx_tests.pytest.options import apx_qemu, apx_qemu_paths\n"
        "def test_x(pytestconfig):\n"
        f"    assert apx_qemu_paths(pytestconfig) == [{str(q11)!r}, {str(q10)!r}]\n")
    pytester.runpytest(f"--apx-qemu={q11}", f"--apx-qemu={q10}").assert_outcomes(passed=1)


def test_plugin_registered_once(pytester):
    """The entry point loads it; the repo's conftest must not load it again."""
    pytester.makepyfile("def test_x(pytestconfig):\n"
                        "    pm = pytestconfig.pluginmanager\n"
                        "    import apx_tests.pytest.plugin as p\n"
                        "    assert [n for n, m in pm.list_name_plugin() if m is p] == ['apx']\n")
    pytester.runpytest().assert_outcomes(passed=1)
