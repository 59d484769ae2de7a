"""apx_tests.qemu.migration.cpu_fields (the CPU field mapping): self-tests that ci/mutation showed
missing (docs/mutation.md).

Real streams come from this host's QEMU (tcg and kvm): one boot of a tiny long-mode guest
(tests/test_qemu_migration.py's, with its CPL3 code replaced) saved twice, at the reset
vector and after the guest loaded MXCSR, ymm3/ymm12 and an x87 environment: FCW 0x0B7B
(#Z unmasked), two pushes (TOP = 6, tags of physical registers 6 and 7 valid) and an
`fdivr` by +0 that leaves a pending #Z, so KVM's XSAVE carries FOP/FIP/FDP.  Every
expected value is worked out from that code by hand.  Layouts and subsections no QEMU
here can write (AVX-512, APX, MPX, AMX) come as synthetic streams shaped like QEMU's.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
from hostfacts import read_cpuinfo
from test_qemu_migration import (  # the QEMU driver, the guest image and the stream builder
    ACCELS,
    APX_LAYOUT,
    GUEST_MXCSR,
    GUEST_ST0,
    GUEST_YMM3,
    GUEST_YMM12,
    K_MARKER,
    K_MXCSR,
    K_ST,
    K_YMM3,
    K_YMM12,
    KBASE,
    MARKER,
    ZEN3,
    Qemu,
    _kernel,
    _Stream,
    _u32,
    _u64,
    _u64_array,
    _zmm_array,
)

from apx_tests.qemu.migration.cpu_fields import (
    _int_pieces,
    _lane_hint,
    _Piece,
    _split_name,
    _xstate_mask_of,
    _zmm_q_index,
)
from apx_tests.qemu.migration.records import Leaf, MigrationStreamError
from apx_tests.qemu.migration.stream import MigrationStream
from apx_tests.xsave import Layout

SKX_MPX = Layout.reference("intel-skx-mpx")
ZEN4 = Layout.reference("amd-zen4")

# What QEMU's KVM stream holds in env.xstate_bv for the payloads here (x87, SSE and AVX
# used): those, plus PKRU where the host kernel enabled protection keys (KVM's fpstate then
# carries PKRU and KVM_GET_XSAVE2 marks it).  From /proc/cpuinfo, not from our own probe.
KVM_XSTATE_BV = 0x7 | (0x200 if "ospke" in read_cpuinfo().get("flags", "").split() else 0)


# ---------------------------------------------------------------------------
# The real captures

K_FCW, K_DIVISOR = 0xC0, 0xC8  # data the guest's x87 code reads (after _kernel's st0 at 0xB0)
GUEST_FCW = 0x0B7B  # RC up, PC 64 bits, every exception masked but #Z (bit 2 clear)


def _x87_kernel() -> bytes:
    """_kernel's image with this CPL3 code at +0x300 (addresses are the FIP/FDP below)."""
    def a(off: int) -> bytes:
        return struct.pack("<I", KBASE + off)

    img = bytearray(_kernel(GUEST_YMM3, GUEST_YMM12, GUEST_MXCSR, GUEST_ST0))
    struct.pack_into("<H", img, K_FCW, GUEST_FCW)
    struct.pack_into("<d", img, K_DIVISOR, 3.0)
    user = (b"\x0f\xae\x14\x25" + a(K_MXCSR)           # +0x300 ldmxcsr
            + b"\xc5\xfe\x6f\x1c\x25" + a(K_YMM3)      # +0x308 vmovdqu ymm3
            + b"\xc5\x7e\x6f\x24\x25" + a(K_YMM12)     # +0x311 vmovdqu ymm12
            + b"\xdb\xe3"                              # +0x31a fninit
            + b"\xd9\x2c\x25" + a(K_FCW)               # +0x31c fldcw
            + b"\xdb\x2c\x25" + a(K_ST)                # +0x323 fldt GUEST_ST0   (TOP 7)
            + b"\xd9\xee"                              # +0x32a fldz             (TOP 6)
            + b"\xdc\x3c\x25" + a(K_DIVISOR)           # +0x32c fdivr 3.0 / st(0): #Z, unmasked
            + b"\xc7\x04\x25" + a(K_MARKER) + struct.pack("<I", MARKER)  # +0x333
            + b"\xf3\x90\xeb\xfc")                     # +0x33e pause; jmp
    img[0x300:0x400] = bytes(0x100)
    img[0x300:0x300 + len(user)] = user
    return bytes(img)


FDIVR_FIP = KBASE + 0x32C
FDIVR_FDP = KBASE + K_DIVISOR
FDIVR_FOP = (0xDC & 7) << 8 | 0x3C  # opcode bits 10:8 from the first byte, 7:0 the ModRM byte
# FSW: B (bit 15) | TOP 6 (bits 13:11) | ES (bit 7) | ZE (bit 2)
GUEST_FSW = 0x8000 | 6 << 11 | 0x80 | 0x04
INF = (0x8000000000000000).to_bytes(8, "little") + (0x7FFF).to_bytes(2, "little")


class Captures:
    """Per accelerator, lazily: (stream at the reset vector, stream with the x87 state)."""

    def __init__(self, out: Path):
        self.out = out
        self.made: dict[str, tuple[Path, Path]] = {}

    def get(self, accel: str) -> tuple[Path, Path]:
        if accel not in self.made:
            kernel = self.out / "x87.bin"
            kernel.write_bytes(_x87_kernel())
            with Qemu(accel, "-kernel", str(kernel)) as vm:
                reset = vm.save(self.out / f"reset-{accel}.mig")
                vm.run_until(KBASE + K_MARKER, MARKER)
                loaded = vm.save(self.out / f"x87-{accel}.mig")
            self.made[accel] = (reset, loaded)
        return self.made[accel]


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    return Captures(tmp_path_factory.mktemp("x87"))


def _loaded(captures, accel):
    path = captures.get(accel)[1]
    return path, MigrationStream.open(path).cpu_state(0)


def _st_bytes(mantissa: int, exponent: int) -> bytes:
    return mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little")


