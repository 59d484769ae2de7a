"""The payload builder: assembling, flat extraction, caching, and its errors."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from apx_tests.guests import build, elf
from apx_tests.guests.build import GuestBuildError, available_banks, build_payload, find_llvm_mc, have_llvm_mc

needs_llvm = pytest.mark.skipif(not have_llvm_mc(), reason="llvm-mc ≥ 18 not installed (Debian: llvm-19)")
ALL_BANKS = ("apx", "hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87", "pkru")
MISSING = "llvm-mc ≥ 18 not found (install llvm-19); needed to assemble guests/payload/apx.S"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own build cache, so none sees another's results."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "apx_tests" / "guests"


@pytest.fixture
def guests_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of guests/ that a test may edit, selected via $APX_GUESTS_DIR."""
    copy = tmp_path / "guests"
    shutil.copytree(build.guests_dir(), copy)
    monkeypatch.setenv("APX_GUESTS_DIR", str(copy))
    return copy


def make_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write_bank(guests: Path, name: str, body: str) -> Path:
    source = guests / "payload" / f"{name}.S"
    source.write_text('    .include "common.S"\n' + body)
    return source


# --- every bank builds, and the result stands alone --------------------------


def test_every_bank_has_a_source():
    assert set(available_banks()) == set(ALL_BANKS)


@needs_llvm
@pytest.mark.parametrize("bank", ALL_BANKS)
def test_bank_builds_to_flat_code(bank):
    payload = build_payload(bank)
    assert payload.bank == bank
    assert payload.source_path == build.payload_dir() / f"{bank}.S"
    assert len(payload.code) > 0
    assert len(payload.digest) == 64


@needs_llvm
@pytest.mark.parametrize("bank", ALL_BANKS)
def test_bank_object_has_no_relocations(bank):
    obj = build.assemble_object(build.payload_source(bank))
    sections = elf.read_sections(obj)
    assert [s.name for s in sections if s.is_relocation] == []
    assert [s.name for s in sections if s.is_allocated and s.size] == [".text"]
    readobj = shutil.which("llvm-readobj-19")
    if readobj:  # a second opinion, from LLVM itself
        obj_path = Path(os.environ["XDG_CACHE_HOME"]) / f"{bank}.o"
        obj_path.parent.mkdir(parents=True, exist_ok=True)
        obj_path.write_bytes(obj)
        out = subprocess.run([readobj, "-r", str(obj_path)], capture_output=True, text=True, check=True).stdout
        assert "R_X86_64" not in out


@needs_llvm
def test_flat_code_is_the_text_section(tmp_path):
    """Our ELF reader extracts the same bytes llvm-objcopy would."""
    objcopy = shutil.which("llvm-objcopy-19")
    if not objcopy:
        pytest.skip("llvm-objcopy-19 not installed")
    source = build.payload_source("apx")
    obj = tmp_path / "apx.o"
    obj.write_bytes(build.assemble_object(source))
    flat = tmp_path / "apx.bin"
    subprocess.run([objcopy, "-O", "binary", "--only-section=.text", str(obj), str(flat)], check=True)
    assert build_payload("apx").code == flat.read_bytes()


# --- the cache ---------------------------------------------------------------


@needs_llvm
def test_second_build_comes_from_the_cache_without_running_llvm_mc(tmp_path, monkeypatch, private_cache):
    log = tmp_path / "llvm-mc.log"
    wrapper = make_script(tmp_path / "llvm-mc-logging", f'echo "$@" >> "{log}"\nexec "{find_llvm_mc()}" "$@"\n')
    monkeypatch.setenv("APX_LLVM_MC", str(wrapper))

    first = build_payload("xmm")
    calls_after_first = log.read_text().splitlines()
    assert any("-filetype=obj" in call for call in calls_after_first)
    assert list(private_cache.glob("xmm-*.bin")) == [private_cache / f"xmm-{first.digest}.bin"]

    second = build_payload("xmm")
    assert log.read_text().splitlines() == calls_after_first  # not invoked at all
    assert second == first

    # A new process only asks the assembler for its version (part of the key).
    build._llvm_version_of.cache_clear()
    third = build_payload("xmm")
    new_calls = log.read_text().splitlines()[len(calls_after_first) :]
    assert new_calls == ["--version"]
    assert third.code == first.code


@needs_llvm
def test_source_edits_change_the_digest(guests_copy):
    before = build_payload("xmm")
    untouched_bank = build_payload("x87")

    # A comment in the shared file: same code, but a new digest (and cache entry).
    common = guests_copy / "payload" / "common.S"
    common.write_text(common.read_text() + "/* edited */\n")
    commented = build_payload("xmm")
    assert commented.digest != before.digest
    assert commented.code == before.code

    # A real change to the bank file shows in the code too.
    source = guests_copy / "payload" / "xmm.S"
    source.write_text(source.read_text().replace("movdqu  LOAD_AREA", "movups  LOAD_AREA"))
    changed = build_payload("xmm")
    assert changed.digest not in (before.digest, commented.digest)
    assert changed.code != before.code

    # Every bank includes common.S, so its edit reached x87 as well; an edit
    # to xmm.S does not.
    x87_now = build_payload("x87").digest
    assert x87_now != untouched_bank.digest
    source.write_text(source.read_text() + "\n")
    assert build_payload("x87").digest == x87_now


@needs_llvm
def test_corrupt_or_empty_cache_entry_is_rebuilt(private_cache):
    payload = build_payload("x87")
    entry = private_cache / f"x87-{payload.digest}.bin"
    entry.write_bytes(b"")
    assert build_payload("x87").code == payload.code
    assert entry.read_bytes() == payload.code


