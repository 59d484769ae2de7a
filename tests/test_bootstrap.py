"""ci/bootstrap, ci/in-debian13 and .ci/run: syntax; the release decision (suite, packages,
source file) for bookworm and trixie from fake os-release files; the apt-source logic
against fake /etc/apt trees; package-state checks through the real dpkg; the fast path of a
re-run; in-debian13's mounts, processes and exit status with a tiny root filesystem."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from apx_tests import procfs

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "ci" / "bootstrap"
IN_DEBIAN13 = REPO / "ci" / "in-debian13"

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

# What a Debian 13 installation writes (deb822 from the start; the keyring is .pgp there).
TRIXIE_SOURCES = textwrap.dedent("""\
    Types: deb deb-src
    URIs: http://mirror.invalid/debian
    Suites: trixie trixie-updates
    Components: main non-free-firmware
    Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp

    Types: deb deb-src
    URIs: http://security.mirror.invalid/debian-security
    Suites: trixie-security
    Components: main non-free-firmware
    Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp
    """)

SOURCES = {"bookworm": DEBIAN_SOURCES, "trixie": TRIXIE_SOURCES}
KEYRING = {"bookworm": "/usr/share/keyrings/other-keyring.gpg",
           "trixie": "/usr/share/keyrings/debian-archive-keyring.pgp"}

OS_RELEASE = {
    "bookworm": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
                'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n',
    "trixie": 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\nVERSION_ID="13"\n'
              'VERSION="13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n',
}


def bash(script: str, root: Path | None = None, codename: str | None = None, **env) -> subprocess.CompletedProcess:
    """Run `script` in bash after sourcing ci/bootstrap (functions only, main not run), with
    release_plan done for `codename` first when given."""
    full_env = {**os.environ, **env}
    if root is not None:
        full_env["APX_APT_ROOT"] = str(root)
    plan = f"release_plan {codename}; " if codename else ""
    return subprocess.run(["bash", "-c", f'source "{BOOTSTRAP}"; set +e; {plan}{script}'],
                          capture_output=True, text=True, env=full_env, timeout=60, stdin=subprocess.DEVNULL)


def os_release(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "os-release"
    path.write_text(text)
    return path


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


@pytest.mark.parametrize("script", [BOOTSTRAP, REPO / ".ci" / "run", IN_DEBIAN13])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("codename", ["bookworm", "trixie"])
def test_adds_backports_with_the_release_entrys_uris_and_key(tmp_path, codename):
    root = apt_root(tmp_path, SOURCES[codename])
    proc = bash("has_backports_source; echo has=$?; ensure_backports_source; echo added=$?", root, codename)
    assert "has=1" in proc.stdout and "added=0" in proc.stdout, proc.stderr
    dest = root / f"etc/apt/sources.list.d/{codename}-backports.sources"
    assert dest.read_text() == textwrap.dedent(f"""\
        Types: deb
        URIs: http://mirror.invalid/debian
        Suites: {codename}-backports
        Components: main
        Signed-By: {KEYRING[codename]}
        """)
    assert f"bootstrap: added apt source {dest} ({codename}-backports main from http://mirror.invalid/debian)" \
        in proc.stdout
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted(["debian.sources", dest.name])
    # Idempotent: the second run sees it and changes nothing.
    proc = bash("ensure_backports_source; echo added=$?", root, codename)
    assert "added=1" in proc.stdout and "bootstrap:" not in proc.stdout
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted(["debian.sources", dest.name])


def test_the_other_releases_backports_does_not_count(tmp_path):
    """A trixie machine with a leftover bookworm-backports line still needs trixie-backports."""
    root = apt_root(tmp_path, TRIXIE_SOURCES,
                    **{"sources.list.d__old.list": "deb http://m.invalid/debian bookworm-backports main\n"})
    proc = bash("has_backports_source; echo has=$?", root, "trixie")
    assert "has=1" in proc.stdout


def test_the_file_the_lead_added_by_hand_is_detected(tmp_path):
    """The dev machine's hand-made file: exactly what the bootstrap would write."""
    existing = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n" \
               "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    root = apt_root(tmp_path, **{"sources.list.d__bookworm-backports.sources": existing})
    proc = bash("ensure_backports_source; echo added=$?", root, "bookworm")
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
    proc = bash("has_backports_source; echo has=$?", root, "bookworm")
    assert f"has={0 if detected else 1}" in proc.stdout
    # The same lines for trixie: the suite name is the release's.
    root = apt_root(tmp_path / "trixie", TRIXIE_SOURCES, **{name: text.replace("bookworm", "trixie")})
    proc = bash("has_backports_source; echo has=$?", root, "trixie")
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
    proc = bash("ensure_backports_source", root, "bookworm")
    assert proc.returncode == 0, proc.stderr
    text = (root / "etc/apt/sources.list.d/bookworm-backports.sources").read_text()
    assert "URIs: http://mirror.invalid/debian\n" in text and "disabled" not in text
    assert text.endswith("Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGR\n"
                         " -----END PGP PUBLIC KEY BLOCK-----\n")


