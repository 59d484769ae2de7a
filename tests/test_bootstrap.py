"""ci/bootstrap and .ci/run: syntax, the apt-source logic against fake /etc/apt trees,
package-state checks through the real dpkg, and the fast path of a re-run."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "ci" / "bootstrap"

DEBIAN_SOURCES = textwrap.dedent("""\
    Types: deb
    # http://snapshot.debian.org/archive/debian-security/20250520T000000Z
    URIs: http://security.mirror.invalid/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: http://mirror.invalid/debian
    Suites: bookworm bookworm-updates
    Components: main contrib
    Signed-By: /usr/share/keyrings/other-keyring.gpg
    """)


def bash(script: str, root: Path | None = None, **env) -> subprocess.CompletedProcess:
    """Run `script` in bash after sourcing ci/bootstrap (functions only, main not run)."""
    full_env = {**os.environ, **env}
    if root is not None:
        full_env["APX_APT_ROOT"] = str(root)
    return subprocess.run(["bash", "-c", f'source "{BOOTSTRAP}"; set +e; {script}'],
                          capture_output=True, text=True, env=full_env, timeout=60, stdin=subprocess.DEVNULL)


def apt_root(tmp_path: Path, debian_sources: str | None = DEBIAN_SOURCES, **files: str) -> Path:
    root = tmp_path / "root"
    d = root / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    if debian_sources is not None:
        (d / "debian.sources").write_text(debian_sources)
    for name, text in files.items():
        path = root / "etc/apt" / name.replace("__", "/")
        path.write_text(text)
    return root


@pytest.mark.parametrize("script", [BOOTSTRAP, REPO / ".ci" / "run"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_adds_backports_with_the_bookworm_entrys_uris_and_key(tmp_path):
    root = apt_root(tmp_path)
    proc = bash("has_backports_source; echo has=$?; ensure_backports_source; echo added=$?", root)
    assert "has=1" in proc.stdout and "added=0" in proc.stdout, proc.stderr
    dest = root / "etc/apt/sources.list.d/bookworm-backports.sources"
    assert dest.read_text() == textwrap.dedent("""\
        Types: deb
        URIs: http://mirror.invalid/debian
        Suites: bookworm-backports
        Components: main
        Signed-By: /usr/share/keyrings/other-keyring.gpg
        """)
    assert f"bootstrap: added apt source {dest}" in proc.stdout
    # Idempotent: the second run sees it and changes nothing.
    before = sorted(p.name for p in dest.parent.iterdir())
    proc = bash("ensure_backports_source; echo added=$?", root)
    assert "added=1" in proc.stdout and "bootstrap:" not in proc.stdout
    assert sorted(p.name for p in dest.parent.iterdir()) == before


def test_the_file_the_lead_added_by_hand_is_detected(tmp_path):
    """The dev machine's hand-made file: exactly what the bootstrap would write."""
    existing = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n" \
               "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    root = apt_root(tmp_path, **{"sources.list.d__bookworm-backports.sources": existing})
    proc = bash("ensure_backports_source; echo added=$?", root)
    assert "added=1" in proc.stdout
    assert (root / "etc/apt/sources.list.d/bookworm-backports.sources").read_text() == existing


@pytest.mark.parametrize("name, text, detected", [
    ("sources.list", "deb http://m.invalid/debian bookworm-backports main\n", True),
    ("sources.list", "deb [signed-by=/k.gpg] http://m.invalid/debian bookworm-backports main\n", True),
    ("sources.list", "# deb http://m.invalid/debian bookworm-backports main\n", False),
    ("sources.list.d__backports.list", "deb http://m.invalid/debian bookworm-backports main contrib\n", True),
    ("sources.list.d__other.sources", "Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm-backports\n", True),
    ("sources.list.d__other.sources", "Types: deb\nURIs: http://m.invalid/debian\n# Suites: bookworm-backports\n", False),
    ("sources.list.d__other.sources", "Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm-backports-sloppy\n", False),
    ("sources.list.d__backports.list.disabled", "deb http://m.invalid/debian bookworm-backports main\n", False),
])
def test_backports_detection(tmp_path, name, text, detected):
    root = apt_root(tmp_path, **{name: text})
    proc = bash("has_backports_source; echo has=$?", root)
    assert f"has={0 if detected else 1}" in proc.stdout


