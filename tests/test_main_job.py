"""The README's main job, `pytest -m apx` with no paths, collects the shipped suite only
(the root conftest.py ignores tests/ for it), and what that shortcut relies on: no module
of tests/ applies the `apx` mark, so the suite's items are all there are.  Also: the run
imports neither hypothesis nor labgrid, while the modules that use hypothesis still run
under the profile conftest.py registers.

What is checked are the items and the modules imported, never a time: how long collection
takes is ci/bench's `collection` line (docs/bench.md).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SUMMARY = re.compile(r"^(?:(?P<selected>\d+)(?:/(?P<total>\d+))? tests?|no tests) collected"
                     r"(?: \((?P<deselected>\d+) deselected\))?")


def _pytest(*args: str, importtime: bool = False, rc: int = 0) -> subprocess.CompletedProcess:
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "pytest", "-p", "no:cacheprovider",
            *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS_"))}
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == rc, result.stdout + result.stderr
    return result


def _items(stdout: str) -> tuple[list[str], re.Match]:
    lines = stdout.splitlines()
    summary = next(SUMMARY.match(line) for line in reversed(lines) if SUMMARY.match(line))
    return [line for line in lines if "::" in line], summary


def _apx_marks(path: Path) -> list[int]:
    """Lines where `path` applies the apx mark in code (`pytest.mark.apx`, `mark.apx(...)`),
    not in strings (the pytester suites that tests write out)."""
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "apx"
            and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"]


def test_no_module_of_tests_marks_apx():
    found = {p.name: _apx_marks(p) for p in sorted(TESTS.glob("*.py"))}
    assert {name: lines for name, lines in found.items() if lines} == {}, \
        "an apx-marked test in tests/ would be left out of `pytest -m apx` (conftest.py ignores tests/ there)"
    assert len(found) > 40  # the glob saw the test modules


def test_the_mark_finder_sees_a_mark_in_code_not_in_a_string(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text('import pytest\nSUITE = "pytestmark = pytest.mark.apx"\n\n\n@pytest.mark.apx\ndef test_x():\n'
                       '    pass\n\n\npytestmark = [pytest.mark.apx]\n')
    assert _apx_marks(planted) == [5, 10]


def test_main_job_collects_the_suite_and_imports_nothing_of_tests():
    result = _pytest("-s", "-m", "apx", "--collect-only", "-q", importtime=True)
    items, summary = _items(result.stdout)
    suite, _ = _items(_pytest("-m", "apx", "apx_tests/suite", "--collect-only", "-q").stdout)
    assert items == suite and int(summary["selected"]) == len(items) > 0, result.stdout
    assert summary["deselected"] is None  # tests/ was never collected, so nothing was deselected
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("hypothesis", "labgrid")}, sorted(imported)
    own_tests = {p.stem for p in TESTS.glob("*.py")} - {"conftest"}
    assert not imported & own_tests, sorted(imported & own_tests)


def test_the_linux_items_run_last():
    """apx_tests/suite/conftest.py: the Linux-guest items come after every other item (their
    shared boot starts in the background at the first item and boots meanwhile), in their
    own order."""
    items, _ = _items(_pytest("-m", "apx", "--collect-only", "-q").stdout)
    linux = [item for item in items if "suite/test_linux.py::" in item]
    assert linux and len(linux) < len(items), items
    assert items[-len(linux):] == linux, items
    assert linux[0].startswith("apx_tests/suite/test_linux.py::test_linux_restore["), linux


def test_tests_given_as_a_path_are_collected_with_the_marker():
    """`pytest -m apx tests/...`: a path on the command line is collected (and, having no
    apx-marked test, deselected), not ignored."""
    result = _pytest("-m", "apx", "tests/test_main_job.py", "--collect-only", "-q", rc=5)  # 5: no tests selected
    items, summary = _items(result.stdout)
    assert items == [] and summary["selected"] is None and int(summary["deselected"]) > 0, result.stdout


def test_hypothesis_profile_options_still_find_our_profiles():
    """--hypothesis-profile dev: conftest.py registers its profiles before hypothesis' plugin
    loads the one named (the run imports hypothesis then, as it always did)."""
    result = _pytest("--hypothesis-profile", "dev", "tests/test_xsave_layout.py", "-q", "-k", "compacted_offsets_properties")
    assert re.search(r"\d+ passed", result.stdout), result.stdout


def test_modules_using_hypothesis_run_under_the_projects_profile():
    from hypothesis import settings

    assert settings.get_current_profile_name() in ("ci", "dev")
    assert settings.default.deadline is None
