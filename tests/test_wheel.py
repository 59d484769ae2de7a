"""The plugin as CI consumes it: a wheel (not an editable install) in a clean venv.

- The lookup and the prebuilt fallback, in-process: an installed wheel finds its copy of
  guests/ (apx_tests/_guests); without a usable llvm-mc its prebuilt payloads and boot
  stub (apx_tests/_prebuilt) serve only if built from exactly the installed sources;
  every refusal is one line naming what is missing and where.
- End to end: build the wheel with setup.py's build step, install it into a fresh venv,
  run ``pytest -m apx --pyargs apx_tests.suite`` from an empty directory and compare the
  outcome of every test id with the checkout's ``pytest -m apx apx_tests/suite``; then
  again with llvm-mc out of reach, where the KVM and QEMU cases must still pass on the
  wheel's prebuilt code alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from apx_tests.pytest import plugin
from apx_tests.guests import boot, build
from apx_tests.guests.build import GuestBuildError, available_banks, build_payload, have_llvm_mc
from apx_tests.guests.linux_kernel import KernelUnavailable, find_kernel

REPO = Path(__file__).resolve().parents[1]
needs_llvm = pytest.mark.skipif(not have_llvm_mc(), reason="llvm-mc ≥ 18 not installed (Debian: llvm-19)")
MISSING_XMM = "APX_LLVM_MC={} is not a runnable llvm-mc; llvm-mc ≥ 18 needed to assemble guests/payload/xmm.S"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test its own build cache: a cached build must not hide what the prebuilt does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def prebuilt(tmp_path, monkeypatch) -> Path:
    """A wheel's apx_tests/_prebuilt, written by the same writer setup.py uses, from the
    checkout's guests/; then llvm-mc is made unusable ($APX_LLVM_MC pointing nowhere)."""
    if not have_llvm_mc():
        pytest.skip("llvm-mc ≥ 18 not installed (Debian: llvm-19): nothing to prebuild with")
    directory = tmp_path / "_prebuilt"
    directory.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "wheel-build-cache"))  # as on another machine
    built, errors = build.write_prebuilt(lambda name, data: (directory / name).write_bytes(data),
                                         extra=[boot.PREBUILT_STUB])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert errors == {} and set(built) == set(available_banks())
    monkeypatch.setattr(build, "prebuilt_dir", lambda: directory)
    monkeypatch.setenv("APX_LLVM_MC", str(tmp_path / "nowhere"))
    return directory