def _expected_legacy(accel: str) -> bytes:
    """The FXSAVE region after the guest's code, by hand."""
    legacy = bytearray(512)
    struct.pack_into("<HHB", legacy, 0, GUEST_FCW, GUEST_FSW, 0xC0)  # abridged FTW: physical 6 and 7
    if accel == "kvm":
        # KVM: the XSAVE image's pointers (AMD saves them while an exception is pending).
        struct.pack_into("<HQQ", legacy, 6, FDIVR_FOP, FDIVR_FIP, FDIVR_FDP)
    else:
        # TCG records FIP/FDP; FOP stays 0 (what QEMU 10's TCG migrates, seen here).
        struct.pack_into("<HQQ", legacy, 6, 0, FDIVR_FIP, FDIVR_FDP)
    struct.pack_into("<I", legacy, 24, GUEST_MXCSR)
    # ST(0) is the fldz result on hardware (an unmasked #Z leaves the destination alone);
    # QEMU TCG stores the masked result, +infinity.  ST(1) is GUEST_ST0.
    legacy[32:42] = bytes(10) if accel == "kvm" else INF
    legacy[48:58] = GUEST_ST0
    legacy[160 + 16 * 3:160 + 16 * 4] = GUEST_YMM3[:16]
    legacy[160 + 16 * 12:160 + 16 * 13] = GUEST_YMM12[:16]
    return bytes(legacy)


@pytest.mark.parametrize("accel", ACCELS)
def test_x87_environment_reaches_the_legacy_region(captures, accel):
    path, cpu = _loaded(captures, accel)
    want = _expected_legacy(accel)
    assert cpu.legacy_region() == want
    image = cpu.to_xsave(ZEN3)
    assert image.legacy_bytes() == want
    assert cpu.register("st0") == want[32:42] and cpu.register("st1") == GUEST_ST0
    assert cpu.register("st2") == bytes(10)
    assert [leaf.path for leaf in cpu.register_leaves("st1")] == [f"env.fpregs[{1 if accel == 'kvm' else 7}].tmp"] * 2


@pytest.mark.parametrize("accel", ACCELS)
def test_reset_state_legacy_region(captures, accel):
    """At the reset vector: FCW 0x037F, FSW/FTW 0, no FOP/FIP/FDP subsection, MXCSR 0x1F80."""
    cpu = MigrationStream.open(captures.get(accel)[0]).cpu_state(0)
    assert cpu.legacy_region() == b"\x7f\x03" + bytes(22) + b"\x80\x1f\x00\x00" + bytes(484)
    assert "cpu/fpop_ip_dp" not in cpu.subsections
    # XSTATE_BV from env.xstate_bv (0 at reset) or the non-zero components: x87 and SSE only.
    assert cpu.xstate_bv == 0
    assert cpu.to_xsave(ZEN3, xstate_bv="nonzero").xstate_bv == 0x3
    assert cpu.to_xsave(ZEN3).xstate_bv == 0x3


@pytest.mark.parametrize("accel", ACCELS)
def test_register_names_leaves_and_repr_of_a_real_stream(captures, accel):
    path, cpu = _loaded(captures, accel)
    assert cpu.register_names() == [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "mxcsr",
        *(f"ymm{i}" for i in range(16)), *(f"xmm{i}" for i in range(16)), *(f"st{i}" for i in range(8))]
    assert cpu.register("eflags") == cpu.register("RFLAGS") == cpu.register("rflags")
    assert [leaf.path for leaf in cpu.register_leaves("EFLAGS")] == ["env.eflags"]
    assert [leaf.path for leaf in cpu.register_leaves("ymm12")] == [
        "env.xmm_regs[0][12]._q_ZMMReg[0]", "env.xmm_regs[0][12]._q_ZMMReg[1]",
        "env.xmm_regs[1][12]._q_ZMMReg[2]", "env.xmm_regs[1][12]._q_ZMMReg[3]"]
    assert [leaf.path for leaf in cpu.register_leaves("r9")] == ["env.regs[9]"]
    # XCR0 and XSTATE_BV are registers too (what with_register patches): x87|SSE|AVX; KVM's
    # XSTATE_BV adds PKRU where the host kernel uses protection keys (0x207 on a Zen 3).
    assert cpu.register("xcr0") == b"\x07" + bytes(7)
    assert cpu.register("xstate_bv") == (KVM_XSTATE_BV if accel == "kvm" else 0).to_bytes(8, "little")
    assert cpu.register("ymm12") == GUEST_YMM12 and cpu.register("xmm3") == GUEST_YMM3[:16]
    text = repr(cpu)
    assert text.startswith(f"<CpuState {path} cpu 0: {len(cpu.leaves)} fields, subsections ")
    assert "cpu/fpop_ip_dp" in text and text.endswith(f", accel {accel}>")


@pytest.mark.parametrize("accel", ACCELS)
def test_missing_registers_say_which_subsection_qemu_did_not_send(captures, accel):
    """This host's guests have no AVX-512, PKRU or APX state: QEMU sends no cpu/avx512,
    cpu/pkru or cpu/apx subsection, and the error says so."""
    path, cpu = _loaded(captures, accel)
    avx512 = "live in subsection cpu/avx512, sent only when AVX-512 state is non-zero"
    for name, problem in [
        ("zmm3", f"the stream has no field for zmm3 bytes 32..63 (zmm upper halves {avx512})"),
        ("zmm15", f"the stream has no field for zmm15 bytes 32..63 (zmm upper halves {avx512})"),
        ("zmm16", f"the stream has no field for zmm16 bytes 0..63 (zmm16-31 {avx512})"),
        ("k0", "the stream has no field for k0: subsection cpu/avx512 absent (QEMU sends it only when "
               "opmask/zmm state is non-zero)"),
        ("pkru", "the stream has no field for pkru: subsection cpu/pkru absent (QEMU sends it only when PKRU != 0)"),
        ("r16", "the stream has no field for r16: no cpu/apx subsection and env.regs has 16 entries "
                "(QEMU < 11 or a CPU without APX)"),
        ("xmm16", "no register xmm16: only xmm0-xmm15 exist"),
        ("ymm16", "no register ymm16: only ymm0-ymm15 exist"),
        ("st8", "the stream has no field for st8: unknown register name"),
        ("st", "the stream has no field for st: unknown register name"),
        ("xmm", "the stream has no field for xmm: unknown register name"),
        ("foo1", "the stream has no field for foo1: unknown register name"),
    ]:
        with pytest.raises(MigrationStreamError) as info:
            cpu.register(name)
        assert (info.value.path, info.value.offset, info.value.problem) == (
            str(path), cpu.section.start, f"cpu 0: {problem}"), name
        assert not cpu.has(name)
    assert cpu.has("zmm3") is False and cpu.has("xmm15") is True


# ---------------------------------------------------------------------------
# register_edits: what with_register writes


