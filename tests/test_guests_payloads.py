"""What the payloads do, read back from their disassembly.

Most banks cannot run on every build machine (APX nowhere yet, AVX-512 not
here), so these tests check the instruction stream itself: the three syncs in
order, the exact load sequence before sync 1 and store sequence right after
it, REX2/EVEX/legacy encodings, %rdi-relative memory only, and no bank
register touched anywhere else.
"""

from __future__ import annotations

import re

import pytest

from apx_tests.guests import build
from apx_tests.guests.protocol import (
    BANK_LAYOUT,
    EXIT_PORT,
    LOAD_AREA,
    OFF_GO,
    OFF_STAGE,
    OFF_STATUS,
    STORE_AREA,
    SYNC_PORT,
)

pytestmark = pytest.mark.skipif(not build.have_llvm_mc(), reason="llvm-mc ≥ 18 not installed (Debian: llvm-19)")

L, S = LOAD_AREA, STORE_AREA


def _vector(mnemonic: str, reg: str, first: int, width: int):
    return (
        [f"{mnemonic} {L + width * i}(%rdi), %{reg}{first + i}" for i in range(16)],
        [f"{mnemonic} %{reg}{first + i}, {S + width * i}(%rdi)" for i in range(16)],
    )


# bank -> (exact load instructions, exact store instructions)
EXPECTED = {
    "apx": (
        [f"movq {L + 8 * i}(%rdi), %r{16 + i}" for i in range(16)],
        [f"movq %r{16 + i}, {S + 8 * i}(%rdi)" for i in range(16)],
    ),
    "hi16_zmm": _vector("vmovdqu64", "zmm", 16, 64),
    "zmm_hi256": _vector("vmovdqu64", "zmm", 0, 64),
    "opmask": (
        [f"kmovq {L + 8 * i}(%rdi), %k{i}" for i in range(8)],
        [f"kmovq %k{i}, {S + 8 * i}(%rdi)" for i in range(8)],
    ),
    "ymm": _vector("vmovdqu", "ymm", 0, 32),
    "xmm": _vector("movdqu", "xmm", 0, 16),
    # st7's value is pushed first so that afterwards ST(i) = LOAD[10i, 10i+10);
    # each fstpt pops ST(0), so the i-th store writes ST(i).
    "x87": (
        ["fninit"] + [f"fldt {L + 10 * i}(%rdi)" for i in reversed(range(8))],
        [f"fstpt {S + 10 * i}(%rdi)" for i in range(8)],
    ),
}

# Any mention of a bank's registers (or, for x87, any x87 instruction).
BANK_TOUCH = {
    "apx": re.compile(r"%r(1[6-9]|2\d|3[01])\b"),
    "hi16_zmm": re.compile(r"%zmm(1[6-9]|2\d|3[01])\b"),
    "zmm_hi256": re.compile(r"%[xyz]mm([0-9]|1[0-5])\b"),
    "opmask": re.compile(r"%k[0-7]\b"),
    "ymm": re.compile(r"%[xy]mm([0-9]|1[0-5])\b"),
    "xmm": re.compile(r"%xmm([0-9]|1[0-5])\b"),
    "x87": re.compile(r"^f|%st"),
}

# The shared code (sync, compare, finish) may use only these - all legacy GPRs
# outside every bank, and no instruction that needs CPL0.  A new instruction
# in common.S has to be added here on purpose.
COMMON_MNEMONICS = {"movl", "movb", "outb", "cmpl", "cmpb", "movzbl", "xorl", "incl", "pause",
                    "je", "jne", "jae", "jbe", "jmp"}  # fmt: skip
COMMON_REGISTERS = {"rdi", "al", "eax", "ecx", "edx", "rdx"}


def sync_sequence(stage: int) -> list[str]:
    """The instructions of SYNC `stage` (publish, out, spin until released)."""
    return [
        f"movl ${stage}, {OFF_STAGE}(%rdi)",
        f"movb ${ord('0') + stage}, %al",
        f"outb %al, ${SYNC_PORT}",
        f"cmpl ${stage}, {OFF_GO}(%rdi)",
        "je 4",  # over pause; jmp
        "pause",
        "jmp -10",  # back to the cmpl
    ]