@needs_llvm
def test_unwritable_cache_does_not_fail_the_build(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert build_payload("xmm").code


# --- finding the assembler ---------------------------------------------------


def test_missing_assembler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("APX_LLVM_MC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestBuildError) as error:
        find_llvm_mc()
    assert str(error.value) == MISSING
    with pytest.raises(GuestBuildError) as error:
        build_payload("apx")
    assert str(error.value) == MISSING
    assert "\n" not in str(error.value)
    assert not build.have_llvm_mc()


def test_too_old_llvm_mc_is_not_used(tmp_path, monkeypatch):
    """Bookworm's plain llvm-mc is LLVM 14, which cannot encode REX2."""
    monkeypatch.delenv("APX_LLVM_MC", raising=False)
    make_script(tmp_path / "llvm-mc", 'echo "Debian LLVM version 14.0.6"\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestBuildError, match="^llvm-mc ≥ 18 not found"):
        find_llvm_mc()


def test_explicit_assembler_must_be_good(tmp_path, monkeypatch):
    old = make_script(tmp_path / "old-llvm-mc", 'echo "LLVM version 17.0.1"\n')
    monkeypatch.setenv("APX_LLVM_MC", str(old))
    with pytest.raises(GuestBuildError, match=r"^APX_LLVM_MC=.*old-llvm-mc is LLVM 17; llvm-mc ≥ 18 needed"):
        find_llvm_mc()
    monkeypatch.setenv("APX_LLVM_MC", str(tmp_path / "nowhere"))
    with pytest.raises(GuestBuildError, match="is not a runnable llvm-mc"):
        find_llvm_mc()


def test_explicit_assembler_is_preferred(tmp_path, monkeypatch):
    newer = make_script(tmp_path / "my-llvm-mc", 'echo "LLVM version 21.1.0"\n')
    monkeypatch.setenv("APX_LLVM_MC", str(newer))
    assert find_llvm_mc() == str(newer)


# --- errors in the sources ---------------------------------------------------


@needs_llvm
def test_assembler_error_names_file_and_line(guests_copy):
    write_bank(guests_copy, "broken", "    nop\n    frobnicate %rax\n")
    with pytest.raises(GuestBuildError) as error:
        build_payload("broken")
    assert str(error.value) == "guests/payload/broken.S:3: error: invalid instruction mnemonic 'frobnicate'"


@needs_llvm
def test_error_inside_a_macro_names_the_invoking_line(guests_copy):
    write_bank(
        guests_copy,
        "broken",
        "    .macro bank_load\n    movq LOAD_AREA(%rdi), %r99\n    .endm\n"
        "    .macro bank_store\n    .endm\n"
        "    PAYLOAD\n",
    )
    with pytest.raises(GuestBuildError) as error:
        build_payload("broken")
    message = str(error.value)
    assert message.startswith("guests/payload/broken.S:7: error: invalid register name")
    assert "%r99" in message and "\n" not in message


@needs_llvm
def test_undefined_symbol_is_reported_as_relocation(guests_copy):
    write_bank(guests_copy, "broken", "    movl $STAGE_LOADDED, MB_STAGE(%rdi)\n")
    wanted = r"broken\.S: payload needs relocations \(undefined symbols: STAGE_LOADDED\)"
    with pytest.raises(GuestBuildError, match=wanted):
        build_payload("broken")


@needs_llvm
def test_absolute_address_is_rejected(guests_copy):
    write_bank(guests_copy, "broken", "    movl here, %eax\nhere:\n    nop\n")
    with pytest.raises(GuestBuildError, match="payload needs relocations"):
        build_payload("broken")


@needs_llvm
def test_data_outside_text_is_rejected(guests_copy):
    write_bank(guests_copy, "broken", "    nop\n    .data\n    .byte 1\n")
    with pytest.raises(GuestBuildError, match=r"bytes outside \.text \(\.data\)"):
        build_payload("broken")


@needs_llvm
def test_missing_include_is_reported(guests_copy):
    (guests_copy / "payload" / "broken.S").write_text('    .include "nothere.S"\n')
    with pytest.raises(GuestBuildError, match=r"^guests/payload/broken\.S:1: error: Could not find include file"):
        build_payload("broken")


def test_unknown_bank(monkeypatch):
    with pytest.raises(GuestBuildError, match=r"no guest payload for bank 'amx'.*known: apx, "):
        build_payload("amx")
    with pytest.raises(GuestBuildError, match="no guest payload for bank 'common'"):
        build_payload("common")


def test_guests_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("APX_GUESTS_DIR", str(tmp_path / "absent"))
    with pytest.raises(GuestBuildError, match="guest sources not found"):
        build.guests_dir()
    monkeypatch.delenv("APX_GUESTS_DIR")
    assert (build.guests_dir() / "payload" / "common.S").is_file()


# --- disassembly -------------------------------------------------------------


@needs_llvm
def test_decode_walks_the_real_bytes():
    code = build_payload("apx").code
    instructions = build.decode(code)
    assert b"".join(i.encoding for i in instructions) == code
    assert [i.offset for i in instructions] == sorted({i.offset for i in instructions})
    assert "\tmovq\t4096(%rdi), %r16\n" in build.disassemble(code)
    assert "0x0015: d5 48 8b 87 00 10 00 00" in build.listing(code)


@needs_llvm
def test_elf_reader_sees_relocations_when_there_are_some(guests_copy):
    """Positive control: the no-relocation checks above would notice one."""
    source = write_bank(guests_copy, "broken", "    movq $elsewhere, %rax\n")
    obj = build.assemble_object(source)
    assert [s.name for s in elf.read_sections(obj) if s.is_relocation] == [".rela.text"]
    assert elf.undefined_symbols(obj) == ["elsewhere"]