@pytest.mark.parametrize("accel", ACCELS)
def test_register_edits_on_the_reset_stream(captures, accel):
    """env.xstate_bv is 0 at reset: an XMM edit sets SSE's bit (by default); GPR and MXCSR
    edits touch no XSTATE_BV bit; ints are cut to the register's width."""
    stream = MigrationStream.open(captures.get(accel)[0])
    value = bytes(range(0x50, 0x60))
    edits = stream.register_edits("xmm5", value)
    assert {leaf.path: raw for leaf, raw in edits.items()} == {
        "env.xmm_regs[0][5]._q_ZMMReg[0]": bytes(range(0x57, 0x4F, -1)),
        "env.xmm_regs[0][5]._q_ZMMReg[1]": bytes(range(0x5F, 0x57, -1)),
        "env.xstate_bv": bytes(7) + b"\x02"}
    assert {leaf.path for leaf in stream.register_edits("xmm5", value, mark_xstate=False)} == {
        "env.xmm_regs[0][5]._q_ZMMReg[0]", "env.xmm_regs[0][5]._q_ZMMReg[1]"}
    assert {leaf.path: raw for leaf, raw in stream.register_edits("rax", -1).items()} == {"env.regs[0]": b"\xff" * 8}
    assert {leaf.path: raw for leaf, raw in stream.register_edits("rdx", 1 << 64 | 0x1234).items()} == {
        "env.regs[2]": bytes(6) + b"\x12\x34"}
    assert {leaf.path: raw for leaf, raw in stream.register_edits("mxcsr", 0x1_0000_9FA0).items()} == {
        "env.mxcsr": b"\x00\x00\x9f\xa0"}
    assert {leaf.path: raw for leaf, raw in stream.register_edits("xstate_bv", 0x207).items()} == {
        "env.xstate_bv": bytes(6) + b"\x02\x07"}
    assert {leaf.path: raw for leaf, raw in stream.register_edits("xcr0", 0x7).items()} == {
        "env.xcr0": bytes(7) + b"\x07"}
    # st0: le64 mantissa + le16 sign/exponent -> the field's be64 + be16; x87's bit (0) marked.
    st = stream.register_edits("st0", GUEST_ST0)
    assert {leaf.path: raw for leaf, raw in st.items()} == {
        "env.fpregs[0].tmp": bytes.fromhex("8123456789abcdef3fff"), "env.xstate_bv": bytes(7) + b"\x01"}
    with pytest.raises(ValueError, match=r"^xmm5 is 16 bytes in the stream, the value has 15$"):
        stream.register_edits("xmm5", value[:15])


def test_register_edits_leave_xstate_bv_alone_when_the_bit_is_set(captures):
    """The KVM stream's env.xstate_bv (0x7 or 0x207) already has SSE and AVX: no XSTATE_BV edit."""
    path, cpu = _loaded(captures, "kvm")
    assert cpu.xstate_bv == KVM_XSTATE_BV
    edits = MigrationStream.open(path).register_edits("ymm5", bytes(range(32)))
    assert sorted(leaf.path for leaf in edits) == [
        "env.xmm_regs[0][5]._q_ZMMReg[0]", "env.xmm_regs[0][5]._q_ZMMReg[1]",
        "env.xmm_regs[1][5]._q_ZMMReg[2]", "env.xmm_regs[1][5]._q_ZMMReg[3]"]


# ---------------------------------------------------------------------------
# Helpers, each against values worked out by hand


def test_xstate_mask_of_each_kind_of_register():
    assert [_xstate_mask_of(n) for n in ("rax", "rip", "mxcsr", "nonsense", "st0", "xmm3", "ymm3", "zmm3",
                                        "zmm20", "k1", "pkru", "r16", "R31")] == [
        0, 0, 0, 0, 0x1, 0x2, 0x6, 0x46, 0x80, 0x20, 0x200, 0x80000, 0x80000]


def test_pieces_reverse_big_endian_fields_only():
    be = Leaf("env.mxcsr", "uint32", 100, 4, b"\x00\x00\x1f\x80")
    le = Leaf("le", "int32 le", 104, 4, b"\x80\x1f\x00\x00")
    assert _int_pieces(be) == [_Piece(0, 4, be, 0, True)]
    assert _int_pieces(le) == [_Piece(0, 4, le, 0, False)]
    assert _int_pieces(be, 8) == [_Piece(8, 4, be, 0, True)]
    for piece in (_int_pieces(be)[0], _int_pieces(le)[0]):
        assert piece.extract() == b"\x80\x1f\x00\x00"
    assert _int_pieces(be)[0].encode(b"\x01\x02\x03\x04") == b"\x04\x03\x02\x01"
    assert _int_pieces(le)[0].encode(b"\x01\x02\x03\x04") == b"\x01\x02\x03\x04"
    tmp = Leaf("env.fpregs[0].tmp", "buffer", 0, 10, bytes(range(10)))
    upper = _Piece(8, 2, tmp, 8)
    assert upper.extract() == b"\x09\x08" and upper.encode(bytes(range(20, 30))) == b"\x1d\x1c"


def test_zmm_q_index_and_split_name():
    assert [_zmm_q_index(n) for n in ("_q_ZMMReg[0]", "_q_ZMMReg[3]", "_q_ZMMReg[7]", "_q_ZMMReg[8]",
                                      "_q_ZMMReg[12]", "_q_ZMMReg[-1]", "_q_ZMMReg[x]", "_q_ZMMReg[3",
                                      "_b_ZMMReg[5]", "_q_ZMMReg[]")] == [
        0, 3, 7, None, None, None, None, None, None, None]
    assert [_split_name(n) for n in ("xmm3", "ymm15", "zmm31", "st7", "k0", "r16", "pkru", "rax", "kx", "foo1")] == [
        ("xmm", 3), ("ymm", 15), ("zmm", 31), ("st", 7), ("k", 0), ("r", 16), ("pkru", -1), ("rax", -1),
        ("kx", -1), ("foo1", -1)]


def test_lane_hints():
    assert _lane_hint(16, 0) == _lane_hint(31, 7) == \
        "zmm16-31 live in subsection cpu/avx512, sent only when AVX-512 state is non-zero"
    assert _lane_hint(15, 0) == _lane_hint(0, 1) == "no env.xmm_regs"
    assert _lane_hint(3, 2) == _lane_hint(3, 3) == "no YMM upper halves (env.xmm_regs ymmh_reg, cpu vmstate v12)"
    assert _lane_hint(3, 4) == _lane_hint(15, 7) == \
        "zmm upper halves live in subsection cpu/avx512, sent only when AVX-512 state is non-zero"


# ---------------------------------------------------------------------------
# Synthetic streams shaped like QEMU's (what no QEMU here writes)


