"""Linux guests (apx_tests.guests.linux, linux_kernel, linux_programs, initramfs): the
initramfs writer, the generated pattern header, the register holder (natively and its
disassembly), the kernel lookup and fetch (with fake apt tools), one-line errors, and
real boots of the Debian cloud kernel under QEMU TCG -cpu max:

- boot 1 runs holders xmm, ymm, x87, the ymm context-switch pair, apx (skips: TCG has no
  APX) and a holder with a deliberately wrong expected table, pauses the VM with QMP
  while the first holder spins, and exits through isa-debug-exit (status 2: a failure);
- boot 2 holds ymm and a ctx-xmm pair until the host sends `apx-release` on the console,
  across a QMP stop/cont, and exits with status 1 (all passed).

QEMU is started here with a few lines of subprocess code; the QEMU backend proper lives in
apx_tests.qemu. Every QEMU is killed and every temporary directory removed.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from apx_tests.guests import build, elf, initramfs, linux, linux_kernel, linux_programs
from apx_tests.guests.build import GuestBuildError
from apx_tests.guests.linux_kernel import KernelUnavailable
from apx_tests.xsave.banks import BANKS

REPO = Path(__file__).resolve().parents[1]
QEMU = shutil.which(os.environ.get("APX_QEMU") or "qemu-system-x86_64")
BOOT_TIMEOUT = 90  # seconds for a whole boot; a healthy one takes 3-8 s
WRONG = ("ymm13", 21)  # the deliberately wrong byte of the negative holder
STOP_SECONDS = 1.0  # boot 1 keeps the VM stopped this long while xmm spins
SPIN_MS = 300

needs_toolchain = pytest.mark.skipif(not (build.have_llvm_mc() and shutil.which("gcc")),
                                     reason="needs llvm-mc >= 18 and gcc (ci/bootstrap installs them)")


# --- the initramfs --------------------------------------------------------------


def test_initramfs_round_trip_and_layout(tmp_path):
    exe = tmp_path / "prog"
    exe.write_bytes(b"\x7fELF-ish")
    exe.chmod(0o755)
    out = initramfs.build_initramfs({"/init": exe, "etc/deep/motd": b"hello\n",
                                 "bin/tool": initramfs.File(b"#!/bin/sh\n", 0o700)}, tmp_path / "a.cpio")
    data = out.read_bytes()
    entries = initramfs.read_initramfs(data)
    assert list(entries) == sorted(entries), "parents must come before children"
    assert entries["init"].data == b"\x7fELF-ish" and entries["init"].mode == 0o100755
    assert entries["etc/deep/motd"].mode == 0o100644 and entries["etc/deep/motd"].data == b"hello\n"
    assert entries["bin/tool"].mode == 0o100700
    assert entries["etc"].mode == entries["etc/deep"].mode == 0o040755  # parents added
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    for d in ("dev", "proc", "sys", "run", "bin"):
        assert stat.S_ISDIR(entries[d].mode)
    # newc: every header starts on a 4-byte boundary, names are NUL-terminated.
    assert data.startswith(b"070701") and data.count(b"TRAILER!!!\0") == 1
    pos = 0
    while True:
        assert pos % 4 == 0 and data[pos:pos + 6] == b"070701"
        namesize, filesize = int(data[pos + 94:pos + 102], 16), int(data[pos + 54:pos + 62], 16)
        assert data[pos + 110 + namesize - 1] == 0
        if data[pos + 110:pos + 110 + namesize - 1] == b"TRAILER!!!":
            break
        pos += 110 + namesize
        pos += -pos % 4 + filesize
        pos += -pos % 4
    # Reproducible, and gzip holds the same archive.
    again = initramfs.build_initramfs({"/init": exe, "etc/deep/motd": b"hello\n",
                                   "bin/tool": initramfs.File(b"#!/bin/sh\n", 0o700)}, tmp_path / "b.cpio")
    assert again.read_bytes() == data
    packed = initramfs.build_initramfs({"/init": exe, "etc/deep/motd": b"hello\n",
                                    "bin/tool": initramfs.File(b"#!/bin/sh\n", 0o700)}, tmp_path / "c.cpio.gz",
                                   compress=True)
    assert gzip.decompress(packed.read_bytes()) == data
    assert initramfs.read_initramfs(packed.read_bytes()).keys() == entries.keys()


@pytest.mark.parametrize("files, message", [
    ({"../etc/passwd": b""}, "without '..'"),
    ({"/": b""}, "must name something"),
    ({"init": b"x", "init/sub": b"y"}, "'init' is not a directory"),
])
def test_initramfs_rejects_bad_paths(tmp_path, files, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        initramfs.build_initramfs(files, tmp_path / "x.cpio")


def test_initramfs_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(GuestBuildError) as err:
        initramfs.build_initramfs({"init": tmp_path / "missing"}, tmp_path / "x.cpio")
    assert str(err.value) == f"initramfs init: cannot read {tmp_path / 'missing'}: No such file or directory"


def test_c_and_python_agree_on_the_shared_constants():
    init = (REPO / "guests/linux/init.c").read_text()
    define = dict(re.findall(r'^#define (\w+) (.+?)(?: /\*.*)?$', init, re.M))
    assert define["DEFAULT_RUN"] == json.dumps(",".join(linux.DEFAULT_RUN))
    assert define["RELEASE_LINE"] == json.dumps(linux.RELEASE_LINE)
    assert int(define["MAX_STAGE"]) == linux_programs.STAGES - 1
    assert 'say("# apx-init: done pass=' in init and linux.DONE_PREFIX == "# apx-init: done"
    assert "power_off(count[FAIL] ? 2 : 1" in init and (linux.EXIT_STATUS_PASS, linux.EXIT_STATUS_FAIL) == (1, 2)
    hold = (REPO / "guests/linux/hold.S").read_text()
    offsets = {k: int(v, 16) for k, v in re.findall(r"\.set (HB_\w+|LOAD_AREA|STORE_AREA),\s+(0x[0-9a-f]+)", hold)}
    holder = (REPO / "guests/linux/holder.c").read_text()
    asserted = {name: int(value, 16) for value, name in
                re.findall(r'offsetof\(struct hold_block, \w+\) == (0x[0-9a-f]+), "(\w+)"', holder)}
    assert asserted == offsets  # holder.c checks each offset against its struct at compile time


# --- the generated pattern header -------------------------------------------------


def _header_arrays(text: str) -> dict[str, bytes]:
    out = {}
    for m in re.finditer(r"static const uint8_t (\w+)\[(\d+)\] = \{(.*?)\};", text, re.S):
        out[m.group(1)] = bytes(int(v, 16) for v in re.findall(r"0x([0-9a-f]{2})", m.group(3)))
        assert len(out[m.group(1)]) == int(m.group(2))
    return out


def test_holder_header_carries_the_xsave_patterns():
    banks = linux_programs.holder_banks()
    assert set(banks) >= {"apx", "xmm", "ymm", "x87", "opmask", "zmm_hi256", "hi16_zmm"}
    text = linux_programs.holder_header(banks)
    arrays = _header_arrays(text)
    for name in banks:
        bank = BANKS[name]
        want = b"".join(bank.pack(bank.pattern(stage)) for stage in range(linux_programs.STAGES))
        assert arrays[f"apx_load_{name}"] == want, name
        assert f'"{bank.names[0]}"' in text and f"{bank.xcr0_mask:#x}ULL" in text
    assert "apx_expect_" not in text  # expected = loaded unless asked otherwise
    assert '"APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)"' in text  # from probe.parse_cpuid_requirement


def test_wrong_expect_inverts_exactly_one_byte_per_stage():
    arrays = _header_arrays(linux_programs.holder_header(["xmm", "ymm"], WRONG))
    load, expect = arrays["apx_load_ymm"], arrays["apx_expect_ymm"]
    bank = BANKS["ymm"]
    offset = bank.names.index(WRONG[0]) * 32 + WRONG[1]
    diffs = [i for i in range(len(load)) if load[i] != expect[i]]
    assert diffs == [stage * bank.size + offset for stage in range(linux_programs.STAGES)]
    assert all(expect[i] == load[i] ^ 0xFF for i in diffs)
    assert "apx_expect_xmm" not in arrays


@pytest.mark.parametrize("wrong, message", [
    (("zmm40", 0), "wrong_expect: no register 'zmm40' in the holder's banks (xmm, ymm)"),
    (("ymm3", 32), "wrong_expect: ymm3 has bytes 0..31, not 32"),
])
def test_wrong_expect_is_checked(wrong, message):
    with pytest.raises(GuestBuildError) as err:
        linux_programs.holder_header(["xmm", "ymm"], wrong)
    assert str(err.value) == message


# --- the hold functions, read back ------------------------------------------------

SPIN_MNEMONICS = {"movq", "movl", "xorl", "incq", "cmpl", "cmpq", "testq", "je", "jne", "jb", "syscall", "pause",
                  "rdtsc", "shlq", "orq"}
SPIN_REGISTERS = {"rax", "eax", "rcx", "rdx", "edx", "rsi", "esi", "rdi", "edi", "r8", "r11"}


@needs_toolchain
@pytest.mark.parametrize("bank", ["apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87"])
def test_hold_function_keeps_the_bank_untouched_while_it_spins(tmp_path, bank):
    obj = linux_programs._assemble_hold(build.find_llvm_mc(), bank, tmp_path)
    sections = elf.read_sections(obj.read_bytes())
    assert not any(s.is_relocation for s in sections), "the hold function must not need relocations"
    code = next(s.data for s in sections if s.name == ".text")
    insns = build.decode(code)
    texts = [i.text for i in insns]
    split = texts.index("movq %rdi, %r8")
    last_branch = max(k for k, t in enumerate(texts) if t.startswith("jb "))
    end = texts.index("movq %rsi, 32(%rdi)")
    load, spin, store = insns[:split], insns[split:last_branch + 1], insns[last_branch + 1:end]
    assert texts[end + 1:] == ["retq"]
    count = len(BANKS[bank].registers)
    assert len(load) == count + (1 if bank == "x87" else 0)
    assert len(store) == count
    # The same load and store sequences as the KVM/QEMU payload (guests/payload/<bank>.S),
    # up to where the areas are (payload: LOAD 0x1000, STORE 0x3000; holder: 0x1000, 0x2000).
    payload = [i.text for i in build.decode(build.build_payload(bank).code)]

    def rebase(seq, base):
        return [re.sub(r"(-?\d+)\(%rdi\)", lambda m: f"{int(m.group(1)) - base}(%rdi)", t) for t in seq]

    def contains(haystack, needle):
        return any(haystack[k:k + len(needle)] == needle for k in range(len(haystack) - len(needle) + 1))

    assert contains(rebase(payload, 0x1000), rebase([i.text for i in load], 0x1000)), "load differs from the payload"
    assert contains(rebase(payload, 0x3000), rebase([i.text for i in store], 0x2000)), "store differs from the payload"
    assert all("(%rdi)" in i.text for i in load + store if i.text != "fninit")
    # Between the load and the store: the spin loop, nothing else.
    for insn in spin:
        mnemonic = insn.text.split()[0]
        assert mnemonic in SPIN_MNEMONICS, insn
        assert set(re.findall(r"%(\w+)", insn.text)) <= SPIN_REGISTERS, insn
    assert [i.text for i in spin].count("syscall") == 2  # write(ready) once; sched_yield if asked
    assert not any(t.startswith("call") for t in texts)
    if bank == "apx":
        assert all(i.encoding[0] == 0xD5 for i in load + store)  # REX2


# --- the holder, run natively on this host -----------------------------------------


@pytest.fixture(scope="module")
def holders():
    if not (build.have_llvm_mc() and shutil.which("gcc")):
        pytest.skip("needs llvm-mc >= 18 and gcc (ci/bootstrap installs them)")
    return linux_programs.build_holder(), linux_programs.build_holder(wrong_expect=WRONG)


def _hold(holder, *args, timeout=30):
    return subprocess.run([str(holder), *args], capture_output=True, text=True, timeout=timeout)


def _host_can(bank: str) -> bool:
    from apx_tests import hostcpu
    from apx_tests.probe import parse_cpuid_requirement
    b = BANKS[bank]
    try:
        xcr0 = hostcpu.xgetbv(0) if hostcpu.osxsave() else 0x3
        return all(req.value(hostcpu.cpuid) for req in parse_cpuid_requirement(b.cpuid_requirement)) \
            and not b.xcr0_mask & ~xcr0
    except Exception:  # pragma: no cover - no cpuid access
        return False


@pytest.mark.parametrize("bank", ["xmm", "ymm", "x87", "opmask", "zmm_hi256", "hi16_zmm", "apx"])
def test_holder_on_the_host(holders, bank):
    proc = _hold(holders[0], bank, "--spin-ms", "20")
    if not _host_can(bank):
        assert proc.returncode == 2, proc.stdout
        assert re.fullmatch(rf"apx-holder: done bank={bank} pid=\d+: skip (CPU lacks|XCR0) .*\n", proc.stdout)
        return
    assert proc.returncode == 0, proc.stdout
    ready, done = proc.stdout.splitlines()
    assert re.fullmatch(rf"apx-holder: ready bank={bank} pid=\d+ load=1 expect=1 yield=0 spin_ms=20 "
                        r"spin=0x[0-9a-f]+-0x[0-9a-f]+", ready)
    assert re.fullmatch(rf"apx-holder: done bank={bank} pid=\d+: ok spins=\d+", done)
    assert int(done.rsplit("=", 1)[1]) >= 1  # counted before the first deadline check: not a timing bound


def test_holder_reports_the_first_wrong_byte(holders):
    good, wrong = holders
    pattern = BANKS["ymm"].pattern(1)[WRONG[0]][WRONG[1]]
    proc = _hold(wrong, "ymm", "--spin-ms", "5", "--result-fd", "1")
    assert proc.returncode == 1
    verdict = proc.stdout.splitlines()[-1]
    assert verdict.startswith(f"not ok ymm ymm13 byte 21: want 0x{pattern ^ 0xFF:02x} got 0x{pattern:02x} "
                              "(1 differing byte, spins=")
    # Loading stage 2 and expecting 3: everything differs, the report names the first byte.
    proc = _hold(good, "ymm", "--load", "2", "--expect", "3", "--spin-ms", "1")
    want, got = BANKS["ymm"].pattern(3)["ymm0"][0], BANKS["ymm"].pattern(2)["ymm0"][0]
    assert f"not ok ymm ymm0 byte 0: want 0x{want:02x} got 0x{got:02x} (512 differing bytes" in proc.stdout


def test_holder_context_switch_pair_on_one_cpu(holders):
    procs = [subprocess.Popen([str(holders[0]), "ymm", "--yield", "--cpu", "0", "--load", str(stage),
                               "--spin-ms", "100", "--result-fd", "1"], stdout=subprocess.PIPE, text=True)
             for stage in (1, 2)]
    outs = [p.communicate(timeout=30)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert re.search(r"^ok spins=\d+$", out, re.M)
        assert "yield=1" in out


@pytest.mark.parametrize("args, message", [
    ([], "error no bank given"),
    (["zmm"], "error no bank zmm in this holder"),
    (["ymm", "--load", "9"], "error bad --load stage"),
    (["ymm", "--frob", "1"], "error unknown option"),
    (["ymm", "--release", "/nonexistent/flag"], "error cannot map release flag /nonexistent/flag: No such file"),
])
def test_holder_usage_errors(holders, args, message):
    proc = _hold(holders[0], *args)
    assert proc.returncode == 3
    assert message in proc.stdout and len(proc.stdout.splitlines()) == 1


# --- builds, caches and one-line errors ------------------------------------------------


@needs_toolchain
def test_builds_are_cached_static_and_follow_their_sources(tmp_path, monkeypatch):
    init = linux_programs.build_init()
    assert linux_programs.build_init() == init  # cached: same path
    assert init.parent == linux_programs.build_cache_dir()
    out = subprocess.run(["file", str(init)], capture_output=True, text=True).stdout if shutil.which("file") else ""
    if out:
        assert "statically linked" in out
    # A changed wrong_expect is a different holder.
    assert linux_programs.build_holder(wrong_expect=("ymm1", 0)) != linux_programs.build_holder(wrong_expect=WRONG)


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("APX_CC", "/nonexistent/gcc")
    with pytest.raises(GuestBuildError) as err:
        linux_programs.build_init()
    assert str(err.value) == ("APX_CC=/nonexistent/gcc not found (install gcc and libc6-dev); "
                              "needed to build the Linux guest programs")


def test_missing_assembler_is_one_line(monkeypatch):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    monkeypatch.setenv("APX_LLVM_MC", "/nonexistent/llvm-mc")
    with pytest.raises(GuestBuildError) as err:
        linux_programs.build_holder()
    assert str(err.value) == ("APX_LLVM_MC=/nonexistent/llvm-mc is not a runnable llvm-mc; llvm-mc ≥ 18 needed to "
                              "assemble the Linux register holder (guests/linux/hold.S)")


@needs_toolchain
def test_compile_error_is_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "guests"
    shutil.copytree(REPO / "guests", fake)
    (fake / "linux" / "init.c").write_text("int main(void) { return nope; }\n")
    monkeypatch.setenv("APX_GUESTS_DIR", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(GuestBuildError) as err:
        linux_programs.build_init()
    message = str(err.value)
    assert "\n" not in message and "init.c:1:" in message and "error:" in message and "nope" in message
    hold = fake / "linux" / "hold.S"
    hold.write_text(hold.read_text().replace("    pause\n", "    paws\n"))
    with pytest.raises(GuestBuildError) as err:
        linux_programs.build_holder(["ymm"])
    assert re.fullmatch(r"guests/payload/ymm\.S:\d+: error: invalid instruction mnemonic 'paws' "
                        r"\(in macro expansion: paws\)", str(err.value))


# --- the kernel: lookup, fetch, errors ----------------------------------------------------


def _fake_bzimage(path: Path) -> Path:
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def test_explicit_kernel_wins_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    k = _fake_bzimage(tmp_path / "bz")
    monkeypatch.setenv("APX_KERNEL", str(k))
    assert linux_kernel.find_kernel() == k
    assert linux_kernel.find_kernel(tmp_path / "bz") == k
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.find_kernel(tmp_path / "nope")
    assert str(err.value) == f"kernel {tmp_path / 'nope'} (from --apx-kernel) is not a file"
    (tmp_path / "junk").write_bytes(b"not a kernel")
    monkeypatch.setenv("APX_KERNEL", str(tmp_path / "junk"))
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.find_kernel()
    assert str(err.value) == f"kernel {tmp_path / 'junk'} is neither a bzImage nor an ELF vmlinux"


def test_cache_picks_the_newest_and_empty_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("APX_KERNEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.find_kernel(fetch=False)
    assert str(err.value) == (f"no Linux guest kernel: none cached in {tmp_path}/apx_tests/kernel "
                              "(run ci/bootstrap, or set APX_KERNEL / --apx-kernel)")
    d = linux_kernel.kernel_cache_dir()
    d.mkdir(parents=True)
    for v in ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-10-cloud-amd64"):
        _fake_bzimage(d / f"vmlinuz-{v}")
    (d / "config-6.1.0-99-cloud-amd64").write_text("")
    (d / "vmlinuz-6.1.0-99-cloud-amd64x7q3.tmp").write_text("")  # an interrupted write
    assert linux_kernel.find_kernel(fetch=False).name == "vmlinuz-6.1.0-56-cloud-amd64"


FAKE_APT_CACHE = """#!/bin/sh
[ -n "$FAKE_APT_FAIL" ] && { echo "E: No packages found" >&2; exit 100; }
echo "linux-image-cloud-amd64"
echo "  Depends: linux-image-9.9.9-1-cloud-amd64"
"""
FAKE_APT_GET = """#!/bin/sh
echo "$*" > "$FAKE_LOG"
for last; do :; done
[ -n "$FAKE_APT_FAIL" ] && { echo "E: Unable to locate package $last" >&2; exit 100; }
cp "$FAKE_DEB" "./${last}_9.9.9-1_amd64.deb"
"""


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    if not shutil.which("dpkg-deb"):
        pytest.skip("needs dpkg-deb")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: linux-image-9.9.9-1-cloud-amd64\nVersion: 9.9.9-1\n"
                                             "Architecture: amd64\nMaintainer: t <t@t>\nDescription: test\n")
    (root / "boot").mkdir()
    _fake_bzimage(root / "boot" / "vmlinuz-9.9.9-1-cloud-amd64")
    (root / "boot" / "config-9.9.9-1-cloud-amd64").write_text("CONFIG_PVH=y\n")
    (root / "lib" / "modules" / "9.9.9").mkdir(parents=True)
    (root / "lib" / "modules" / "9.9.9" / "big.ko").write_bytes(os.urandom(1 << 20))
    deb = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-cache", FAKE_APT_CACHE), ("apt-get", FAKE_APT_GET)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEB", str(deb))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "apt.log"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("APX_KERNEL", raising=False)
    return tmp_path


def test_fetch_downloads_the_package_the_meta_package_names(fake_apt):
    assert linux_kernel.kernel_package() == "linux-image-9.9.9-1-cloud-amd64"
    kernel = linux_kernel.find_kernel()
    assert kernel == fake_apt / "cache/apx_tests/kernel/vmlinuz-9.9.9-1-cloud-amd64"
    assert kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert (kernel.parent / "config-9.9.9-1-cloud-amd64").read_text() == "CONFIG_PVH=y\n"
    assert sorted(p.name for p in kernel.parent.iterdir()) == ["config-9.9.9-1-cloud-amd64",
                                                               "vmlinuz-9.9.9-1-cloud-amd64"]
    assert (fake_apt / "apt.log").read_text().split()[-1] == "linux-image-9.9.9-1-cloud-amd64"
    os.unlink(fake_apt / "apt.log")
    assert linux_kernel.find_kernel() == kernel and not (fake_apt / "apt.log").exists()  # cached: no apt


def test_fetch_failures_are_one_line(fake_apt, monkeypatch):
    monkeypatch.setenv("FAKE_APT_FAIL", "1")
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.find_kernel()
    assert str(err.value) == "cannot resolve linux-image-cloud-amd64 with apt-cache: E: No packages found"
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.fetch_kernel("linux-image-9.9.9-1-cloud-amd64")
    assert str(err.value) == ("cannot download linux-image-9.9.9-1-cloud-amd64 with apt-get: "
                              "E: Unable to locate package linux-image-9.9.9-1-cloud-amd64")
    monkeypatch.setenv("PATH", str(fake_apt / "nothing"))
    with pytest.raises(KernelUnavailable) as err:
        linux_kernel.find_kernel()
    assert str(err.value) == ("cannot resolve linux-image-cloud-amd64: apt-cache not found (not a Debian system? "
                              "set APX_KERNEL or --apx-kernel to a bzImage)")


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("APX_KERNEL", None)
    proc = subprocess.run([sys.executable, "-m", "apx_tests.guests.linux", "kernel", "--no-fetch"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"apx_tests: error: no Linux guest kernel: none cached in {tmp_path}/apx_tests/kernel "
                           "(run ci/bootstrap, or set APX_KERNEL / --apx-kernel)\n")


def test_pvh_kernel_of_a_non_kernel_is_none(tmp_path):
    assert linux_kernel.pvh_kernel(_fake_bzimage(tmp_path / "bz")) is None  # no payload to unpack
    assert linux_kernel.pvh_kernel(tmp_path / "missing") is None


# --- command line and console parsing --------------------------------------------------------


def test_kernel_cmdline():
    line = linux.kernel_cmdline(["xmm", "ctx-ymm", "ymm@apx-holder-wrong"], spin_ms=500, release="console",
                                exit_port=0xF4, tsc_khz=2000000)
    assert line == ("console=ttyS0 quiet panic=-1 cryptomgr.notests tsc_early_khz=2000000 apx.run=xmm,ctx-ymm,ymm@apx-holder-wrong "
                    "apx.load=1 apx.spin_ms=500 apx.release=console apx.exit=0xf4")
    assert "tsc_early_khz" not in linux.kernel_cmdline(accel="kvm")
    assert "apx.expect=2" in linux.kernel_cmdline(load=1, expect=2)
    for bad in (dict(run=["ymm;reboot"]), dict(load=5), dict(expect=-1), dict(release="never")):
        with pytest.raises(ValueError):
            linux.kernel_cmdline(**bad)


def test_parse_console_tolerates_kernel_noise():
    text = ("[    0.4] PCI: Fatal: No config space access function found\r\n"
            "# apx-init: started uptime=1.71 run=xmm,apx spin_ms=300 release=deadline\r\n"
            "KTAP version 1\r\n1..2\r\n"
            "apx-holder: ready bank=xmm pid=80 load=1 expect=1 yield=0 spin_ms=300 spin=0x401a2c-0x401a53\r\n"
            "[    2.1] random kernel line\r\n"
            "ok 1 holder-xmm\r\n"
            "ok 2 holder-apx # SKIP CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)\r\n"
            "# apx-init: done pass=1 fail=0 skip=1\r\n")
    r = linux.parse_console(text.encode())
    assert r.ktap_version == 1 and r.plan == 2 and r.complete and r.started_uptime == 1.71
    assert r.ready == [linux.Ready("xmm", 80, {"load": "1", "expect": "1", "yield": "0", "spin_ms": "300",
                                               "spin": "0x401a2c-0x401a53"}, 4)]
    assert r.ready[0].spin_range == (0x401A2C, 0x401A53)
    assert r.result("holder-xmm").ok and not r.result("holder-xmm").skipped
    apx = r.result("holder-apx")
    assert apx.skipped and apx.reason == "CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)"
    assert r.failures == []
    assert not linux.parse_console("KTAP version 1\n1..2\nok 1 a\n").complete
    # Half a line (the guest is still writing it) is not a line yet.
    partial = "apx-holder: ready bank=xmm pid=80 load=1 expect=1 yield=0 spin_ms=300 spi"
    assert linux.parse_console(partial).ready == []
    assert len(linux.parse_console(partial + "n=0x1-0x2\r\n").ready) == 1


# --- real boots ---------------------------------------------------------------------------------


class Vm:
    """The least QEMU that runs a LinuxGuest: console to a log file (and stdin when asked),
    a QMP socket, killed in close()."""

    def __init__(self, guest: linux.LinuxGuest, workdir: Path, *, console_input: bool = False):
        self.log = workdir / "console.log"
        self.qmp_path = workdir / "qmp.sock"
        args = [QEMU, *guest.qemu_args("tcg"), "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        if console_input:
            args += ["-chardev", f"stdio,id=con,logfile={self.log},signal=off", "-serial", "chardev:con"]
        else:
            args += ["-serial", f"file:{self.log}"]
        self.args = args
        self._qmp = None
        self.start = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if console_input else subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, predicate, what: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds since start when predicate(report) first held."""
        deadline = time.monotonic() + timeout
        while True:
            report = linux.parse_console(self.text())
            if predicate(report):
                return time.monotonic() - self.start
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.tail()}")
            time.sleep(0.01)

    def tail(self) -> str:
        return "\n".join(self.text().splitlines()[-25:])

    def connect(self, timeout: float = 30) -> None:
        """Open the QMP connection now, so a later command costs one round trip."""
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no QMP socket (QEMU: {self.proc.poll()})")
            time.sleep(0.01)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(self.qmp_path))
        self._qmp = sock.makefile("rwb")
        json.loads(self._qmp.readline())  # greeting
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments) -> dict:
        if self._qmp is None:
            self.connect()
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._qmp.write(json.dumps(message).encode() + b"\n")
        self._qmp.flush()
        while True:
            reply = json.loads(self._qmp.readline())
            if "return" in reply or "error" in reply:
                assert "error" not in reply, reply
                return reply

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU did not power off within {timeout} s:\n{self.tail()}") from None

    def close(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture(scope="module")
def kernel():
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not found (ci/bootstrap installs it)")
    if not (build.have_llvm_mc() and shutil.which("gcc")):
        pytest.skip("needs llvm-mc >= 18 and gcc (ci/bootstrap installs them)")
    try:
        return linux_kernel.find_kernel(fetch=False)
    except KernelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def private_dir():
    """A fresh 0700 directory, removed at the end, for one module's boots."""
    path = Path(tempfile.mkdtemp(prefix="apx-linux-guest-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _boot_dir(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(scope="module")
def boot1(kernel, private_dir):
    """xmm, ymm, x87, ctx-ymm, apx (skips), ymm with a wrong table; QMP stop during xmm."""
    workdir = _boot_dir(private_dir, "boot1")
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    wrong = linux_programs.build_holder(wrong_expect=WRONG)
    guest = linux.linux_guest(workdir, ["xmm", "ymm", "x87", "ctx-ymm", "apx", "ymm@apx-holder-wrong"],
                              kernel=kernel, extra_holders={"apx-holder-wrong": wrong}, spin_ms=SPIN_MS,
                              exit_port=0xF4)
    vm = Vm(guest, workdir)
    try:
        vm.connect()
        ready = vm.wait_for(lambda r: r.ready, "a ready line")
        spin = linux.parse_console(vm.text()).ready[0].spin_range
        stopped = time.monotonic()
        for tries in range(1, 21):  # stop where the holder itself runs (not in an interrupt)
            vm.qmp("stop")
            registers = vm.qmp("human-monitor-command", **{"command-line": "info registers"})["return"]
            rip = int(re.search(r"RIP=([0-9a-f]+)", registers).group(1), 16)
            if "CPL=3" in registers and spin[0] <= rip < spin[1]:
                break
            vm.qmp("cont")
        time.sleep(max(0.0, STOP_SECONDS - (time.monotonic() - stopped)))
        vm.qmp("cont")
        status = vm.wait_exit()
        total = time.monotonic() - vm.start
        report = linux.parse_console(vm.text())
        yield dict(guest=guest, status=status, report=report, ready=ready, total=total, text=vm.text(),
                   registers=registers, rip=rip, spin=spin, tries=tries)
    finally:
        vm.close()


def _spins(report: linux.ConsoleReport, name: str) -> list[int]:
    return [int(m.group(1)) for line in report.lines if line.startswith(f"# {name}: ")
            for m in [re.search(r"spins=(\d+)", line)] if m]


def test_boot_runs_the_holders(boot1):
    report = boot1["report"]
    assert report.complete, boot1["text"]
    assert report.ktap_version == 1 and report.plan == 6
    for number, name in enumerate(["holder-xmm", "holder-ymm", "holder-x87", "ctxswitch-ymm"], start=1):
        result = report.result(name)
        assert result is not None and result.number == number, boot1["text"]
        assert result.ok and not result.skipped, f"{name}: {result.directive}\n{boot1['text']}"
    ready = [(r.bank, r.fields["load"], r.fields["yield"]) for r in report.ready]
    assert ready[:3] == [("xmm", "1", "0"), ("ymm", "1", "0"), ("x87", "1", "0")]
    assert sorted(ready[3:5]) == [("ymm", "1", "1"), ("ymm", "2", "1")]  # the pair: stages 1 and 2
    assert len(_spins(report, "ctxswitch-ymm")) == 2, "each of the pair reports its spins"  # how many: ci/bench
    for r in report.ready:
        start, end = r.spin_range
        assert 0 < end - start < 0x100, r


def test_boot_skips_a_bank_the_guest_cpu_lacks(boot1):
    result = boot1["report"].result("holder-apx")
    assert result.skipped and result.reason.startswith("CPU lacks APX_F"), result


def test_boot_reports_a_wrong_register(boot1):
    """The harness must see failures: KTAP `not ok` naming register and byte, exit status 2."""
    result = boot1["report"].result("holder-ymm@apx-holder-wrong")
    value = BANKS["ymm"].pattern(1)[WRONG[0]][WRONG[1]]
    assert not result.ok
    assert result.directive.startswith(f"ymm ymm13 byte 21: want 0x{value ^ 0xFF:02x} got 0x{value:02x} "
                                       "(1 differing byte"), result
    assert boot1["report"].failures == [result]
    assert boot1["status"] == (linux.EXIT_STATUS_FAIL << 1) | 1  # isa-debug-exit: 5


def _hmp_vector(registers: str, index: int) -> bytes:
    """Register `index` of HMP `info registers` (XMMnn or YMMnn lines, most significant
    64-bit word first) in memory order."""
    m = re.search(rf"(?:XMM|YMM){index:02d}=((?:[0-9a-f]{{16}} ?)+)", registers)
    words = m.group(1).split()
    return b"".join(int(w, 16).to_bytes(8, "little") for w in reversed(words))


def test_boot_stopped_vcpu_holds_the_holders_registers(boot1):
    """What the QEMU backend relies on: stopped at CPL3 inside the spin loop named by the
    ready line, the vCPU's xmm0..15 are the pattern the holder loaded."""
    registers = boot1["registers"]
    assert "CPL=3" in registers and boot1["spin"][0] <= boot1["rip"] < boot1["spin"][1], registers
    pattern = BANKS["xmm"].pattern(1)
    for i in range(16):
        assert _hmp_vector(registers, i)[:16] == pattern[f"xmm{i}"], (i, registers)


def test_boot_stop_does_not_use_up_the_spin(boot1):
    """A holder paused for longer than its whole spin still ends ok and reports its spins
    after `cont`.  Whether it spun its full time (the guest TSC stands still while TCG is
    stopped) is a count of spins, so ci/bench judges it ("linux-tcg stop during spin")."""
    xmm, ymm = _spins(boot1["report"], "holder-xmm"), _spins(boot1["report"], "holder-ymm")
    assert xmm and ymm, (xmm, ymm)


def test_boot_console_release_across_stop(kernel, private_dir):
    workdir = _boot_dir(private_dir, "boot2")
    guest = linux.linux_guest(workdir, ["ymm", "ctx-xmm"], kernel=kernel, release="console", exit_port=0xF4)
    vm = Vm(guest, workdir, console_input=True)
    try:
        vm.connect()
        vm.wait_for(lambda r: r.ready, "the ymm holder's ready line")
        vm.qmp("stop")
        time.sleep(0.3)
        vm.qmp("cont")
        time.sleep(0.5)
        assert linux.parse_console(vm.text()).results == [], "the holder must wait for the release"
        vm.send(linux.RELEASE_LINE)
        vm.wait_for(lambda r: r.result("holder-ymm") is not None, "the ymm result", timeout=30)
        vm.wait_for(lambda r: len(r.ready) == 3, "both ctx-xmm ready lines")
        vm.send(linux.RELEASE_LINE)
        status = vm.wait_exit()
        report = linux.parse_console(vm.text())
        assert report.complete and [r.ok and not r.skipped for r in report.results] == [True, True], vm.tail()
        assert report.lines.count("# apx-init: released") == 2
        assert status == (linux.EXIT_STATUS_PASS << 1) | 1  # isa-debug-exit: 3
        assert not any(linux.RELEASE_LINE == line.strip() for line in report.lines), "console echo is off"
    finally:
        vm.close()