@pytest.mark.parametrize("codename, sources", [
    ("bookworm", None),
    ("bookworm", "Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie\n"),
    ("trixie", None),
    ("trixie", DEBIAN_SOURCES),                                             # a bookworm machine's file
    ("trixie", "Types: deb\nURIs: http://m.invalid/debian\nSuites: trixie-updates\n"),
])
def test_no_entry_for_the_release_fails_loudly(tmp_path, codename, sources):
    root = apt_root(tmp_path, sources)
    proc = bash("ensure_backports_source; echo not-reached", root, codename)
    assert proc.returncode != 0 and "not-reached" not in proc.stdout
    assert proc.stderr.splitlines() == [
        f"bootstrap: error: no active '{codename}' entry with URIs in {root}/etc/apt/sources.list.d/debian.sources: "
        f"cannot derive a {codename}-backports source"]
    assert not (root / f"etc/apt/sources.list.d/{codename}-backports.sources").exists()


# --- which release: os-release, never assumed ---------------------------------------------

@pytest.mark.parametrize("codename, qemu_min", [("bookworm", "1:10~"), ("trixie", "1:11~")])
def test_the_release_decides_suite_packages_and_source_file(tmp_path, codename, qemu_min):
    proc = bash('c=$(os_codename) && release_plan "$c" && echo "codename=$CODENAME" '
                '"suite=$BACKPORTS_SUITE" "file=$BACKPORTS_FILE_NAME" && printf "%s\\n" "${APT_PACKAGES[@]}"',
                APX_OS_RELEASE=str(os_release(tmp_path, OS_RELEASE[codename])))
    assert proc.returncode == 0, proc.stderr
    head, *rows = proc.stdout.splitlines()
    assert head == f"codename={codename} suite={codename}-backports file={codename}-backports.sources"
    table = [row.split() for row in rows]
    # QEMU alone from backports; the rest from the release itself (gdb 13 / 16, llvm-19 in both).
    assert table == [["qemu-system-x86", qemu_min, f"{codename}-backports"],
                     ["gdb", "-", "-"], ["llvm-19", "-", "-"], ["gcc", "-", "-"], ["libc6-dev", "-", "-"],
                     ["python3-venv", "-", "-"], ["ca-certificates", "-", "-"], ["lz4", "-", "-"], ["zstd", "-", "-"]]


def test_qemu_minimum_versions_sort_as_intended():
    """1:10~ below every 10.x and above bookworm's 7.2; 1:11~ above trixie's own 10.0."""
    cmp = bash('for pair in "1:10.0.2+ds-2~bpo12+1 1:10~" "1:11.1.3+ds-2~bpo13+1 1:11~" '
               '"1:7.2+dfsg-7+deb12u18 1:10~" "1:10.0.3+ds-1 1:11~"; do set -- $pair; '
               'dpkg --compare-versions "$1" ge "$2" && echo yes || echo no; done')
    assert cmp.stdout.split() == ["yes", "yes", "no", "no"]