@pytest.fixture
def guests_copy(tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "guests"
    shutil.copytree(build.guests_dir(), copy)
    monkeypatch.setenv("APX_GUESTS_DIR", str(copy))
    return copy


# --- finding the sources ---------------------------------------------------------------------


def test_checkout_guests_are_the_source_of_truth():
    assert build.checkout_guests_dir() == REPO / "guests"
    assert build.guests_dir() == REPO / "guests"
    assert not build.shipped_guests_dir().exists(), "an editable install must not write apx_tests/_guests"


def test_installed_package_finds_its_copy(tmp_path, monkeypatch):
    """Installed: no pyproject.toml next to the package, guests/ is apx_tests/_guests."""
    package = tmp_path / "site-packages" / "apx_tests"
    shutil.copytree(REPO / "guests", package / "_guests")
    monkeypatch.setattr(build, "PACKAGE_DIR", package)
    monkeypatch.delenv("APX_GUESTS_DIR", raising=False)
    assert build.checkout_guests_dir() is None
    assert build.guests_dir() == package / "_guests"
    source = build.payload_source("xmm")
    # Paths in errors are absolute there: "_guests/payload/xmm.S" would point nowhere.
    assert build._display(source) == str((package / "_guests" / "payload" / "xmm.S").resolve())


def test_no_sources_anywhere_is_one_line(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "apx_tests"
    package.mkdir(parents=True)
    monkeypatch.setattr(build, "PACKAGE_DIR", package)
    monkeypatch.delenv("APX_GUESTS_DIR", raising=False)
    with pytest.raises(GuestBuildError) as error:
        build_payload("xmm")
    assert str(error.value) == (
        f"guest sources not found: neither {tmp_path / 'site-packages' / 'guests'} (a checkout) nor "
        f"{package / '_guests'} (an installed wheel) is a directory; set APX_GUESTS_DIR to the guests/ "
        "directory of an apx_tests checkout")


def test_source_digest_does_not_depend_on_the_location(guests_copy, monkeypatch):
    moved = build.source_digest(build.payload_source("apx"))
    monkeypatch.delenv("APX_GUESTS_DIR")
    assert build.source_digest(build.payload_source("apx")) == moved
    assert build.source_digest(build.payload_source("xmm")) != moved


# --- the prebuilt fallback -------------------------------------------------------------------


def test_prebuilt_payloads_and_stub_serve_without_llvm(prebuilt):
    manifest = json.loads((prebuilt / "manifest.json").read_text())
    assert set(manifest) == set(available_banks()) | {build.BOOT_STUB}
    assert not have_llvm_mc()
    for bank in available_banks():
        payload = build_payload(bank)
        assert payload.code == (prebuilt / f"{bank}.bin").read_bytes()
        assert payload.code_sha256 == manifest[bank]["code_sha256"]
        assert payload.digest == manifest[bank]["digest"]
    stub = boot.boot_stub()
    assert stub.code == (prebuilt / "boot-stub.bin").read_bytes() and stub.symbols["IMAGE_BASE"] == 0x100000
    # Nothing was assembled: the build cache stayed empty.
    assert not build.cache_dir().exists()


def test_llvm_not_on_path_uses_the_prebuilt_too(prebuilt, tmp_path, monkeypatch):
    monkeypatch.delenv("APX_LLVM_MC")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert build_payload("ymm").code == (prebuilt / "ymm.bin").read_bytes()


def test_llvm_wins_over_the_prebuilt(prebuilt, monkeypatch):
    """Sources are built where they can be: the prebuilt code is only a stand-in."""
    monkeypatch.delenv("APX_LLVM_MC")
    payload = build_payload("xmm")
    assert build.cache_dir().joinpath(f"xmm-{payload.digest}.bin").is_file()
    assert payload.code == (prebuilt / "xmm.bin").read_bytes()


def test_edited_sources_refuse_the_prebuilt(prebuilt, guests_copy, tmp_path):
    ymm = guests_copy / "payload" / "ymm.S"
    ymm.write_text(ymm.read_text() + "# a comment is an edit too\n")
    with pytest.raises(GuestBuildError) as error:
        build_payload("ymm")
    missing = MISSING_XMM.format(tmp_path / "nowhere").replace("xmm.S", "ymm.S")
    assert str(error.value) == (f"{missing}; the prebuilt payload for bank ymm in {prebuilt} was built "
                                "from other sources than guests/payload/ymm.S")
    assert build_payload("xmm").code == (prebuilt / "xmm.bin").read_bytes()  # only its own sources count
    # The shared include is a source of every bank.
    common = guests_copy / "payload" / "common.S"
    common.write_text(common.read_text() + "\n")
    with pytest.raises(GuestBuildError, match="built from other sources than guests/payload/xmm.S$"):
        build_payload("xmm")
    multiboot = guests_copy / "boot" / "multiboot.S"
    multiboot.write_text(multiboot.read_text() + "\n")
    with pytest.raises(GuestBuildError, match=r"the prebuilt boot stub in .* was built from other sources "
                                              r"than guests/boot/multiboot\.S$"):
        boot.boot_stub()


def test_damaged_prebuilt_is_refused(prebuilt, tmp_path):
    (prebuilt / "xmm.bin").write_bytes(b"\x90" * 16)
    with pytest.raises(GuestBuildError) as error:
        build_payload("xmm")
    assert str(error.value) == (f"{MISSING_XMM.format(tmp_path / 'nowhere')}; the prebuilt payload for bank xmm "
                                f"{prebuilt / 'xmm.bin'} does not match the sha256 in {prebuilt / 'manifest.json'}")
    (prebuilt / "xmm.bin").unlink()
    with pytest.raises(GuestBuildError, match=r"xmm\.bin is unreadable \(No such file or directory\)$"):
        build_payload("xmm")
    (prebuilt / "manifest.json").write_text("[1, 2")
    with pytest.raises(GuestBuildError, match=r"manifest\.json is unreadable \(") as error:
        build_payload("xmm")
    assert "\n" not in str(error.value)


def test_a_bank_that_failed_at_wheel_build_says_why(prebuilt, tmp_path):
    manifest = json.loads((prebuilt / "manifest.json").read_text())
    del manifest["apx"]
    (prebuilt / "manifest.json").write_text(json.dumps(manifest))
    (prebuilt / "apx.bin").unlink()
    (prebuilt / "apx.error").write_text("llvm-mc ≥ 18 not found (install llvm-19); needed to assemble "
                                        "guests/payload/apx.S")
    with pytest.raises(GuestBuildError) as error:
        build_payload("apx")
    assert str(error.value).endswith("; no prebuilt payload for bank apx either: it failed when the wheel was "
                                     "built: llvm-mc ≥ 18 not found (install llvm-19); needed to assemble "
                                     "guests/payload/apx.S")
    (prebuilt / "apx.error").unlink()
    with pytest.raises(GuestBuildError, match=r"no prebuilt payload for bank apx either: .*manifest\.json "
                                              r"has no apx$"):
        build_payload("apx")


def test_no_prebuilt_directory_keeps_the_plain_error(tmp_path, monkeypatch):
    """A checkout ships nothing prebuilt: the error is exactly the assembler's."""
    monkeypatch.setattr(build, "prebuilt_dir", lambda: tmp_path / "absent")
    monkeypatch.setenv("APX_LLVM_MC", str(tmp_path / "nowhere"))
    with pytest.raises(GuestBuildError) as error:
        build_payload("xmm")
    assert str(error.value) == MISSING_XMM.format(tmp_path / "nowhere")


# --- end to end: wheel -> clean venv -> the shipped suite ------------------------------------

# Both routes run the same selection: the KVM and QEMU-TCG cases (seconds) and one Linux
# restore case, which builds /init and the holder from the wheel's guests/linux sources
# (the other Linux cases take that same path again, at about 13 s each). Newer plugins
# select the Linux cases with a backend of their own; older ones ran them under qemu-tcg.
LINUX_CASE = "xmm-restore"


def _selection(*, linux: bool = True) -> list[str]:
    backends = ["kvm", "qemu-tcg"] + [b for b in ("qemu-tcg-linux",) if linux and b in plugin.BACKEND_CHOICES]
    keyword = f"not test_linux or {LINUX_CASE}" if linux else "not test_linux"
    return [arg for b in backends for arg in ("--apx-backend", b)] + ["-k", keyword]


def _outcomes(junit: Path) -> dict[tuple[str, str], str]:
    """(module or class, test name with its parameters) -> passed/skipped/failure/error.

    The classname's last part only: a checkout run names modules apx_tests.suite.test_x,
    a --pyargs run from elsewhere may name them by file alone.
    """
    result = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        result[(case.get("classname").rsplit(".", 1)[-1], case.get("name"))] = kinds[-1] if kinds else "passed"
    return result


def _copy_tree(dest: Path) -> Path:
    """A copy of the working tree (uncommitted edits included, as the checkout run sees them)
    without venvs, VCS data and build outputs. pip builds in place, writing build/ and
    *.egg-info into the tree it is given: that must not be the checkout."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "results", "__pycache__", "*.egg-info",
                                    ".pytest_cache", ".hypothesis", "*.pyc")
    return Path(shutil.copytree(REPO, dest, ignore=ignore, symlinks=True))


def _run(argv, *, cwd, env) -> subprocess.CompletedProcess:
    # The timeout only guards against a hang; nothing here asserts how long a step took.
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800, stdin=subprocess.DEVNULL)


def _tail(proc: subprocess.CompletedProcess, lines: int = 25) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def _wheel_build_args() -> list[str]:
    """--no-build-isolation when this venv can build wheels itself (setuptools >= 64 and,
    for setuptools before 70.1, the wheel package): offline and faster. Else pip fetches
    setuptools into an isolated build environment from the index."""
    try:
        import setuptools
        version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return []
    if version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel")):
        return ["--no-build-isolation"]
    return []


@pytest.fixture(scope="module")
def workdir():
    """One temporary directory for the module's wheel, venv, caches and reports; removed at
    the end whatever happened (the venv alone is some 100 MB)."""
    with tempfile.TemporaryDirectory(prefix="apx-wheel-test-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def child_env(workdir):
    """The environment of the child runs: nothing from this run that would steer them
    (pytest options, xdist, guest overrides), temporary files inside `workdir`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k not in ("APX_GUESTS_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    tmp = workdir / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    try:  # the same guest kernel for every run, though each has its own cache
        env["APX_KERNEL"] = str(find_kernel(fetch=False))
    except KernelUnavailable:
        pass  # then the Linux cases skip alike in every run
    return env


@pytest.fixture(scope="module")
def wheel(workdir, child_env) -> Path:
    if not have_llvm_mc():
        pytest.skip("llvm-mc ≥ 18 not installed (Debian: llvm-19): the wheel would carry no prebuilt payloads")
    source = _copy_tree(workdir / "src")
    dist = workdir / "dist"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *_wheel_build_args(), "-w", dist, source],
                cwd=workdir, env=child_env)
    assert proc.returncode == 0, f"pip wheel failed:\n{_tail(proc)}"
    wheels = sorted(dist.glob("apx_tests-*.whl"))
    assert len(wheels) == 1, f"pip wheel wrote {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(workdir, wheel, child_env) -> Path:
    """A clean venv with the wheel and its dependencies from the index.

    Clean (no --system-site-packages, nothing from .venv) because that is what CI gets:
    the dependencies then come from the wheel's own metadata, which is under test too,
    and no editable apx_tests can shadow the installed one. Created without pip and filled
    by this venv's pip (--python), which saves ensurepip; pip's own cache (~/.cache/pip,
    left as it is) makes the dependency downloads a one-time cost.
    """
    target = workdir / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", target], cwd=workdir, env=child_env)
    assert proc.returncode == 0, _tail(proc)
    python = target / "bin" / "python"
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
                 wheel], cwd=workdir, env=child_env)
    assert proc.returncode == 0, f"pip install of {wheel.name} failed:\n{_tail(proc)}"
    return target