def test_disabled_and_inline_key_stanzas(tmp_path):
    sources = textwrap.dedent("""\
        Types: deb
        URIs: http://disabled.invalid/debian
        Suites: bookworm
        Components: main
        Enabled: no

        Types: deb
        URIs: http://mirror.invalid/debian
        Suites: bookworm
        Components: main
        Signed-By:
         -----BEGIN PGP PUBLIC KEY BLOCK-----
         .
         mQINBGR
         -----END PGP PUBLIC KEY BLOCK-----
        """)
    root = apt_root(tmp_path, sources)
    proc = bash("ensure_backports_source", root)
    assert proc.returncode == 0, proc.stderr
    text = (root / "etc/apt/sources.list.d/bookworm-backports.sources").read_text()
    assert "URIs: http://mirror.invalid/debian\n" in text and "disabled" not in text
    assert text.endswith("Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGR\n"
                         " -----END PGP PUBLIC KEY BLOCK-----\n")


@pytest.mark.parametrize("sources", [None, "Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie\n"])
def test_no_bookworm_entry_fails_loudly(tmp_path, sources):
    root = apt_root(tmp_path, sources)
    proc = bash("ensure_backports_source; echo not-reached", root)
    assert proc.returncode != 0 and "not-reached" not in proc.stdout
    assert proc.stderr.startswith("bootstrap: error: no active 'bookworm' entry with URIs in ")
    assert not (root / "etc/apt/sources.list.d/bookworm-backports.sources").exists()


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_package_state_uses_dpkg():
    proc = bash('package_state dpkg -; package_state dpkg "99:1"; package_state apx-no-such-package -')
    ok, old, missing = proc.stdout.splitlines()
    assert ok == "ok" and missing == "missing"
    assert old.startswith("old ") and len(old.split()) == 2


def test_qemu_from_backports_is_required_at_version_10():
    """The package table asks for qemu-system-x86 >= 10 from bookworm-backports."""
    proc = bash('printf "%s\\n" "${APT_PACKAGES[@]}"')
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["qemu-system-x86", "1:10~", "bookworm-backports"] in rows
    assert {r[0] for r in rows} >= {"gdb", "llvm-19", "gcc", "libc6-dev"}
    # 1:10~ sorts below every 10.x Debian version and above bookworm's 7.2.
    cmp = bash('dpkg --compare-versions "1:10.0.2+ds-2~bpo12+1" ge "1:10~" && echo a; '
               'dpkg --compare-versions "1:7.2+dfsg-7+deb12u18" ge "1:10~" || echo b')
    assert cmp.stdout.split() == ["a", "b"]


def test_bad_python_fails_loudly(tmp_path):
    proc = subprocess.run([str(BOOTSTRAP)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "APX_SKIP_APT": "1", "APX_VENV": str(tmp_path / "venv"),
                               "APX_PYTHON": str(tmp_path / "no-python")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"bootstrap: error: no {tmp_path / 'no-python'} to create the venv with (set APX_PYTHON)")
    assert not (tmp_path / "venv").exists()


def test_rerun_in_current_venv_is_fast_and_skips_pip():
    """When this test runs inside the bootstrapped venv, a re-run must not reinstall."""
    stamp = Path(sys.prefix) / ".apx-bootstrap-stamp"
    if not stamp.exists():
        pytest.skip(f"not running inside a bootstrapped venv ({stamp} missing)")
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if f"repo={REPO}\n" not in stamp.read_text() or f"pyproject={digest}" not in stamp.read_text():
        pytest.skip("the venv was bootstrapped from another checkout or an older pyproject.toml")
    proc = subprocess.run([str(BOOTSTRAP)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "APX_SKIP_APT": "1", "APX_VENV": sys.prefix})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("bootstrap: ") for line in lines)
    assert f"bootstrap: venv up to date (pyproject.toml unchanged): {sys.prefix}" in lines
    assert lines[-1] == f"bootstrap: venv: {sys.prefix}"


# --- the install step, with apt-get and dpkg-query replaced by fakes ----------------------

FAKE_DPKG_QUERY = """#!/bin/sh
# dpkg-query -W -f=FORMAT PKG: "install ok installed|VERSION" from $FAKE_STATE/PKG
for last; do :; done
[ -f "$FAKE_STATE/$last" ] || exit 1
printf 'install ok installed|%s' "$(cat "$FAKE_STATE/$last")"
"""

FAKE_APT_GET = """#!/bin/sh
echo "$*" >> "$FAKE_STATE/apt.log"
[ -f "$FAKE_STATE/fail-$(echo "$*" | grep -o 'update\\|install' | head -1)" ] && { echo "E: boom" >&2; exit 100; }
case " $* " in
  *" install "*)
    for arg; do
      case $arg in
        -*|install|bookworm-backports|Dpkg::*|--force*) ;;
        qemu-system-x86) echo "1:10.0.2+ds-2+deb13u1~bpo12+1" > "$FAKE_STATE/$arg" ;;
        *) echo "1.0-1" > "$FAKE_STATE/$arg" ;;
      esac
    done ;;
esac
"""