def _x(tag: int, n: int) -> bytes:
    """n bytes tag, tag+1, ... (never zero for the tags used)."""
    return bytes((tag + b) & 0xFF or 0x5A for b in range(n))


ZMM = [_x(0x10 + 2 * i, 64) for i in range(32)]  # zmm0..31, little-endian


def _u8_array(name: str, data: bytes):
    return {"name": name, "type": "uint8", "size": 1, "array_len": len(data)}, data


def _u16(name: str, value: int):
    return {"name": name, "type": "uint16", "size": 2}, value.to_bytes(2, "big")


def _fpregs(values):
    desc = {"name": "env.fpregs", "type": "struct", "size": 16, "array_len": len(values),
            "struct": {"vmsd_name": "fpreg", "version": 1,
                       "fields": [{"name": "tmp", "type": "buffer", "size": 10}, {"name": "pad", "type": "buffer",
                                                                                 "size": 6}]}}
    return desc, b"".join(v[:8][::-1] + v[8:10][::-1] + bytes(6) for v in values)


def _cpu(*, regs=16, xstate_bv: int | None = 0x3, ymmh=True, xmm=True, fpregs=True, extra=()):
    """The main cpu section's fields: GPRs 0x1000+i, RIP, RFLAGS, x87 control words, MXCSR,
    fpregs (ST values _x(0x70+i) at physical i), XMM/YMM lanes of ZMM, XCR0, XSTATE_BV."""
    fields = [_u64_array("env.regs", [0x1000 + i for i in range(regs)]), _u64("env.eip", 0x401000),
              _u64("env.eflags", 0x202), _u16("env.fpuc", 0x037F), _u16("env.fpus_vmstate", 0),
              _u16("env.fptag_vmstate", 0)]
    if fpregs:
        fields.append(_fpregs([_x(0x70 + 10 * i, 10) for i in range(8)]))
    fields.append(_u32("env.mxcsr", 0x1F80))
    if xmm:
        fields.append(_zmm_array("env.xmm_regs[0]", "xmm_reg", [0, 1], ZMM[:16]))
    fields.append(_u64("env.xcr0", 0x7))
    if xstate_bv is not None:
        fields.append(_u64("env.xstate_bv", xstate_bv))
    if ymmh:
        fields.append(_zmm_array("env.xmm_regs[1]", "ymmh_reg", [2, 3], ZMM[:16]))
    return fields + list(extra)


def _avx512(opmask=8):
    return ("cpu/avx512", [
        _u64_array("env.opmask_regs", [0x0101010101010101 * (i + 1) for i in range(opmask)]),
        _zmm_array("env.xmm_regs[0]", "zmmh_reg", [4, 5, 6, 7], ZMM[:16]),
        _zmm_array("env.xmm_regs[1]", "hi16_zmm_reg", list(range(8)), ZMM[16:])])


def _pkru(value=0x55555550, size=4):
    return ("cpu/pkru", [({"name": "env.pkru", "type": "uint32" if size == 4 else "uint64", "size": size},
                          value.to_bytes(size, "big"))])


APX_VALUES = [0xA0A0_0000_0000_0000 + i for i in range(16)]


def _apx(values=APX_VALUES):
    return ("cpu/apx", [_u64_array("env.regs", values)])


def _open(tmp_path, fields, subsections=(), name="s.mig"):
    path = tmp_path / name
    path.write_bytes(_Stream().device("cpu", 0, 12, fields, list(subsections)).build())
    return MigrationStream.open(path)


def test_synthetic_repr_and_register_names_of_every_kind(tmp_path):
    stream = _open(tmp_path, _cpu(), [_avx512(), _pkru(), _apx()])
    cpu = stream.cpu_state(0)
    assert cpu.register_names() == [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", *(f"r{i}" for i in range(16, 32)),
        "rip", "rflags", "mxcsr", *(f"zmm{i}" for i in range(32)), *(f"ymm{i}" for i in range(16)),
        *(f"xmm{i}" for i in range(16)), *(f"k{i}" for i in range(8)), *(f"st{i}" for i in range(8)), "pkru"]
    # 16 regs + eip, eflags, fpuc, fpus, fptag + 8 x (tmp, pad) + mxcsr + 32 xmm + xcr0 + xstate_bv
    # + 32 ymmh = 104; cpu/avx512: 8 + 64 + 128; cpu/pkru: 1; cpu/apx: 16
    assert repr(cpu) == (f"<CpuState {tmp_path / 's.mig'} cpu 0: 321 fields, subsections cpu/avx512, cpu/pkru, "
                         "cpu/apx, accel tcg>")
    plain = _open(tmp_path, _cpu(), name="plain.mig").cpu_state(0, accelerator="kvm")
    assert repr(plain) == f"<CpuState {tmp_path / 'plain.mig'} cpu 0: 104 fields, subsections -, accel kvm>"
    assert cpu.register("k7") == bytes([8] * 8) and cpu.register("zmm31") == ZMM[31]
    assert cpu.fields["env.eip"] == 0x401000 and cpu.subsections["cpu/pkru"]["env.pkru"] == 0x55555550
    assert cpu.register("pkru") == (0x55555550).to_bytes(4, "little")
    assert cpu.register("r31") == APX_VALUES[15].to_bytes(8, "little")


def test_synthetic_component_data_of_every_kind(tmp_path):
    cpu = _open(tmp_path, _cpu(), [_avx512(), _pkru(), _apx()]).cpu_state(0)
    comps = cpu.component_data()
    assert sorted(comps) == [2, 5, 6, 7, 9, 19]
    assert comps[2] == b"".join(z[16:32] for z in ZMM[:16])
    assert comps[5] == b"".join(bytes([i + 1] * 8) for i in range(8))
    assert comps[6] == b"".join(z[32:] for z in ZMM[:16])
    assert comps[7] == b"".join(ZMM[16:])
    assert comps[9] == b"\x50\x55\x55\x55" + bytes(4)
    assert comps[19] == b"".join(v.to_bytes(8, "little") for v in APX_VALUES)