@pytest.mark.parametrize("text, error", [
    ('VERSION_CODENAME=forky\nID=debian\n',
     "unsupported Debian release 'forky' (VERSION_CODENAME in {path}): ci/bootstrap knows bookworm (12) and trixie (13)"),
    ('VERSION_CODENAME="jammy"\nID=ubuntu\n',
     "unsupported Debian release 'jammy' (VERSION_CODENAME in {path}): ci/bootstrap knows bookworm (12) and trixie (13)"),
    ('PRETTY_NAME="Debian GNU/Linux trixie/sid"\nID=debian\n',
     "no VERSION_CODENAME in {path}: cannot tell which Debian release this is"),
    (None, "cannot read {path}: no os-release to tell the Debian release from"),
])
def test_an_unknown_release_is_one_line_naming_it(tmp_path, text, error):
    """The whole script: it stops before apt, pip or anything else happens."""
    path = os_release(tmp_path, text) if text is not None else tmp_path / "missing-os-release"
    proc = subprocess.run([str(BOOTSTRAP)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "APX_OS_RELEASE": str(path), "APX_VENV": str(tmp_path / "venv"),
                               "APX_APT_ROOT": str(apt_root(tmp_path))})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"bootstrap: error: {error.format(path=path)}"]
    assert proc.stdout == "" and not (tmp_path / "venv").exists()


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_package_state_uses_dpkg():
    proc = bash('package_state dpkg -; package_state dpkg "99:1"; package_state apx-no-such-package -')
    ok, old, missing = proc.stdout.splitlines()
    assert ok == "ok" and missing == "missing"
    assert old.startswith("old ") and len(old.split()) == 2


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
        -*|install|*-backports|Dpkg::*|--force*) ;;
        qemu-system-x86) echo "$FAKE_QEMU_VERSION" > "$FAKE_STATE/$arg" ;;
        *) echo "1.0-1" > "$FAKE_STATE/$arg" ;;
      esac
    done ;;
esac
"""

# What each release's backports install would bring.
BACKPORTS_QEMU = {"bookworm": "1:10.0.2+ds-2+deb13u1~bpo12+1", "trixie": "1:11.1.3+ds-2~bpo13+1"}


@pytest.fixture
def fake_apt(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("dpkg-query", FAKE_DPKG_QUERY), ("apt-get", FAKE_APT_GET), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    roots = {codename: apt_root(tmp_path / codename, SOURCES[codename]) for codename in SOURCES}

    def env(codename: str) -> dict:
        return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(state),
                "FAKE_QEMU_VERSION": BACKPORTS_QEMU[codename]}

    def run(installed: dict[str, str], codename: str = "bookworm"):
        for pkg, version in installed.items():
            (state / pkg).write_text(version + "\n")
        return bash("install_packages; echo rc=$?", roots[codename], codename, **env(codename))

    run.state, run.roots, run.env = state, roots, env
    return run


ALL_OK = {"bookworm": {"qemu-system-x86": "1:10.0.2+ds-2", "gdb": "13.1-3", "llvm-19": "1:19.1.7-3",
                       "gcc": "4:12.2.0-3", "libc6-dev": "2.36-9", "python3-venv": "3.11.2-1+b1",
                       "ca-certificates": "20230311+deb12u1", "lz4": "1.9.4-1", "zstd": "1.5.4+dfsg2-5"},
          "trixie": {"qemu-system-x86": "1:11.1.3+ds-2~bpo13+1", "gdb": "16.3-1", "llvm-19": "1:19.1.7-3+b1",
                     "gcc": "4:14.2.0-1", "libc6-dev": "2.41-12", "python3-venv": "3.13.5-1",
                     "ca-certificates": "20250419", "lz4": "1.10.0-4", "zstd": "1.5.7+dfsg-1"}}


@pytest.mark.parametrize("codename", ["bookworm", "trixie"])
def test_nothing_missing_means_no_apt_get(fake_apt, codename):
    proc = fake_apt(ALL_OK[codename], codename)
    assert "rc=0" in proc.stdout, proc.stderr
    assert proc.stdout.splitlines()[0] == ("bootstrap: debian packages present: qemu-system-x86 gdb llvm-19 gcc "
                                           "libc6-dev python3-venv ca-certificates lz4 zstd")
    assert not (fake_apt.state / "apt.log").exists()
    assert not (fake_apt.roots[codename] / f"etc/apt/sources.list.d/{codename}-backports.sources").exists()


@pytest.mark.parametrize("codename, old_qemu, minimum", [
    ("bookworm", "1:7.2+dfsg-7+deb12u18", "1:10"),   # bookworm's own
    ("trixie", "1:10.0.3+ds-1", "1:11"),             # trixie's own: too old there
])
def test_old_qemu_and_missing_gdb_are_installed(fake_apt, codename, old_qemu, minimum):
    installed = {**ALL_OK[codename], "qemu-system-x86": old_qemu}
    del installed["gdb"]
    proc = fake_apt(installed, codename)
    assert "rc=0" in proc.stdout, proc.stderr
    out = proc.stdout.splitlines()
    assert f"bootstrap: need qemu-system-x86 >= {minimum} (installed {old_qemu})" in out
    assert "bootstrap: need gdb (not installed)" in out
    dest = fake_apt.roots[codename] / f"etc/apt/sources.list.d/{codename}-backports.sources"
    assert f"bootstrap: added apt source {dest} ({codename}-backports main from http://mirror.invalid/debian)" in out
    log = (fake_apt.state / "apt.log").read_text().splitlines()
    assert len(log) == 3 and log[0].endswith(" update")
    assert log[1].endswith("install --no-install-recommends gdb")
    assert log[2].endswith(f"install --no-install-recommends -t {codename}-backports qemu-system-x86")
    assert out[-2:] == [f"bootstrap: debian packages installed", "rc=0"]


@pytest.mark.parametrize("codename", ["bookworm", "trixie"])
def test_a_bare_system_gets_python3_venv_and_ca_certificates(fake_apt, codename):
    """What a minimal Debian lacks, from the release's own suite."""
    installed = {k: v for k, v in ALL_OK[codename].items() if k not in ("python3-venv", "ca-certificates")}
    proc = fake_apt(installed, codename)
    assert "rc=0" in proc.stdout, proc.stderr
    log = (fake_apt.state / "apt.log").read_text().splitlines()
    assert [line.split(" install ", 1)[1] for line in log if " install " in line] == \
        ["--no-install-recommends python3-venv ca-certificates"]


