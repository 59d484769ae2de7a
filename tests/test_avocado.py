"""`avocado run apx:...` for real: the apx resolver plugin turns case ids into
avocado-instrumented tests that run the same scenarios (apx_tests.cases); the job
directory has results.json and results.xml with the outcomes pytest would report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apx_tests.cases import CaseId, CaseRunner, case_ids

try:
    from apx_tests.avocado_plugin.resolver import TEST_FILE, runnables
except Exception as exc:  # noqa: BLE001 - whatever avocado raises at import, say it in one line
    # avocado-framework is a dependency in pyproject.toml, so a venv that cannot import it is
    # broken (e.g. a setuptools without pkg_resources): each test here errors naming why,
    # while the rest of the session runs. Raised at import, it would stop the whole session
    # at collection ("Interrupted: 1 error during collection"), `pytest -m apx` included.
    IMPORT_ERROR: str | None = " ".join(
        f"avocado cannot be imported: {type(exc).__name__}: {exc} (avocado-framework is a "
        f"dependency in pyproject.toml: run ci/bootstrap)".split())
else:
    IMPORT_ERROR = None

AVOCADO = str(Path(sys.executable).with_name("avocado"))

# Where the import works, a missing `avocado` script next to this interpreter only means
# pytest runs from another environment than the venv: skip. Where it fails, the failure
# must show, so no skip may hide it.
pytestmark = [] if IMPORT_ERROR else pytest.mark.skipif(not os.access(AVOCADO, os.X_OK),
                                                       reason=f"{AVOCADO} not installed")


@pytest.fixture(scope="module", autouse=True)
def avocado_importable():
    """Module scope and autouse: set up before the module's other fixtures."""
    if IMPORT_ERROR:
        pytest.fail(IMPORT_ERROR, pytrace=False)


def avocado(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    results = tmp_path / "job-results"
    env = {**os.environ, "HOME": str(tmp_path)}  # avocado's data dir (~/avocado) stays in tmp
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    proc = subprocess.run([AVOCADO, "run", "--job-results-dir", str(results), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    latest = results / "latest"
    data = json.loads((latest / "results.json").read_text()) if (latest / "results.json").exists() else {}
    return proc, data


def statuses(data: dict) -> dict[str, tuple[str, str]]:
    """case id -> (status, fail_reason) from results.json."""
    out = {}
    for test in data["tests"]:
        case_id = test["id"].rsplit(".", 1)[1]
        out[case_id] = (test["status"], test.get("fail_reason") or "")
    return out


@pytest.fixture(scope="module")
def expected():
    with CaseRunner() as runner:
        return {c: runner.unavailable(CaseId.parse(c)) for c in ("kvm-ymm-import", "kvm-apx-export", "kvm-x87-round_trip")}


def test_avocado_run_reports_the_scenarios_with_pytests_outcomes(tmp_path, expected):
    proc, data = avocado(tmp_path, "apx:kvm-ymm-import,kvm-apx-export,kvm-x87-round_trip")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    got = statuses(data)
    assert set(got) == set(expected)
    for case_id, reason in expected.items():
        if reason:
            assert got[case_id] == ("SKIP", f"{case_id}: {reason}")
        else:
            assert got[case_id][0] == "PASS"
    latest = tmp_path / "job-results" / "latest"
    xml = (latest / "results.xml").read_text()
    assert all(f"ApxScenario.{c}" in xml for c in expected)
    assert data["total"] == 3
    for test in data["tests"]:
        assert test["tags"]["bank"] == [test["id"].rsplit(".", 1)[1].split("-")[1]]


def test_apx_require_parameter_fails_the_apx_bank(tmp_path, expected):
    proc, data = avocado(tmp_path, "-p", "apx_require=true", "apx:kvm-apx-export")
    status, reason = statuses(data)["kvm-apx-export"]
    if expected["kvm-apx-export"] is None:  # an APX host: the case passes either way
        assert (proc.returncode, status) == (0, "PASS")
        return
    assert proc.returncode == 1
    assert status == "FAIL"
    assert reason == f"--apx-require: kvm-apx-export: {expected['kvm-apx-export']}"


def test_tag_filter_and_listing(tmp_path):
    proc = subprocess.run([AVOCADO, "list", "-t", "bank:x87", "apx:"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(":")[-1].split(".")[-1] for line in proc.stdout.splitlines() if "ApxScenario." in line]
    assert listed == [c for c in case_ids() if c.startswith("kvm-x87-")]


def test_resolver_covers_every_case_once():
    uris = [r.uri for r in runnables(["*"])]
    assert uris == [f"{TEST_FILE}:ApxScenario.{c}" for c in case_ids()]
    assert runnables(["kvm-nothing-*"]) == []


def test_unknown_reference_is_left_to_other_resolvers(tmp_path):
    proc = subprocess.run([AVOCADO, "list", "apx:kvm-nothing-*"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "ApxScenario" not in proc.stdout
    shutil.rmtree(tmp_path / "avocado", ignore_errors=True)


def test_recipe_fallback_runs_without_the_plugin_reference(tmp_path, expected):
    """`python -m apx_tests.avocado_plugin.resolver PATTERN > r.json; avocado run r.json`:
    avocado's own runnables-recipe resolver, for a venv where the plugin is not registered."""
    out = subprocess.run([sys.executable, "-m", "apx_tests.avocado_plugin.resolver", "kvm-apx-export"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    recipe = tmp_path / "apx.json"
    recipe.write_text(out)
    proc, data = avocado(tmp_path, str(recipe))
    status, reason = statuses(data)["kvm-apx-export"]
    if expected["kvm-apx-export"] is None:
        assert status == "PASS"
    else:
        assert (status, reason) == ("SKIP", f"kvm-apx-export: {expected['kvm-apx-export']}")