@pytest.fixture
def fake_apt(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("dpkg-query", FAKE_DPKG_QUERY), ("apt-get", FAKE_APT_GET), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    root = apt_root(tmp_path)

    def run(installed: dict[str, str]):
        for pkg, version in installed.items():
            (state / pkg).write_text(version + "\n")
        return bash("install_packages; echo rc=$?", root, PATH=f"{bin_dir}:{os.environ['PATH']}",
                    FAKE_STATE=str(state))

    run.state, run.root = state, root
    return run


ALL_OK = {"qemu-system-x86": "1:10.0.2+ds-2", "gdb": "13.1-3", "llvm-19": "1:19.1.7-3", "gcc": "4:12.2.0-3",
          "libc6-dev": "2.36-9"}


def test_nothing_missing_means_no_apt_get(fake_apt):
    proc = fake_apt(ALL_OK)
    assert "rc=0" in proc.stdout, proc.stderr
    assert proc.stdout.splitlines()[0] == "bootstrap: debian packages present: qemu-system-x86 gdb llvm-19 gcc libc6-dev"
    assert not (fake_apt.state / "apt.log").exists()
    assert not (fake_apt.root / "etc/apt/sources.list.d/bookworm-backports.sources").exists()


def test_old_qemu_and_missing_gdb_are_installed(fake_apt):
    installed = {**ALL_OK, "qemu-system-x86": "1:7.2+dfsg-7+deb12u18"}
    del installed["gdb"]
    proc = fake_apt(installed)
    assert "rc=0" in proc.stdout, proc.stderr
    out = proc.stdout.splitlines()
    assert "bootstrap: need qemu-system-x86 >= 1:10 (installed 1:7.2+dfsg-7+deb12u18)" in out
    assert "bootstrap: need gdb (not installed)" in out
    assert any(line.startswith("bootstrap: added apt source ") for line in out)
    log = (fake_apt.state / "apt.log").read_text().splitlines()
    assert len(log) == 3 and log[0].endswith(" update")
    assert log[1].endswith("install --no-install-recommends gdb")
    assert log[2].endswith("install --no-install-recommends -t bookworm-backports qemu-system-x86")
    assert out[-2] == "bootstrap: debian packages installed"


def test_apt_failure_is_loud(fake_apt):
    (fake_apt.state / "fail-update").touch()
    installed = dict(ALL_OK)
    del installed["gcc"]  # something to install, so apt-get update runs (and fails)
    proc = fake_apt(installed)
    assert "rc=" not in proc.stdout and proc.returncode != 0
    err = proc.stderr.splitlines()
    assert "bootstrap:   | E: boom" in err
    assert err[-1] == "bootstrap: error: apt-get update failed"
    assert (fake_apt.state / "apt.log").read_text().count("install") == 0


# --- .ci/run: exit codes, with bootstrap, pytest and apx-tests replaced by fakes ----------

@pytest.mark.parametrize("pytest_exit, probe_exit, want", [(0, 0, 0), (1, 0, 1), (5, 0, 5), (0, 3, 3)])
def test_ci_run_exit_status(tmp_path, pytest_exit, probe_exit, want):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    fakes = {
        repo / "ci" / "bootstrap": "echo 'bootstrap: fake'\n",
        venv_bin / "pytest": f"echo pytest \"$@\" > pytest.args\nexit {pytest_exit}\n",
        venv_bin / "apx-tests": f"echo 'cpu: fake'\nexit {probe_exit}\n",
        venv_bin / "python": f'exec "{sys.executable}" "$@"\n',
    }
    for path, body in fakes.items():
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    (repo / "results").mkdir()
    (repo / "results" / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1"/></testsuites>')
    env = {k: v for k, v in os.environ.items() if k != "APX_VENV"}
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True,
                          env={**env, "CI": "true"}, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == want, proc.stdout + proc.stderr
    assert (repo / "pytest.args").read_text().split() == ["pytest", "--junitxml=results/junit.xml"]
    assert proc.stdout.splitlines()[-1] == "tests: 1 passed, 1 failed, 1 skipped"
    if pytest_exit == 5:
        assert ".ci/run: error: pytest collected no tests (exit 5)" in proc.stderr
    assert (repo / "results" / "probe.json").exists()  # the probe runs even after a test failure