def find_sequence(texts: list[str], sequence: list[str]) -> list[int]:
    return [i for i in range(len(texts)) if texts[i : i + len(sequence)] == sequence]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """bank -> decoded instructions, built once into a private cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return {bank: build.decode(build.build_payload(bank).code) for bank in EXPECTED}


class Layout:
    """Where the sync points and the bank's load/store runs sit in a payload.

    The load run is everything between sync 0 and sync 1; the store run is
    as many instructions as the bank has stores, right after sync 1.
    """

    def __init__(self, instructions, bank: str):
        self.instructions = instructions
        self.texts = [i.text for i in instructions]
        self.sync = {}
        for stage in (0, 1, 2):
            found = find_sequence(self.texts, sync_sequence(stage))
            assert len(found) == 1, f"sync {stage} appears {len(found)} times"
            self.sync[stage] = found[0]
        self.after = {stage: index + len(sync_sequence(stage)) for stage, index in self.sync.items()}
        self.load_run = range(self.after[0], self.sync[1])
        self.store_run = range(self.after[1], self.after[1] + len(EXPECTED[bank][1]))

    def texts_in(self, run: range) -> list[str]:
        return [self.texts[i] for i in run]

    def instructions_in(self, run: range):
        return [self.instructions[i] for i in run]

    def texts_outside_bank_code(self) -> list[str]:
        bank_code = set(self.load_run) | set(self.store_run)
        return [text for index, text in enumerate(self.texts) if index not in bank_code]


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_stages_load_and_store_in_order(decoded, bank):
    loads, stores = EXPECTED[bank]
    layout = Layout(decoded[bank], bank)
    assert layout.sync[0] == 0, "the entry point is sync 0: nothing runs before the baseline"
    # Loads fill exactly the gap between sync 0 and sync 1 ...
    assert layout.texts_in(layout.load_run) == loads
    # ... and the stores follow sync 1 directly, so the host's edits are what is stored.
    assert layout.texts_in(layout.store_run) == stores
    assert layout.store_run.stop < layout.sync[2]


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_store_sequence_covers_the_bank_layout(bank):
    count, width = BANK_LAYOUT[bank]
    _, stores = EXPECTED[bank]
    offsets = [int(re.search(r"(\d+)\(%rdi\)", s).group(1)) - S for s in stores]
    assert offsets == [width * i for i in range(count)]


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_bank_registers_are_touched_only_by_load_and_store(decoded, bank):
    others = Layout(decoded[bank], bank).texts_outside_bank_code()
    assert [text for text in others if BANK_TOUCH[bank].search(text)] == []


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_shared_code_uses_only_legacy_gprs_and_cpl3_instructions(decoded, bank):
    shared = Layout(decoded[bank], bank).texts_outside_bank_code()
    assert {text.split()[0] for text in shared} <= COMMON_MNEMONICS
    assert set(re.findall(r"%(\w+)", " ".join(shared))) <= COMMON_REGISTERS


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_memory_is_addressed_only_through_rdi(decoded, bank):
    for insn in decoded[bank]:
        mnemonic, _, operands = insn.text.partition(" ")
        if mnemonic.startswith("j"):
            continue  # branch targets are pc-relative, checked by the no-relocation test
        for operand in re.split(r",\s*(?![^()]*\))", operands) if operands else []:
            if operand.startswith(("$", "%")):
                continue
            assert "(%rdi" in operand, f"{insn}: memory operand {operand!r} is not %rdi-relative"


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_payload_ends_in_the_exit_loop(decoded, bank):
    tail = [i.text for i in decoded[bank][-3:]]
    assert tail == [f"movb {OFF_STATUS}(%rdi), %al", f"outb %al, ${EXIT_PORT}", "jmp -7"]  # -7: back to the movb


@pytest.mark.parametrize("bank", sorted(EXPECTED))
def test_compare_runs_between_store_and_sync_2(decoded, bank):
    layout = Layout(decoded[bank], bank)
    verify = layout.texts[layout.store_run.stop : layout.sync[2]]
    assert verify[0] == "movl 20(%rdi), %ecx"  # bank_bytes
    assert "movzbl 8192(%rdi,%rdx), %eax" in verify  # EXPECT byte
    assert "cmpb %al, 12288(%rdi,%rdx)" in verify  # against the STORE byte
    # status is written last in both outcomes, after mismatch_offset
    assert verify[-1] == f"movl $1, {OFF_STATUS}(%rdi)"
    assert f"movl $2, {OFF_STATUS}(%rdi)" in verify


# --- encodings -----------------------------------------------------------------


def test_apx_uses_rex2_for_exactly_its_loads_and_stores(decoded):
    layout = Layout(decoded["apx"], "apx")
    loads = layout.instructions_in(layout.load_run)
    stores = layout.instructions_in(layout.store_run)
    for kind, run, opcode in (("load", loads, 0x8B), ("store", stores, 0x89)):
        for n, insn in enumerate(run, start=16):
            prefix, payload, op, modrm = insn.encoding[:4]
            assert prefix == 0xD5, f"{kind} of r{n} lacks the REX2 prefix: {insn}"
            # REX2 payload M0 R4 X4 B4 W R3 X3 B3: R4:R3:ModRM.reg names r16-r31.
            assert payload & 0x40 and payload & 0x08, f"{insn}: want REX2.R4 and REX2.W"
            register = ((payload >> 6) & 1) << 4 | ((payload >> 2) & 1) << 3 | (modrm >> 3) & 7
            assert (op, register, modrm & 0xC7) == (opcode, n, 0x87), insn  # mod=10 (disp32), rm=rdi
    rex2 = [i for i in decoded["apx"] if i.encoding[0] == 0xD5]
    assert rex2 == loads + stores


@pytest.mark.parametrize("bank", ["hi16_zmm", "zmm_hi256"])
def test_zmm_banks_use_evex(decoded, bank):
    layout = Layout(decoded[bank], bank)
    for insn in layout.instructions_in(layout.load_run) + layout.instructions_in(layout.store_run):
        assert insn.encoding[0] == 0x62, insn


def test_hi16_zmm_reaches_the_upper_registers(decoded):
    """EVEX.R' (P0 bit 4, stored inverted) must be 0 to address zmm16-zmm31."""
    layout = Layout(decoded["hi16_zmm"], "hi16_zmm")
    for insn in layout.instructions_in(layout.load_run) + layout.instructions_in(layout.store_run):
        assert insn.encoding[1] & 0x10 == 0, insn


def test_xmm_payload_uses_legacy_sse_not_vex(decoded):
    """So the xmm payload runs with XCR0 = 0x3 (no AVX)."""
    for insn in decoded["xmm"]:
        assert insn.encoding[0] not in (0xC4, 0xC5, 0x62), insn


def test_x87_loads_in_reverse_after_fninit(decoded):
    layout = Layout(decoded["x87"], "x87")
    loads = layout.texts_in(layout.load_run)
    assert loads[0] == "fninit"
    offsets = [int(re.search(r"(\d+)\(", t).group(1)) - L for t in loads[1:]]
    assert offsets == [70, 60, 50, 40, 30, 20, 10, 0]