def test_synthetic_avx512_subsection_with_part_of_the_zmm_state(tmp_path):
    """zmm0-15 upper halves without zmm16-31 (QEMU's i386 target sends no hi16_zmm), the
    reverse, and zmm16-31 described element by element without element 0 (zmm16)."""
    opmask = _u64_array("env.opmask_regs", list(range(1, 9)))
    zmmh = _zmm_array("env.xmm_regs[0]", "zmmh_reg", [4, 5, 6, 7], ZMM[:16])
    hi16_desc, hi16_data = _zmm_array("env.xmm_regs[1]", "hi16_zmm_reg", list(range(8)), ZMM[16:])
    one = {k: v for k, v in hi16_desc.items() if k != "array_len"}
    hi16_no_16 = [({**one, "index": i}, hi16_data[64 * i:64 * i + 64]) for i in range(1, 16)]
    cases = [("a.mig", [opmask, zmmh], [2, 5, 6]),
             ("b.mig", [opmask, (hi16_desc, hi16_data)], [2, 5, 7]),
             ("c.mig", [opmask, zmmh] + hi16_no_16, [2, 5, 6])]
    for name, sub, comps in cases:
        cpu = _open(tmp_path, _cpu(), [("cpu/avx512", sub)], name=name).cpu_state(0)
        assert sorted(cpu.component_data()) == comps, name
    assert cpu.register("zmm17") == ZMM[17] and not cpu.has("zmm16")


def test_synthetic_xmm_only_and_no_vector_streams(tmp_path):
    """No ymmh_reg array (cpu vmstate < 12): XMM only, no AVX component; no xmm_regs at all:
    no vector register."""
    cpu = _open(tmp_path, _cpu(ymmh=False), name="a.mig").cpu_state(0)
    assert cpu.register("xmm7") == ZMM[7][:16]
    assert [n for n in cpu.register_names() if n[1:3] == "mm"] == [f"xmm{i}" for i in range(16)]
    assert 2 not in cpu.component_data()
    with pytest.raises(MigrationStreamError) as info:
        cpu.register("ymm3")
    assert info.value.problem == ("cpu 0: the stream has no field for ymm3 bytes 16..31 (no YMM upper halves "
                                  "(env.xmm_regs ymmh_reg, cpu vmstate v12))")
    bare = _open(tmp_path, _cpu(ymmh=False, xmm=False), name="b.mig").cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        bare.register("xmm3")
    assert info.value.problem == "cpu 0: the stream has no field for xmm3 bytes 0..15 (no env.xmm_regs)"
    assert bare.legacy_region()[160:416] == bytes(256)


def test_synthetic_one_missing_lane(tmp_path):
    """A ymmh_reg struct that carries only qword 2: ymm3's bytes 24..31 are missing."""
    fields = _cpu(ymmh=False) + [_zmm_array("env.xmm_regs[1]", "ymmh_reg", [2], ZMM[:16])]
    cpu = _open(tmp_path, fields).cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        cpu.register("ymm3")
    assert info.value.problem == ("cpu 0: the stream has no field for ymm3 bytes 24..31 (no YMM upper halves "
                                  "(env.xmm_regs ymmh_reg, cpu vmstate v12))")


def _struct(name, vmsd, fields, count=1, **extra):
    """A struct array field (vmsd None: no vmsd_name; fields None: no 'fields' key)."""
    inner = {"version": 1}
    if vmsd is not None:
        inner["vmsd_name"] = vmsd
    if fields is not None:
        inner["fields"] = [{"name": n, "type": t, "size": z} for n, t, z in fields]
    desc = {"name": name, "type": "struct", "size": sum(z for _, _, z in fields or ()), "struct": inner, **extra}
    if count is not None:
        desc["array_len"] = count
    return desc, bytes(desc["size"] * (count or 1))


def test_synthetic_zmm_structs_by_index_and_odd_descriptions(tmp_path):
    """Before the XMM arrays: a single (not array) ZMMReg struct, a struct with no vmsd_name,
    one whose vmsd_name is not a string, one without 'fields', and a hi16 struct whose
    qword 0 is 4 bytes; then the YMM upper halves described element by element ("index").
    The odd ones map nothing, the others map as usual."""
    desc, data = _zmm_array("env.xmm_regs[1]", "ymmh_reg", [2, 3], ZMM[:16])
    split = []
    for i in range(16):
        one = {k: v for k, v in desc.items() if k != "array_len"}
        split.append(({**one, "index": i}, data[16 * i:16 * i + 16]))
    q0 = [("_q_ZMMReg[0]", "uint64", 8)]
    odd = [
        _struct("env.single", "zmmh_reg", q0, count=None),
        _struct("env.anonymous", None, q0),
        _struct("env.listed", ["xmm_reg"], q0),
        _struct("env.nofields", "xmm_reg", None, count=2),
        _struct("env.short", "hi16_zmm_reg", [("_q_ZMMReg[0]", "uint32", 4)]
                + [(f"_q_ZMMReg[{q}]", "uint64", 8) for q in range(1, 8)]),
    ]
    fields = _cpu(ymmh=False)
    fields = fields[:1] + odd + fields[1:] + split
    cpu = _open(tmp_path, fields).cpu_state(0)
    assert cpu.register("ymm9") == ZMM[9][:32] and cpu.register("xmm0") == ZMM[0][:16]
    assert not cpu.has("zmm16") and not cpu.has("zmm0")
    assert cpu.register("st3") == _x(0x70 + 30, 10)


def test_synthetic_subsection_description_without_fields(tmp_path):
    """A subsection whose description has no 'fields' (an empty one) is walked as empty."""
    stream = _open(tmp_path, _cpu(), [("cpu/empty", [])])
    vmdesc = copy.deepcopy(stream.vmdesc)
    for device in vmdesc["devices"]:
        for sub in device.get("subsections", []):
            if sub["vmsd_name"] == "cpu/empty":
                del sub["fields"]
    cpu = MigrationStream.open(tmp_path / "s.mig", vmdesc=vmdesc).cpu_state(0)
    assert list(cpu.subsections) == ["cpu/empty"] and cpu.register("ymm4") == ZMM[4][:32]


def test_synthetic_gprs_beyond_r31_and_opmask_beyond_k7_are_not_registers(tmp_path):
    """A 33-entry env.regs maps rax..r31 only; a 9-entry opmask array k0..k7 only."""
    cpu = _open(tmp_path, _cpu(regs=33), [("cpu/avx512", [_u64_array("env.opmask_regs", list(range(1, 10)))])]
                ).cpu_state(0)
    assert cpu.register("r31") == (0x1000 + 31).to_bytes(8, "little")
    assert cpu.register("r15") == (0x1000 + 15).to_bytes(8, "little")
    assert cpu.register("k7") == (8).to_bytes(8, "little")
    assert not cpu.has("k8") and not cpu.has("r32")
    assert cpu.has_apx