def _suite_run(name: str, argv: list, *, cwd: Path, env: dict, workdir: Path, linux: bool = True) -> dict:
    """One pytest run of the shipped suite with its own build cache, basetemp and report."""
    run_dir = workdir / name
    run_dir.mkdir()
    junit = run_dir / "junit.xml"
    env = {**env, "XDG_CACHE_HOME": str(run_dir / "cache")}
    proc = _run([*argv, "-m", "apx", "-p", "no:cacheprovider", "-q", *_selection(linux=linux),
                 f"--junitxml={junit}", f"--basetemp={run_dir / 'basetemp'}"], cwd=cwd, env=env)
    assert junit.is_file(), f"{name}: pytest wrote no report (exit {proc.returncode}):\n{_tail(proc)}"
    assert "guest sources not found" not in proc.stdout + proc.stderr, _tail(proc)
    return {"outcomes": _outcomes(junit), "proc": proc, "cache": run_dir / "cache"}


def test_the_wheel_carries_guests_and_prebuilt_code(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in sorted(p for p in (REPO / "guests").rglob("*") if p.is_file()):
            rel = path.relative_to(REPO / "guests").as_posix()
            assert zf.read(f"apx_tests/_guests/{rel}") == path.read_bytes(), rel
        manifest = json.loads(zf.read("apx_tests/_prebuilt/manifest.json"))
        assert set(manifest) == set(available_banks()) | {build.BOOT_STUB}
        for name, entry in manifest.items():
            assert f"apx_tests/_prebuilt/{entry['file']}" in names
        # The checkout's own build of the same sources (llvm-mc is here): the same bytes.
        for bank in available_banks():
            assert manifest[bank]["code_sha256"] == build_payload(bank).code_sha256, bank
            assert manifest[bank]["source_digest"] == build.source_digest(build.payload_source(bank)), bank
        assert manifest[build.BOOT_STUB]["source_digest"] == build.source_digest(boot.boot_source())
        assert not [n for n in names if n.endswith(".error")]


def test_installed_wheel_gives_the_checkouts_outcomes(workdir, venv, child_env, record_property):
    empty = workdir / "empty"
    empty.mkdir()
    where = _run([venv / "bin" / "python", "-c",
                  "from apx_tests.guests import build; print(build.guests_dir()); print(build.prebuilt_dir())"],
                 cwd=empty, env=child_env)
    assert where.returncode == 0, _tail(where)
    site = _run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=empty, env=child_env).stdout.strip()
    assert where.stdout.split() == [f"{site}/apx_tests/_guests", f"{site}/apx_tests/_prebuilt"]

    checkout = _suite_run("checkout", [sys.executable, "-m", "pytest", "apx_tests/suite"], cwd=REPO,
                          env=child_env, workdir=workdir)
    installed = _suite_run("installed", [venv / "bin" / "pytest", "--pyargs", "apx_tests.suite"], cwd=empty,
                           env=child_env, workdir=workdir)
    assert list(empty.iterdir()) == [], "a run from the empty directory left files there"
    for name, run in (("checkout", checkout), ("installed", installed)):
        record_property(f"{name}_outcomes", json.dumps(dict(Counter(run["outcomes"].values())), sort_keys=True))
    want, got = checkout["outcomes"], installed["outcomes"]
    assert want, f"the checkout run collected nothing:\n{_tail(checkout['proc'])}"
    differ = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
    assert not differ, f"(checkout, installed) outcomes differ: {differ}\n{_tail(installed['proc'])}"

    # llvm-mc out of reach: the payloads and the boot stub can only be the wheel's prebuilt
    # ones. The Linux cases are left out: they assemble and compile on the host (gcc), and
    # skip without llvm-mc.
    no_llvm_env = {**child_env, "APX_LLVM_MC": str(workdir / "no-llvm-mc")}
    no_llvm = _suite_run("no-llvm", [venv / "bin" / "pytest", "--pyargs", "apx_tests.suite"], cwd=empty,
                         env=no_llvm_env, workdir=workdir, linux=False)
    got = {k: v for k, v in no_llvm["outcomes"].items() if k[0] != "test_linux"}
    want = {k: v for k, v in want.items() if k[0] != "test_linux"}
    differ = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
    assert not differ, f"(checkout, without llvm-mc) outcomes differ: {differ}\n{_tail(no_llvm['proc'])}"
    record_property("no_llvm_outcomes", json.dumps(dict(Counter(got.values())), sort_keys=True))
    kvm_passed = [k for k, v in got.items() if v == "passed" and "[kvm-" in k[1]]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert kvm_passed, f"no KVM case passed without llvm-mc:\n{_tail(no_llvm['proc'])}"
    assert not (no_llvm["cache"] / "apx_tests" / "guests").exists(), "something was assembled without llvm-mc"