@pytest.mark.parametrize("codename", ["bookworm", "trixie"])
def test_the_whole_script_follows_os_release(fake_apt, codename, tmp_path):
    """main(): os-release -> plan -> apt (fakes) -> the venv's fast path (this venv)."""
    stamp = Path(sys.prefix) / ".apx-bootstrap-stamp"
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or f"repo={REPO}\n" not in stamp.read_text() or f"pyproject={digest}" not in stamp.read_text():
        pytest.skip("needs this test to run in a venv bootstrapped from this checkout and pyproject.toml")
    installed = {**ALL_OK[codename], "qemu-system-x86": "1:7.2+dfsg-7+deb12u18"}
    for pkg, version in installed.items():
        (fake_apt.state / pkg).write_text(version + "\n")
    proc = subprocess.run([str(BOOTSTRAP)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, **fake_apt.env(codename), "APX_APT_ROOT": str(fake_apt.roots[codename]),
                               "APX_OS_RELEASE": str(os_release(tmp_path, OS_RELEASE[codename])),
                               "APX_VENV": sys.prefix, "APX_SKIP_KERNEL": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == (f"bootstrap: debian {codename} ({tmp_path / 'os-release'}): qemu-system-x86 from "
                      f"{codename}-backports, the rest from {codename}")
    log = (fake_apt.state / "apt.log").read_text()
    assert f"-t {codename}-backports qemu-system-x86" in log and "openssh-server" in log
    assert out[-1] == f"bootstrap: venv: {sys.prefix}"


def test_apt_failure_is_loud(fake_apt):
    (fake_apt.state / "fail-update").touch()
    installed = dict(ALL_OK["bookworm"])
    del installed["gcc"]  # something to install, so apt-get update runs (and fails)
    proc = fake_apt(installed)
    assert "rc=" not in proc.stdout and proc.returncode != 0
    err = proc.stderr.splitlines()
    assert "bootstrap:   | E: boom" in err
    assert err[-1] == "bootstrap: error: apt-get update failed"
    assert (fake_apt.state / "apt.log").read_text().count("install") == 0


# --- .ci/run: exit codes and result lines, with bootstrap, in-debian13, pytest and apx-tests faked ---

JUNIT = '<testsuites><testsuite tests="{t}" failures="{f}" errors="{e}" skipped="{s}" time="{time}"/></testsuites>'


def ci_run(tmp_path: Path, *, pytest_exit=0, probe_exit=0, d13_exit=0, d13_junit=True, codename="bookworm",
           **env) -> tuple[subprocess.CompletedProcess, Path]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    d13 = JUNIT.format(t=5, f=0, e=1, s=2, time=12.34) if d13_junit else ""
    fakes = {
        repo / "ci" / "bootstrap": "echo 'bootstrap: fake'\n",
        # Records its command line; "runs" the Debian 13 job: a JUnit file, then its exit status.
        repo / "ci" / "in-debian13": (f"printf '%s\\n' \"$@\" > in-debian13.args\n"
                                      + (f"echo '{d13}' > results/debian13-apx-junit.xml\n" if d13 else "")
                                      + f"exit {d13_exit}\n"),
        venv_bin / "pytest": f"echo pytest \"$@\" > pytest.args\nexit {pytest_exit}\n",
        venv_bin / "apx-tests": f"echo 'cpu: fake'\nexit {probe_exit}\n",
        venv_bin / "python": f'exec "{sys.executable}" "$@"\n',
    }
    for path, body in fakes.items():
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    (repo / "results").mkdir()
    (repo / "results" / "junit.xml").write_text(JUNIT.format(t=3, f=1, e=0, s=1, time=95.06))
    # A stale Debian 13 file from an earlier run must never be counted.
    (repo / "results" / "debian13-apx-junit.xml").write_text(JUNIT.format(t=99, f=0, e=0, s=0, time=1))
    base = {k: v for k, v in os.environ.items() if k not in ("APX_VENV", "APX_SKIP_DEBIAN13")}
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env={**base, "CI": "true", "APX_OS_RELEASE": str(os_release(tmp_path, OS_RELEASE[codename])),
                               **env})
    return proc, repo


@pytest.mark.parametrize("pytest_exit, probe_exit, d13_exit, want",
                         [(0, 0, 0, 0), (1, 0, 0, 1), (5, 0, 0, 5), (0, 3, 0, 3), (0, 0, 1, 1), (1, 0, 2, 1)])
def test_ci_run_exit_status(tmp_path, pytest_exit, probe_exit, d13_exit, want):
    proc, repo = ci_run(tmp_path, pytest_exit=pytest_exit, probe_exit=probe_exit, d13_exit=d13_exit)
    assert proc.returncode == want, proc.stdout + proc.stderr
    assert (repo / "pytest.args").read_text().split() == [
        "pytest", "--continue-on-collection-errors", "--junitxml=results/junit.xml"]
    assert (repo / "in-debian13.args").read_text().splitlines() == [
        "bash", "-c", 'ci/bootstrap && "$APX_VENV/bin/pytest" -m apx --continue-on-collection-errors '
                      "--junitxml=results/debian13-apx-junit.xml"]
    # One line per run, then the totals (both runs) last: what CI reads.
    assert proc.stdout.splitlines()[-3:] == ["debian12: 1 passed, 1 failed, 1 skipped (95.1 s)",
                                             "debian13: 2 passed, 1 failed, 2 skipped (12.3 s)",
                                             "tests: 3 passed, 2 failed, 3 skipped"]
    if pytest_exit == 5:
        assert ".ci/run: error: pytest collected no tests (exit 5)" in proc.stderr
    if d13_exit:
        assert f".ci/run: error: the Debian 13 run failed (exit {d13_exit})" in proc.stderr
    assert (repo / "results" / "probe.json").exists()  # the probe runs even after a test failure


def test_ci_run_without_debian13_results(tmp_path):
    """ci/in-debian13 failed before pytest (a bootstrap error, say): no stale counts, exit 1."""
    proc, repo = ci_run(tmp_path, d13_exit=1, d13_junit=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-3:] == ["debian12: 1 passed, 1 failed, 1 skipped (95.1 s)",
                                             "debian13: no results (ci/in-debian13 exit 1)",
                                             "tests: 1 passed, 1 failed, 1 skipped"]


@pytest.mark.parametrize("codename, env, why", [
    ("bookworm", {"APX_SKIP_DEBIAN13": "1"}, "skipped (APX_SKIP_DEBIAN13=1)"),
    ("trixie", {}, "skipped (this machine is Debian 13: the run above)"),
])
def test_ci_run_skips_debian13(tmp_path, codename, env, why):
    proc, repo = ci_run(tmp_path, d13_exit=1, codename=codename, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (repo / "in-debian13.args").exists()
    label = {"bookworm": "debian12", "trixie": "debian13"}[codename]
    assert proc.stdout.splitlines()[-3:] == [f"{label}: 1 passed, 1 failed, 1 skipped (95.1 s)",
                                             f"debian13: {why}",
                                             "tests: 1 passed, 1 failed, 1 skipped"]


# --- ci/in-debian13: namespaces, mounts, processes, exit status, with a tiny root filesystem ---

def in_debian13(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run([str(IN_DEBIAN13), *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env, **kw)


def test_in_debian13_usage():
    proc = in_debian13()
    assert proc.returncode == 2 and proc.stderr.startswith("usage: ci/in-debian13 [--rebuild] CMD [ARG...]")
    assert len(proc.stderr.splitlines()) == 1
    proc = in_debian13("--bogus", "true")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "in-debian13: error: unknown option --bogus"


def test_rootfs_key_follows_the_recipe(tmp_path):
    """Same recipe, same key; another package list, FORMAT or mirror: another key (a rebuild)."""
    script = ('k1=$(rootfs_key); k2=$(rootfs_key); ROOTFS_PACKAGES=(python3); k3=$(rootfs_key); '
              'ROOTFS_PACKAGES=(); FORMAT=999; k4=$(rootfs_key); echo "$k1 $k2 $k3 $k4"; host_mirrors')
    env = {**os.environ, "APX_APT_ROOT": str(apt_root(tmp_path)),
           "APX_OS_RELEASE": str(os_release(tmp_path, OS_RELEASE["bookworm"]))}
    run = lambda: subprocess.run(["bash", "-c", f'source "{IN_DEBIAN13}"; {script}'], capture_output=True,
                                 text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    proc = run()
    assert proc.returncode == 0, proc.stderr
    (k1, k2, k3, k4), mirrors = proc.stdout.splitlines()[0].split(), proc.stdout.splitlines()[1]
    assert k1 == k2 and len({k1, k3, k4}) == 3 and re.fullmatch(r"[0-9a-f]{16}", k1)
    # The rootfs uses this machine's mirror (its own release's entry), security included.
    assert mirrors == "http://mirror.invalid/debian http://security.mirror.invalid/debian-security"
    (tmp_path / "root/etc/apt/sources.list.d/debian.sources").write_text(
        DEBIAN_SOURCES.replace("mirror.invalid/debian\n", "other.invalid/debian\n"))
    assert run().stdout.split()[0] != k1


def tiny_rootfs(path: Path) -> Path:
    """Enough to chroot into: dash as /bin/sh, env, sleep, cat and the libraries ldd names."""
    for d in ("dev", "proc", "sys", "tmp", "etc", "root"):
        (path / d).mkdir(parents=True)
    for target, name in (("bin/sh", "dash"), ("usr/bin/env", "env"), ("bin/sleep", "sleep"), ("bin/cat", "cat")):
        source = shutil.which(name)
        (path / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, path / target)
        libs = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", source], capture_output=True, text=True).stdout)
        for lib in libs:
            (path / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, path / lib.lstrip("/"))
    return path


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root))]


def processes_in(root: Path) -> list[int]:
    """Processes whose root directory is `root` (chrooted there)."""
    return [pid for pid in procfs.pids() if procfs.root(pid) == str(root)]


needs_root_and_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "chroot", "ldd", "dash")),
    reason="ci/in-debian13 needs root, unshare, chroot (and ldd, dash for the tiny rootfs)")