@pytest.mark.parametrize("fields,note", [
    # 16 uint32: integers, but not 8 bytes each
    ([_u32(f"env.r{i}", i) for i in range(16)],
     "subsection cpu/apx has an unknown layout (16 fields: cpu/apx:env.r0:uint32/4, cpu/apx:env.r1:uint32/4, "
     "cpu/apx:env.r2:uint32/4, cpu/apx:env.r3:uint32/4, ...); R16-R31 not mapped"),
    # 16 eight-byte buffers: 8 bytes each, but not integers
    ([({"name": f"env.b{i}", "type": "buffer", "size": 8}, bytes(8)) for i in range(16)],
     "subsection cpu/apx has an unknown layout (16 fields: cpu/apx:env.b0:buffer/8, cpu/apx:env.b1:buffer/8, "
     "cpu/apx:env.b2:buffer/8, cpu/apx:env.b3:buffer/8, ...); R16-R31 not mapped"),
    # 15 uint64 and a buffer
    ([_u64(f"env.q{i}", i) for i in range(15)] + [({"name": "env.flags", "type": "buffer", "size": 8}, bytes(8))],
     "subsection cpu/apx has an unknown layout (16 fields: cpu/apx:env.q0:uint64/8, cpu/apx:env.q1:uint64/8, "
     "cpu/apx:env.q2:uint64/8, cpu/apx:env.q3:uint64/8, ...); R16-R31 not mapped"),
    # 16 uint64 and one more field
    ([_u64_array("env.regs", APX_VALUES), _u32("env.apx_flags", 1)],
     "subsection cpu/apx has an unknown layout (17 fields: cpu/apx:env.regs[0]:uint64/8, "
     "cpu/apx:env.regs[1]:uint64/8, cpu/apx:env.regs[2]:uint64/8, cpu/apx:env.regs[3]:uint64/8, ...); "
     "R16-R31 not mapped"),
    # exactly 4 and exactly 5 fields: ", ..." only past four
    ([_u64_array("env.regs", APX_VALUES[:4])],
     "subsection cpu/apx has an unknown layout (4 fields: cpu/apx:env.regs[0]:uint64/8, "
     "cpu/apx:env.regs[1]:uint64/8, cpu/apx:env.regs[2]:uint64/8, cpu/apx:env.regs[3]:uint64/8); "
     "R16-R31 not mapped"),
    ([_u64_array("env.regs", APX_VALUES[:5])],
     "subsection cpu/apx has an unknown layout (5 fields: cpu/apx:env.regs[0]:uint64/8, "
     "cpu/apx:env.regs[1]:uint64/8, cpu/apx:env.regs[2]:uint64/8, cpu/apx:env.regs[3]:uint64/8, ...); "
     "R16-R31 not mapped"),
])
def test_synthetic_apx_layouts_the_reader_does_not_map(tmp_path, fields, note):
    cpu = _open(tmp_path, _cpu(), [("cpu/apx", fields)]).cpu_state(0)
    assert cpu.notes == [note]
    assert not cpu.has("r16") and 19 not in cpu.component_data()


def test_synthetic_x87_without_fpregs_and_physical_order(tmp_path):
    no_fp = _open(tmp_path, _cpu(fpregs=False), name="a.mig").cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        no_fp.register("st0")
    assert info.value.problem == "cpu 0: the stream has no env.fpregs for st0"
    assert no_fp.legacy_region()[32:160] == bytes(128)
    # TOP = 5 (FSW 0x2800): under TCG ST(i) is physical (5 + i) & 7; under KVM slot i.
    fields = _cpu()
    fields[4] = _u16("env.fpus_vmstate", 0x2800)
    stream = _open(tmp_path, fields, name="b.mig")
    tcg, kvm = stream.cpu_state(0, accelerator="tcg"), stream.cpu_state(0, accelerator="kvm")
    assert [tcg.register(f"st{i}") for i in range(8)] == [_x(0x70 + 10 * ((5 + i) & 7), 10) for i in range(8)]
    assert [kvm.register(f"st{i}") for i in range(8)] == [_x(0x70 + 10 * i, 10) for i in range(8)]
    assert tcg.legacy_region()[32:48] == _x(0x70 + 50, 10) + bytes(6)


def test_synthetic_x87_with_four_fpregs(tmp_path):
    fields = _cpu(fpregs=False) + [_fpregs([_x(0x70 + 10 * i, 10) for i in range(4)])]
    cpu = _open(tmp_path, fields).cpu_state(0, accelerator="kvm")
    assert cpu.register("st3") == _x(0x70 + 30, 10)
    with pytest.raises(MigrationStreamError) as info:
        cpu.register("st5")
    assert info.value.problem == "cpu 0: the stream has no env.fpregs[5] for st5"


def test_synthetic_x87_short_fpreg_is_not_mapped(tmp_path):
    """An fpreg whose tmp is not 10 bytes is no x87 register."""
    fields = _cpu(fpregs=False)
    desc = {"name": "env.fpregs", "type": "struct", "size": 8, "array_len": 8,
            "struct": {"vmsd_name": "fpreg", "version": 1, "fields": [{"name": "tmp", "type": "buffer", "size": 8}]}}
    cpu = _open(tmp_path, fields + [(desc, bytes(64))]).cpu_state(0)
    assert not cpu.has("st0")


def test_synthetic_legacy_defaults_without_control_fields(tmp_path):
    """No env.fpuc/fpus/fptag/mxcsr: FCW 0x037F and MXCSR 0x1F80 (the init values), rest 0."""
    fields = [f for f in _cpu(fpregs=False, xmm=False, ymmh=False)
              if f[0]["name"] not in ("env.fpuc", "env.fpus_vmstate", "env.fptag_vmstate", "env.mxcsr")]
    cpu = _open(tmp_path, fields).cpu_state(0)
    assert cpu.legacy_region() == b"\x7f\x03" + bytes(22) + b"\x80\x1f\x00\x00" + bytes(484)


def test_synthetic_fpop_ip_dp_with_wide_values(tmp_path):
    """FOP is 11 bits and FIP/FDP 64: the legacy bytes take exactly their widths."""
    sub = ("cpu/fpop_ip_dp", [_u16("env.fpop", 0x07FF), _u64("env.fpip", 0x1122334455667788),
                              _u64("env.fpdp", 0x99AABBCCDDEEFF01)])
    cpu = _open(tmp_path, _cpu(), [sub]).cpu_state(0)
    assert cpu.legacy_region()[:32] == bytes.fromhex("7f03000000" "00" "ff07" "8877665544332211"
                                                     "01ffeeddccbbaa99" "801f0000" "00000000")
    # A FOP field wider than QEMU's uint16 (and no FIP/FDP): only its low 16 bits, at bytes 6..7.
    cpu = _open(tmp_path, _cpu(), [("cpu/fpop_ip_dp", [_u32("env.fpop", 0x00AB0123)])], name="b.mig").cpu_state(0)
    assert cpu.legacy_region()[:32] == bytes.fromhex("7f03000000" "00" "2301" + "00" * 16 + "801f0000" "00000000")