@needs_root_and_unshare
def test_in_debian13_runs_the_command_and_leaves_nothing(tmp_path):
    rootfs = tiny_rootfs(tmp_path / "rootfs")
    home = tmp_path / "home"
    (home / ".config/pip").mkdir(parents=True)
    (home / ".config/pip/pip.conf").write_text("[global]\nindex-url = https://pypi.invalid/simple\n")
    script = ('echo "cwd=$PWD"; [ -f "$1/pyproject.toml" ] && echo repo; [ -e /proc/1/status ] && echo proc; '
              '[ -e /dev/null ] && [ -d /sys/kernel ] && echo dev-sys; cat /root/.config/pip/pip.conf; '
              '[ -s /etc/resolv.conf ] && echo resolv; env; sleep 1000 & exit 3')
    # Another run's process in the same rootfs: not ours to kill.
    other = subprocess.Popen(["chroot", str(rootfs), "/bin/sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        proc = in_debian13("/bin/sh", "-c", script, "sh", str(REPO), cwd=REPO / "tests",
                           env={"APX_DEBIAN13_ROOTFS": str(rootfs), "HOME": str(home),
                                "PIP_INDEX_URL": "https://x.invalid", "APX_QEMU": "/host/only/qemu",
                                "APX_REQUIRE": "1", "XDG_CACHE_HOME": "/host/cache"})
        assert other.poll() is None and processes_in(rootfs) == [other.pid]
    finally:
        other.kill()
        other.wait()
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout.splitlines()
    assert out[:3] == [f"cwd={REPO / 'tests'}", "repo", "proc"]  # pids are the host's: /proc/1 is its init
    assert {"dev-sys", "index-url = https://pypi.invalid/simple", "resolv"} <= set(out)
    env = dict(line.split("=", 1) for line in out if "=" in line and not line.startswith(("cwd=", "index-url")))
    assert env["APX_VENV"] == f"{REPO}/.venv-debian13" and env["HOME"] == "/root"
    assert env["PIP_INDEX_URL"] == "https://x.invalid" and env["APX_REQUIRE"] == "1"
    assert "APX_QEMU" not in env and "XDG_CACHE_HOME" not in env  # host paths stay outside
    assert re.fullmatch(r"\d+-\d+", env["APX_IN_DEBIAN13_SESSION"])  # marks this run's processes
    assert re.fullmatch(r"in-debian13: killing what the command left running: sleep\[\d+\]\n", proc.stderr)
    assert mounts_under(rootfs) == [] and processes_in(rootfs) == []


@needs_root_and_unshare
def test_in_debian13_killed_leaves_nothing(tmp_path):
    """SIGTERM while the command runs: everything inside dies, no mount is left."""
    rootfs = tiny_rootfs(tmp_path / "rootfs")
    proc = subprocess.Popen([str(IN_DEBIAN13), "/bin/sh", "-c", "echo ready; sleep 1000; echo not-reached"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "APX_DEBIAN13_ROOTFS": str(rootfs)})
    try:
        assert proc.stdout.readline() == "ready\n"
        assert processes_in(rootfs)  # the shell and its sleep, chrooted
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "not-reached" not in out
    assert err.splitlines() == ["in-debian13: stopped by signal 15: stopping everything inside"]
    deadline = time.monotonic() + 30  # the kernel tears the namespaces down after the kill
    while processes_in(rootfs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in(rootfs) == [] and mounts_under(rootfs) == []


@needs_root_and_unshare
def test_in_debian13_errors_are_one_line(tmp_path):
    proc = in_debian13("true", env={"APX_DEBIAN13_ROOTFS": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"in-debian13: error: APX_DEBIAN13_ROOTFS={tmp_path / 'none'} is not a directory"]
    (tmp_path / "empty").mkdir()
    proc = in_debian13("true", env={"APX_DEBIAN13_ROOTFS": str(tmp_path / "empty")})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"in-debian13: error: {tmp_path / 'empty'} is not a root filesystem (no dev, proc, sys or tmp in it)"]
    assert mounts_under(tmp_path) == []


# --- bytecode: written once where PYTHONDONTWRITEBYTECODE keeps runs from writing it ---------


def _write_bytecode(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f'source "{BOOTSTRAP}"; write_bytecode "{REPO}" "{sys.prefix}"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def test_bytecode_is_left_to_python_when_it_may_write():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = _write_bytecode(env)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr


def test_bytecode_is_cached_for_the_package_and_the_main_jobs_test_modules():
    """With PYTHONDONTWRITEBYTECODE set: apx_tests' modules compiled, and pytest's rewritten
    ones for the suite (what a later `pytest -m apx` reads instead of compiling)."""
    proc = _write_bytecode({**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("bootstrap: bytecode cached (PYTHONDONTWRITEBYTECODE is set): apx_tests and the main "
                           "job's test modules\n"), proc.stdout
    tag = sys.implementation.cache_tag
    assert (REPO / "apx_tests" / "__pycache__" / f"cases.{tag}.pyc").is_file()
    assert list((REPO / "apx_tests" / "suite" / "__pycache__").glob(f"test_scenarios.{tag}-pytest-*.pyc"))