# ---- MPX and AMX ------------------------------------------------------------------------------

def _bnd(values, *, cfgu=None, sts=None, parts=("lb", "ub")):
    desc = {"name": "env.bnd_regs", "type": "struct", "size": 8 * len(parts), "array_len": len(values),
            "struct": {"vmsd_name": "bnd_regs", "version": 1,
                       "fields": [{"name": p, "type": "uint64", "size": 8} for p in parts]}}
    data = b"".join(v.to_bytes(8, "big") for pair in values for v in pair[:len(parts)])
    fields = [(desc, data)]
    if cfgu is not None:
        fields.append(_u64("env.bndcs_regs.cfgu", cfgu))
    if sts is not None:
        fields.append(_u64("env.bndcs_regs.sts", sts))
    fields.append(_u64("env.msr_bndcfgs", 0x1234))
    return ("cpu/mpx", fields)


BND = [(0x1000 * (i + 1), 0xFFFF_0000 + i) for i in range(4)]


def test_synthetic_mpx_maps_bndregs_and_bndcsr(tmp_path):
    cpu = _open(tmp_path, _cpu(), [_bnd(BND, cfgu=0x0BAD0001, sts=0x2)], name="a.mig").cpu_state(0)
    comps = cpu.component_data()
    assert comps[3] == bytes.fromhex(
        "0010000000000000" "0000ffff00000000" "0020000000000000" "0100ffff00000000"
        "0030000000000000" "0200ffff00000000" "0040000000000000" "0300ffff00000000")
    assert comps[4] == bytes.fromhex("0100ad0b00000000" "0200000000000000") + bytes(48)
    assert not cpu.notes
    image = cpu.to_xsave(SKX_MPX)
    assert image.raw_component_bytes(3) == comps[3] and image.raw_component_bytes(4) == comps[4]
    assert image.xstate_bv == 0x1F  # x87, SSE, AVX (ymm uppers non-zero), BNDREGS, BNDCSR
    # Zero or absent BNDCFGU/BNDSTATUS read as zero.
    for name, kw in (("b.mig", {"cfgu": 0, "sts": 0}), ("c.mig", {})):
        cpu = _open(tmp_path, _cpu(), [_bnd(BND, **kw)], name=name).cpu_state(0)
        assert cpu.component_data()[4] == bytes(64)


@pytest.mark.parametrize("values,parts", [(BND[:3], ("lb", "ub")), (BND, ("lb",))])
def test_synthetic_mpx_unknown_layout_is_noted(tmp_path, values, parts):
    cpu = _open(tmp_path, _cpu(), [_bnd(values, cfgu=1, sts=1, parts=parts)]).cpu_state(0)
    comps = cpu.component_data()
    assert 3 not in comps and 4 not in comps
    assert cpu.notes == ["subsection cpu/mpx: unknown layout, BNDREGS not mapped"]


CFG = _x(0x31, 64)
TILES = bytes(((i * 7) & 0xFF) or 1 for i in range(8192))


@pytest.mark.parametrize("shape", ["bytes", "buffer"])
def test_synthetic_amx_tiles(tmp_path, shape):
    """QEMU's cpu/intel_amx_xtile: uint8 arrays (one leaf per byte), or one buffer each."""
    if shape == "bytes":
        fields = [_u8_array("env.xtilecfg", CFG), _u8_array("env.xtiledata", TILES)]
    else:
        fields = [({"name": "env.xtilecfg", "type": "buffer", "size": 64}, CFG),
                  ({"name": "env.xtiledata", "type": "buffer", "size": 8192}, TILES)]
    cpu = _open(tmp_path, _cpu(), [("cpu/intel_amx_xtile", fields)]).cpu_state(0)
    comps = cpu.component_data()
    assert comps[17] == CFG and comps[18] == TILES and not cpu.notes
    image = cpu.to_xsave(APX_LAYOUT)
    assert image.raw_component_bytes(17) == CFG and image.raw_component_bytes(18) == TILES
    assert image.xstate_bv == 0x60007


def test_synthetic_amx_unknown_layouts_are_noted(tmp_path):
    """xtilecfg one byte short, xtiledata as 4096 uint16: neither is mapped, each noted."""
    fields = [_u8_array("env.xtilecfg", CFG[:63]),
              ({"name": "env.xtiledata", "type": "uint16", "size": 2, "array_len": 4096}, TILES)]
    cpu = _open(tmp_path, _cpu(), [("cpu/intel_amx_xtile", fields)]).cpu_state(0)
    comps = cpu.component_data()
    assert 17 not in comps and 18 not in comps
    assert cpu.notes == ["subsection cpu/intel_amx_xtile: env.xtilecfg has an unknown layout, not mapped",
                         "subsection cpu/intel_amx_xtile: env.xtiledata has an unknown layout, not mapped"]
    whole_short = [({"name": "env.xtilecfg", "type": "buffer", "size": 32}, CFG[:32])]
    cpu = _open(tmp_path, _cpu(), [("cpu/intel_amx_xtile", whole_short)], name="b.mig").cpu_state(0)
    assert 17 not in cpu.component_data()


# ---- to_xsave: XSTATE_BV modes, layouts, errors --------------------------------------------

def test_to_xsave_xstate_bv_modes(tmp_path):
    """env.xstate_bv 0x3 (QEMU's x87|SSE) while AVX and PKRU hold non-zero values."""
    cpu = _open(tmp_path, _cpu(xstate_bv=0x3), [_pkru()]).cpu_state(0)
    auto = cpu.to_xsave(ZEN4)
    assert auto.xstate_bv == 0x207 and auto.raw_component_bytes(2) == b"".join(z[16:32] for z in ZMM[:16])
    assert cpu.to_xsave(ZEN4, xstate_bv="auto") == auto
    assert cpu.to_xsave(ZEN4, xstate_bv="nonzero") == auto
    qemu = cpu.to_xsave(ZEN4, xstate_bv="qemu")
    # QEMU's XSTATE_BV exactly: AVX and PKRU in their init state, their bytes left zero.
    assert qemu.xstate_bv == 0x3
    assert qemu.raw_component_bytes(2) == bytes(256) and qemu.raw_component_bytes(9) == bytes(8)
    assert qemu.read("xmm5") == ZMM[5][:16]
    assert cpu.to_xsave(ZEN4, xstate_bv=0x201).xstate_bv == 0x201
    assert cpu.to_xsave(ZEN4, xstate_bv=0x201).raw_component_bytes(9) == b"\x50\x55\x55\x55" + bytes(4)
    # Bits the layout lacks are dropped (Zen 3: no PKRU), whatever the mode.
    assert cpu.to_xsave(ZEN3, xstate_bv=0x80207, strict=False).xstate_bv == 0x7
    with pytest.raises(ValueError, match=r"^xstate_bv must be 'auto', 'qemu', 'nonzero' or an int, not True$"):
        cpu.to_xsave(ZEN4, xstate_bv=True)
    with pytest.raises(ValueError, match=r"^xstate_bv must be 'auto', 'qemu', 'nonzero' or an int, not 'QEMU'$"):
        cpu.to_xsave(ZEN4, xstate_bv="QEMU")


def test_to_xsave_auto_keeps_qemus_bits_for_zero_components(tmp_path):
    """env.xstate_bv 0x207 with PKRU absent (zero) and AVX zero: "auto" keeps QEMU's bits,
    "nonzero" only x87/SSE; no env.xstate_bv: "qemu" falls back to "nonzero"."""
    zero_upper = [z[:16] + bytes(48) for z in ZMM[:16]]
    fields = [f if f[0]["name"] != "env.xmm_regs[1]" else _zmm_array("env.xmm_regs[1]", "ymmh_reg", [2, 3], zero_upper)
              for f in _cpu(xstate_bv=0x207)]
    cpu = _open(tmp_path, fields, name="a.mig").cpu_state(0)
    assert cpu.to_xsave(ZEN4).xstate_bv == 0x207
    assert cpu.to_xsave(ZEN4, xstate_bv="nonzero").xstate_bv == 0x3
    assert cpu.to_xsave(ZEN4, xstate_bv="qemu").xstate_bv == 0x207
    fields = [f for f in fields if f[0]["name"] != "env.xstate_bv"]
    cpu = _open(tmp_path, fields, name="b.mig").cpu_state(0)
    assert cpu.xstate_bv is None
    assert cpu.to_xsave(ZEN4, xstate_bv="qemu").xstate_bv == 0x3
    assert cpu.to_xsave(ZEN4).xstate_bv == 0x3


def test_to_xsave_where_and_errors(tmp_path):
    path = tmp_path / "s.mig"
    cpu = _open(tmp_path, _cpu(), [_pkru()]).cpu_state(0)
    assert cpu.to_xsave(ZEN4).where == f"{path} cpu 0"
    assert cpu.to_xsave(ZEN4, where="here").where == "here"
    with pytest.raises(MigrationStreamError) as info:
        cpu.to_xsave(ZEN3)
    assert info.value.problem == ("cpu 0: non-zero state for component 9 (pkru) has no place in the layout "
                                  f"({ZEN3.where}, XCR0 0x7); pass strict=False to drop it")
    assert info.value.offset == cpu.section.start
    every = _open(tmp_path, _cpu(), [_avx512(), _pkru()], name="e.mig").cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        every.to_xsave(ZEN3)
    assert info.value.problem == ("cpu 0: non-zero state for component 5 (opmask), 6 (zmm_hi256), 7 (hi16_zmm), "
                                  "9 (pkru) has no place in the layout (CPUID table amd-zen3, XCR0 0x7); "
                                  "pass strict=False to drop it")
    dropped = cpu.to_xsave(ZEN3, strict=False)
    assert dropped.xstate_bv == 0x7 and dropped.read("ymm2") == ZMM[2][:32]
    # A PKRU field of 8 bytes (QEMU's is 4): 12 bytes for the 8-byte component.
    wide = _open(tmp_path, _cpu(), [_pkru(size=8)], name="w.mig").cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        wide.to_xsave(ZEN4)
    assert info.value.problem == (f"cpu 0: cannot build an XSAVE image: {tmp_path / 'w.mig'} cpu 0: "
                                  "component 9 pkru is 8 bytes, got 12")


# ---- shapes past what the architecture has --------------------------------------------------

def test_synthetic_elements_past_the_architecture_are_not_registers(tmp_path):
    """A hi16_zmm_reg array of 17 elements (a 'zmm32') and an fpreg described only as
    element 8: register_names stops at zmm31, and no x87 register 0..7 exists."""
    sub = ("cpu/avx512", [_u64_array("env.opmask_regs", list(range(1, 9))),
                          _zmm_array("env.xmm_regs[0]", "zmmh_reg", [4, 5, 6, 7], ZMM[:16]),
                          _zmm_array("env.xmm_regs[1]", "hi16_zmm_reg", list(range(8)), ZMM[16:] + [ZMM[0]])])
    cpu = _open(tmp_path, _cpu(), [sub], name="a.mig").cpu_state(0)
    names = cpu.register_names()
    assert [n for n in names if n.startswith("zmm")] == [f"zmm{i}" for i in range(32)]
    assert cpu.component_data()[7] == b"".join(ZMM[16:])
    desc, data = _fpregs([_x(0x70, 10)])
    one = {k: v for k, v in desc.items() if k != "array_len"}
    cpu = _open(tmp_path, _cpu(fpregs=False) + [({**one, "index": 8}, data)], name="b.mig").cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        cpu.register("st0")
    assert info.value.problem == "cpu 0: the stream has no env.fpregs for st0"


def test_to_xsave_judges_xcr0_support_not_just_the_component_table(tmp_path):
    """A Layout that describes AVX (component 2) while its XCR0 lacks it (no CPUID reports
    that, but Layout accepts it): AVX's non-zero state still has no place."""
    from apx_tests.xsave.layout import Component
    odd = Layout(0x3, {2: Component(2, "avx", 256, 576, False, False)}, 832, 0, "x87+sse layout describing avx")
    cpu = _open(tmp_path, _cpu()).cpu_state(0)
    with pytest.raises(MigrationStreamError) as info:
        cpu.to_xsave(odd)
    assert info.value.problem == ("cpu 0: non-zero state for component 2 (avx) has no place in the layout "
                                  "(x87+sse layout describing avx, XCR0 0x3); pass strict=False to drop it")
    image = cpu.to_xsave(odd, strict=False)
    assert image.xstate_bv == 0x3 and image.raw_component_bytes(2) == bytes(256)
