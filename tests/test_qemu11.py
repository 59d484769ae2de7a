"""QEMU 11 beside QEMU 10: several QEMUs in one run, QEMU 11 on Debian 12 from the Debian 13
root filesystem (ci/bootstrap's side QEMU), its migration streams with and without cpu/apx,
-cpu host with or without IA32_ARCH_CAPABILITIES, and why APX does not run (per QEMU, per
accelerator, the missing piece by name).

The side QEMU is the one ci/bootstrap writes (<cache>/qemu11/bin/qemu-system-x86_64 on
Debian 12; <cache>/qemu10/... on Debian 13); tests that need it skip, saying so, where the
bootstrap left it out (APX_SKIP_SIDE_QEMU=1).  No vCPU here has APX: cpu/apx is tested on a
stream QEMU 11 wrote, with the subsection added exactly as QEMU 11's target/i386/machine.c
describes it (vmstate_apx: "cpu/apx" version 1, VMSTATE_UINTTL_SUB_ARRAY(env.regs, X86CPU,
CPU_NB_REGS, CPU_NB_EREGS - CPU_NB_REGS) = env.regs[16..31], sent last of cpu's
subsections), and QEMU 11 itself loads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from apx_tests.cases import BACKENDS, CaseId, CaseRunner, cases
from apx_tests.guests.build import build_payload
from apx_tests.hostdesc import HostDescription
from apx_tests.kvm.backend import RecordedKvmHost
from apx_tests.qemu import binaries as qb
from apx_tests.qemu.backend import QemuBackend
from apx_tests.qemu.host import QemuHost
from apx_tests.qemu.binaries import ApxFacts, ApxProbe, apx_reason
from apx_tests.qemu.errors import QemuError
from apx_tests.qemu.machine import Machine, live_machines
from apx_tests.qemu.spec import KVM_CPU_NO_ARCH_CAPABILITIES, QMP_QUIT, kvm_usable, our_temp_dirs
from apx_tests.qemu.migration.stream import MigrationStream
from apx_tests.report.records import parse_case_label
from apx_tests.scenarios import Run
from apx_tests.scenarios.engine import LOADED, load_bank
from apx_tests.xsave import BANKS, Layout

REPO = Path(__file__).resolve().parent.parent
HOSTS = REPO / "tests" / "hosts"
KVM = kvm_usable()
needs_kvm = pytest.mark.skipif(KVM is not None, reason=f"KVM: {KVM}")
SYSTEM_QEMU = shutil.which("qemu-system-x86_64")


def _side(major: int) -> str | None:
    """ci/bootstrap's side QEMU of this major version, if it is there and runs."""
    for path in qb.side_qemus():
        version, _ = qb.qemu_version(path)
        if version and qb.version_tuple(version)[0] == major:
            return path
    return None


def _qemu_of(major: int) -> str:
    """A QEMU of this major version here (the system's or a side one), else a skip."""
    for path in filter(None, (SYSTEM_QEMU, *qb.side_qemus())):
        version, _ = qb.qemu_version(path)
        if version and qb.version_tuple(version)[0] == major:
            return path
    pytest.skip(f"no QEMU {major} here (ci/bootstrap provides QEMU 10 and 11 side by side; "
                f"APX_SKIP_SIDE_QEMU=1 leaves the side one out)")


@pytest.fixture(scope="module")
def qemu11():
    return _qemu_of(11)


@pytest.fixture(scope="module")
def qemu10():
    return _qemu_of(10)


def _host(name: str) -> RecordedKvmHost:
    return RecordedKvmHost(HostDescription.load(HOSTS / f"{name}.json").kvm, name=f"tests/hosts/{name}.json")


# --- several QEMUs: tags, ids, the default list ------------------------------------------------

def test_tags_tell_qemus_apart():
    assert qb.assign_tags(["10.0.2"]) == [""]
    assert qb.assign_tags(["10.0.2", "11.1.3"]) == ["10", "11"]
    assert qb.assign_tags(["10.0.2", "10.1.0", "11.1.3"]) == ["10.0", "10.1", "11"]
    assert qb.assign_tags(["11.1.3", "11.1.50"]) == ["11.1.3", "11.1.50"]
    assert qb.assign_tags(["11.1.3", "11.1.3"]) == ["11.1.3", "11.1.3b"]


@pytest.mark.parametrize("tags", [("",), ("10", "11"), ("10.0", "10.1", "11"), ("11.1.3", "11.1.3b")])
def test_case_ids_round_trip_with_and_without_versions(tags):
    """CaseId.parse(id) gives back the case (the remote agent and avocado parse ids), and
    the report reads bank, backend and scenario out of each id."""
    chosen = cases(BACKENDS, tags)
    per_qemu = len(cases(("qemu-kvm", "qemu-tcg")))
    assert len([c for c in chosen if c.backend != "kvm"]) == per_qemu * len(tags)
    ids = [c.id for c in chosen]
    assert len(ids) == len(set(ids))
    for case in chosen:
        assert CaseId.parse(case.id) == case
        assert parse_case_label(case.id) == (case.label, case.bank, case.scenario)
        if case.backend != "kvm":
            assert case.id.startswith(f"qemu{case.qemu}-")
    if tags == ("",):
        assert "qemu-kvm-ymm-export" in ids and "qemu-tcg-x87-fresh_vm" in ids
    if tags == ("10", "11"):
        assert {"qemu10-kvm-ymm-export", "qemu11-kvm-ymm-export", "qemu11-tcg-apx-gprs"} <= set(ids)
        assert CaseId.parse("qemu11-kvm-ymm-export") == CaseId("qemu-kvm", "ymm", "export", "11")


@pytest.mark.parametrize("text", ["qemu11-kvm", "qemu-11-kvm-ymm-export", "qemu11-xen-ymm-export", "kvm11-ymm-export"])
def test_bad_versioned_ids_are_refused(text):
    from apx_tests.cases import CaseIdError
    with pytest.raises(CaseIdError):
        CaseId.parse(text)


def test_pick_follows_the_tag():
    qemus = [qb.QemuBinary("/a", "10.0.2", "10"), qb.QemuBinary("/b", "11.1.3", "11")]
    assert qb.pick(qemus, "").path == "/a"         # plain qemu-kvm-... ids: the primary QEMU
    assert qb.pick(qemus, "11").path == "/b"
    assert qb.pick(qemus, "12") is None
    # A run with one QEMU 11 still runs an id another run made with two.
    assert qb.pick([qb.QemuBinary("/b", "11.1.3", "")], "11").path == "/b"


def _fake_qemu(path: Path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_default_list_is_path_qemu_plus_working_side_qemus(tmp_path, monkeypatch):
    """The default QEMUs: PATH's, then each side QEMU under the cache that runs; one that
    does not (its rootfs gone, say) is left out and listed for the probe."""
    monkeypatch.delenv("APX_QEMU", raising=False)
    monkeypatch.setenv("APX_DEBIAN13_CACHE", str(tmp_path))
    if SYSTEM_QEMU is None:
        pytest.skip("no qemu-system-x86_64 in PATH")
    good = _fake_qemu(tmp_path / "qemu42" / "bin" / "qemu-system-x86_64",
                      'echo "QEMU emulator version 42.0.1 (side)"\n')
    broken = _fake_qemu(tmp_path / "qemu43" / "bin" / "qemu-system-x86_64",
                        'echo "qemu-system-x86_64: error while loading shared libraries: libfoo.so" >&2; exit 127\n')
    qemus = qb.resolve_qemus(None)
    system_version = qb.qemu_version(SYSTEM_QEMU)[0]
    assert [(q.path, q.version) for q in qemus] == [(SYSTEM_QEMU, system_version), (good, "42.0.1")]
    assert [q.origin for q in qemus] == ["PATH", "ci/bootstrap side QEMU"]
    assert qemus[1].tag == "42" and qemus[1].backend("kvm") == "qemu42-kvm"
    (left_out,) = qb.broken_side_qemus()
    assert left_out.path == broken and "exit 127" in left_out.error and "libfoo.so" in left_out.error
    # $APX_QEMU (several, ':'-separated) replaces the default list.
    monkeypatch.setenv("APX_QEMU", f"{good}:{SYSTEM_QEMU}")
    assert [q.path for q in qb.resolve_qemus(None)] == [good, SYSTEM_QEMU]


def test_several_qemus_must_each_report_a_version(tmp_path):
    if SYSTEM_QEMU is None:
        pytest.skip("no qemu-system-x86_64 in PATH")
    with pytest.raises(qb.QemuListError) as err:
        qb.resolve_qemus([SYSTEM_QEMU, str(tmp_path / "missing-qemu")])
    assert "\n" not in str(err.value)
    assert str(err.value) == (f"--apx-qemu {tmp_path / 'missing-qemu'}: not an executable file (with several "
                              f"QEMUs each must report its version: it names their case ids)")
    # One broken QEMU alone is allowed: its cases skip saying why.
    (alone,) = qb.resolve_qemus(str(tmp_path / "missing-qemu"))
    assert alone.tag == "" and alone.version is None and "not an executable file" in alone.error
    # The same binary twice runs once, with plain ids.
    (once,) = qb.resolve_qemus([SYSTEM_QEMU, os.path.realpath(SYSTEM_QEMU)])
    assert once.tag == ""


# --- the side QEMU 11: an ordinary host process ------------------------------------------------

def test_side_qemu11_runs_as_a_host_process(tmp_path):
    """ci/bootstrap's QEMU 11 on Debian 12: the rootfs's loader runs the rootfs's QEMU with
    the host's root, /dev/kvm and Unix sockets (no chroot); modules and firmware are the
    rootfs's (QEMU_MODULE_DIR, -L), the boot firmware its qboot.rom."""
    path = _side(11)
    if path is None:
        pytest.skip("no side QEMU 11 (Debian 12: ci/bootstrap provides it unless APX_SKIP_SIDE_QEMU=1)")
    # Only this test's directories count: a whole run's session runner may still hold its own.
    before = set(our_temp_dirs())
    backend = QemuBackend("kvm" if KVM is None else "tcg", qemu=path)
    try:
        with Run(backend, BANKS["xmm"], build_payload("xmm").code) as run:
            session = run.start()
            session.run_to(0)
            m = session.machine
            pid = m.pid
            assert os.readlink(f"/proc/{pid}/root") == "/"
            exe = os.readlink(f"/proc/{pid}/exe")
            # <prefix>/share is the rootfs's usr/share
            rootfs = os.path.dirname(os.path.dirname(os.path.realpath(os.path.join(os.path.dirname(path), "..",
                                                                                   "share"))))
            assert exe.startswith(rootfs + "/") and "ld-linux" in exe, exe
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
            assert env[b"QEMU_MODULE_DIR"].decode().startswith(rootfs + "/")
            argv = m.argv
            assert argv[0] == path and os.path.realpath(argv[argv.index("-bios") + 1]).startswith(rootfs + "/")
            assert m.qmp("query-version")["qemu"]["major"] == 11
            if KVM is None:
                assert m.qmp("query-kvm") == {"enabled": True, "present": True}
            assert os.path.dirname(m.gdb_socket) == m.workdir  # a Unix socket of ours
            session.run_to(1)
    finally:
        backend.host.close()
    assert not [x for x in live_machines() if x.pid == pid] and not os.path.exists(f"/proc/{pid}")
    assert set(our_temp_dirs()) - before == set()


def test_gdb16_goes_with_the_side_qemu11(qemu11):
    """ci/bootstrap puts gdb 16 beside its QEMU 11 (Debian 13's pair); QEMU 11's gdbstub
    still offers only org.gnu.gdb.i386.core for a vCPU without APX."""
    from apx_tests.qemu.gdb import GdbSession
    host = QemuHost("tcg", qemu11)
    try:
        if _side(11) == qemu11:
            assert host.gdb == os.path.join(os.path.dirname(qemu11), "gdb")
            out = subprocess.run([host.gdb, "--version"], capture_output=True, text=True, timeout=60).stdout
            assert re.match(r"GNU gdb .* 16\.\d", out.splitlines()[0]), out
        backend = QemuBackend(host=host)
        with Run(backend, BANKS["xmm"], build_payload("xmm").code) as run:
            session = run.start()
            session.run_to(0)
            with GdbSession(session.machine.gdb_socket, gdb=host.gdb, timeout=20) as gdb:
                assert gdb.features() == {"org.gnu.gdb.i386.core"}
                assert "xmm0" in gdb.register_names() and "r16" not in gdb.register_names()
            session.machine.cont()
    finally:
        host.close()


# --- -cpu host: with IA32_ARCH_CAPABILITIES where the host takes it ----------------------------

@needs_kvm
def test_arch_capabilities_is_left_out_only_where_qemu_aborts():
    """Each QEMU here started once under `-cpu host` (independently of apx_tests): where it
    aborts on "failed to set MSR 0x10a", its KVM guests run `host,-arch-capabilities`,
    everywhere else plain `host`; and the model chosen really starts."""
    qemus = [q for q in qb.resolve_qemus(None) if q.version]
    for q in qemus:
        proc = subprocess.run(qb.probe_argv(q.path, "kvm", "host"), input=QMP_QUIT,
                              capture_output=True, text=True, timeout=60)
        aborts = "failed to set MSR 0x10a" in proc.stderr
        choice = qb.kvm_cpu_model(q.path)
        assert choice.cpu == (KVM_CPU_NO_ARCH_CAPABILITIES if aborts else "host"), (q, proc.stderr[-300:])
        assert ("aborts" in choice.why) == aborts
        assert QemuHost("kvm", q.path).base_cpu == choice.cpu
        ok = subprocess.run(qb.probe_argv(q.path, "kvm", choice.cpu), input=QMP_QUIT,
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, (q, ok.stderr[-300:])


# --- migration streams of QEMU 11 ------------------------------------------------------------

def _loaded_stream(qemu: str, accel: str, bank: str, out: Path):
    """A stream of `bank` loaded with pattern(1) in a guest of this QEMU, and the spec that
    restores it (streams restore only into the same machine configuration)."""
    backend = QemuBackend(accel, qemu=qemu)
    try:
        with Run(backend, BANKS[bank], build_payload(bank).code) as run:
            session = run.start()
            session.run_to(0)
            load_bank(run, session, run.pattern(LOADED))
            snap = session.snapshot()
            shutil.copyfile(snap.path, out)
            return out, session.spec, run.pattern(LOADED), backend.layout
    finally:
        backend.host.close()


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    made = {}
    out = tmp_path_factory.mktemp("q11streams")

    def get(qemu: str, accel: str, bank: str = "ymm"):
        key = (qemu, accel, bank)
        if key not in made:
            made[key] = _loaded_stream(qemu, accel, bank, out / f"{len(made)}-{accel}-{bank}.mig")
        return made[key]
    return get


ACCELS = ["tcg", pytest.param("kvm", marks=needs_kvm)]


@pytest.mark.parametrize("accel", ACCELS)
def test_qemu11_stream_has_qemu10s_cpu_fields(streams, qemu10, qemu11, accel):
    """QEMU 11 writes cpu version 12 with the same fields as QEMU 10, and the reader gets
    the guest's registers from both."""
    described = {}
    for qemu in (qemu10, qemu11):
        path, _, pattern, layout = streams(qemu, accel)
        stream = MigrationStream.open(path)
        cpu = stream.section("cpu")
        assert cpu.version == 12
        described[qemu] = [f["name"] for f in cpu.desc["fields"]]
        image = stream.cpu_state(0).to_xsave(layout)
        assert {n: image.read(n) for n in pattern} == pattern
        assert "cpu/apx" not in cpu.subsections  # no vCPU here has APX: QEMU sends it only then
    assert described[qemu10] == described[qemu11]


APX_VALUES = [0x1111_0000_0000_0000 + 0x0101 * i for i in range(16)]


def add_cpu_apx(path: Path, out: Path, values=APX_VALUES, *, xstate_apx: bool = True) -> Path:
    """Copy a real stream, adding cpu/apx to its cpu section as QEMU 11 would send it for a
    vCPU with APX: after cpu's other subsections (vmstate_apx is last in vmstate_x86_cpu's
    list), before the section footer: 0x05, u8 7 "cpu/apx", be32 version 1, env.regs[16..31]
    as 16 be64; its entry in the vmdesc JSON as QEMU describes VMSTATE_UINTTL_SUB_ARRAY on
    x86-64 (name env.regs, array_len 16, uint64, size 8); the JSON's length rewritten.
    With `xstate_apx`, env.xstate_bv gets bit 19 (what KVM_GET_XSAVE reports with R16-R31
    in use)."""
    stream = MigrationStream.open(path)
    cpu = stream.section("cpu")
    data = bytearray(Path(path).read_bytes())
    footer = cpu.end - 5
    assert data[footer] == 0x7E and struct.unpack(">I", data[footer + 1:cpu.end])[0] == cpu.section_id
    if xstate_apx:
        leaf = cpu.leaves["env.xstate_bv"]
        value = int.from_bytes(leaf.raw, "big") | 1 << 19
        data[leaf.offset:leaf.offset + leaf.size] = value.to_bytes(leaf.size, "big")
    name = b"cpu/apx"
    sub = bytes([0x05, len(name)]) + name + struct.pack(">I", 1) + b"".join(struct.pack(">Q", v) for v in values)
    vmdesc = json.loads(json.dumps(stream.vmdesc))
    (desc,) = [d for d in vmdesc["devices"] if d["name"] == "cpu" and d["instance_id"] == cpu.instance_id]
    desc.setdefault("subsections", []).append(
        {"vmsd_name": "cpu/apx", "version": 1,
         "fields": [{"name": "env.regs", "array_len": 16, "type": "uint64", "size": 8}]})
    text = json.dumps(vmdesc, separators=(",", ":")).encode()
    body = data[:footer] + sub + data[footer:stream.vmdesc_offset]
    out.write_bytes(bytes(body) + b"\x06" + struct.pack(">I", len(text)) + text)
    return out


@pytest.mark.parametrize("accel", ACCELS)
def test_reader_takes_r16_r31_from_cpu_apx_in_a_qemu11_stream(streams, qemu11, accel, tmp_path):
    path, _, pattern, layout = streams(qemu11, accel)
    synthetic = add_cpu_apx(path, tmp_path / "apx.mig")
    stream = MigrationStream.open(synthetic)
    cpu = stream.cpu_state(0)
    assert cpu.has_apx and not cpu.notes
    assert [int.from_bytes(cpu.register(f"r{16 + i}"), "little") for i in range(16)] == APX_VALUES
    assert cpu.xstate_bv >> 19 & 1
    apx_layout = Layout.reference("intel-apx")
    image = cpu.to_xsave(apx_layout)
    assert image.xstate_bv >> 19 & 1
    assert [int.from_bytes(image.read(f"r{16 + i}"), "little") for i in range(16)] == APX_VALUES
    # Everything QEMU 11 wrote is still read the same way (the guest's ymm bank); the
    # guest's own layout has no room for APX, which the reader says rather than drop it.
    from apx_tests.qemu.migration.stream import MigrationStreamError
    with pytest.raises(MigrationStreamError, match=r"component 19 \(apx\) has no place in the layout"):
        cpu.to_xsave(layout)
    assert {n: cpu.to_xsave(layout, strict=False).read(n) for n in pattern} == pattern
    # An edit of r20 lands in the cpu/apx bytes, nowhere else.
    edited = stream.with_register(tmp_path / "r20.mig", "r20", 0xFEED_F00D_0000_0020)
    regs = edited.cpu_state(0)
    assert int.from_bytes(regs.register("r20"), "little") == 0xFEED_F00D_0000_0020
    assert [int.from_bytes(regs.register(f"r{16 + i}"), "little") for i in range(16) if i != 4] == \
        [v for i, v in enumerate(APX_VALUES) if i != 4]
    changed = [i for i, (a, b) in enumerate(zip(synthetic.read_bytes(), (tmp_path / "r20.mig").read_bytes()))
               if a != b]
    leaf = regs.section.leaves["cpu/apx:env.regs[4]"]
    assert changed and all(leaf.offset <= i < leaf.offset + 8 for i in changed)


def test_qemu11_loads_cpu_apx_and_qemu10_refuses_it(streams, qemu10, qemu11, tmp_path):
    """QEMU 11 knows cpu/apx (it loads the subsection into env.regs[16..31] and runs on);
    QEMU 10 does not, and refuses the stream (its message names the cpu device, not the
    subsection) rather than dropping R16-R31.  Each loads the same stream without it."""
    before = set(our_temp_dirs())  # a whole run's session runner may still hold its own
    for qemu in (qemu11, qemu10):
        path, spec, _, _ = streams(qemu, "tcg")
        with Machine(spec, incoming=path) as m:
            assert m.status() == "running"
        synthetic = add_cpu_apx(path, tmp_path / f"{len(os.listdir(tmp_path))}.mig")
        if qemu == qemu11:
            with Machine(spec, incoming=synthetic) as m:
                assert m.status() == "running"
            continue
        with pytest.raises(QemuError) as err:
            Machine(spec, incoming=synthetic).close()
        assert "error while loading state for instance 0x0 of device 'cpu'" in str(err.value)
        assert "\n" not in str(err.value)
    assert set(our_temp_dirs()) - before == set()


# --- why APX does not run: the missing piece, per QEMU and accelerator -------------------------

TCG_REFUSES = "warning: TCG doesn't support requested feature: CPUID[eax=07h,ecx=01h].EDX.apxf [bit 21]"
HOST_REFUSES = "warning: host doesn't support requested feature: CPUID[eax=07h,ecx=01h].EDX.apxf [bit 21]"
MPX_CONFLICT = ("warning: this feature conflicts with APX: CPUID[eax=07h,ecx=00h].EBX.mpx [bit 14]",
                "warning: this feature conflicts with MPX: CPUID[eax=07h,ecx=01h].EDX.apxf [bit 21]")


def test_qemu_too_old_is_its_own_reason():
    """On an APX host (Diamond Rapids' KVM) QEMU 10 is the only missing piece."""
    why = apx_reason(ApxFacts("10.0.2", False, "kvm", _host("intel-diamond-rapids")))
    assert why == "QEMU 10.0.2 is too old for APX (`-cpu help` lists no apxf; QEMU >= 11 needed)"
    assert apx_reason(ApxFacts("11.1.3", True, "kvm", _host("intel-diamond-rapids"),
                               (ApxProbe("host,+apxf", True),))) is None


def test_host_kvm_lacking_apx_is_named_not_the_qemu_version():
    why = apx_reason(ApxFacts("11.1.3", True, "kvm", _host("amd-zen4"), (ApxProbe("host,+apxf", False, (HOST_REFUSES,)),),
                              host_cpu="AMD EPYC 9654", host_cpu_apx=False))
    assert why.startswith("host KVM lacks APX: KVM_GET_SUPPORTED_CPUID lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0); "
                          "KVM supported XCR0 0x2e7 lacks bit 19 (APX); the CPU (AMD EPYC 9654) lacks APX_F")
    assert HOST_REFUSES in why and "11.1" not in why and "too old" not in why
    # The same host with QEMU 10: both pieces, the host's first.
    both = apx_reason(ApxFacts("10.0.2", False, "kvm", _host("amd-zen4")))
    assert both.startswith("host KVM lacks APX: ") and both.endswith("QEMU >= 11 needed)")


def test_tcg_cannot_emulate_apx():
    why = apx_reason(ApxFacts("11.1.3", True, "tcg", None, (ApxProbe("max,+apxf", False, MPX_CONFLICT),
                                                            ApxProbe("max,-mpx,+apxf", False, (TCG_REFUSES,)))))
    assert why.startswith(f'TCG cannot emulate APX: -cpu max,-mpx,+apxf: "{TCG_REFUSES}"')
    assert "drops apxf because the model has MPX" in why  # the MPX part, as a side note
    assert apx_reason(ApxFacts("11.1.3", True, "tcg", None, (ApxProbe("max,+apxf", False, (TCG_REFUSES,)),))) \
        == f'TCG cannot emulate APX: -cpu max,+apxf: "{TCG_REFUSES}"'


def test_mpx_conflict_is_its_own_reason():
    """A CPU model with MPX loses apxf (APX reuses MPX's XSAVE area) while the model
    without MPX has it: the conflict is what is missing (a KVM host offering both)."""
    why = apx_reason(ApxFacts("11.1.3", True, "kvm", _host("intel-diamond-rapids"),
                              (ApxProbe("host,+apxf", False, MPX_CONFLICT), ApxProbe("host,-mpx,+apxf", True))))
    assert why.startswith("MPX conflict: -cpu host,+apxf: QEMU drops apxf because the model has MPX")
    assert why.endswith("; -cpu host,-mpx,+apxf has APX")
    assert "TCG" not in why and "host KVM lacks" not in why


def test_apx_reasons_of_the_qemus_here(qemu10, qemu11):
    """Measured on this host (no APX in its KVM): QEMU 11 under KVM names the host, under
    TCG names TCG; QEMU 10 is also too old."""
    reasons = {}
    for qemu in (qemu10, qemu11):
        for accel in ("tcg", "kvm"):
            if accel == "kvm" and KVM is not None:
                continue
            host = QemuHost(accel, qemu)
            try:
                if accel == "kvm" and host.kvm_host.apx_cpu and host.kvm_host.supported_xcr0 >> 19 & 1:
                    pytest.skip("this host's KVM offers APX")
                reasons[(qemu, accel)] = host.apx_unavailable()
            finally:
                host.close()
    assert reasons[(qemu11, "tcg")].startswith("TCG cannot emulate APX: -cpu max,-mpx,+apxf: ")
    assert "too old" in reasons[(qemu10, "tcg")]
    if KVM is None:
        why11 = reasons[(qemu11, "kvm")]
        assert why11.startswith("host KVM lacks APX: ") and "too old" not in why11 and "11.1" not in why11
        assert "host doesn't support requested feature" in why11
        assert reasons[(qemu10, "kvm")].startswith("host KVM lacks APX: ") and "too old" in reasons[(qemu10, "kvm")]


def test_recorded_host_through_the_qemu_backend(qemu10, qemu11):
    """The backend asks KVM through its KvmHost: a recorded APX host (Diamond Rapids) makes
    QEMU 10's only piece its age, and QEMU 11 lacks nothing QEMU-side; a recorded Zen 4
    lacks APX whatever the QEMU."""
    if KVM is not None:
        pytest.skip(f"QemuHost('kvm') needs /dev/kvm: {KVM}")
    for qemu, name, want in ((qemu10, "intel-diamond-rapids", "QEMU 10"), (qemu11, "amd-zen4", "host KVM lacks APX: "),
                             (qemu10, "amd-zen4", "host KVM lacks APX: ")):
        host = QemuHost("kvm", qemu, kvm_host=_host(name))
        try:
            why = host.apx_unavailable()
            assert why.startswith(want), (qemu, name, why)
            assert ("too old" in why) == (qemu == qemu10)
        finally:
            host.close()
    host = QemuHost("kvm", qemu11, kvm_host=_host("intel-diamond-rapids"))
    try:
        assert host.apx_unavailable() is None
    finally:
        host.close()


# --- the plugin: both QEMUs in one run ---------------------------------------------------------

# The inner sessions leave out labgrid's pytest plugin when it is installed: it refuses to
# start twice in one process (its StepLogger), which has nothing to do with these tests.
INNER = ("-p", "no:labgrid")


def _ids(result) -> list[str]:
    return [line.split("[", 1)[1].rstrip("]") for line in result.outlines if "test_scenario[" in line]


def test_ids_carry_the_version_only_with_several_qemus(suite, qemu10, qemu11):
    both = _ids(suite.runpytest(*INNER, "--collect-only", "-q", "--apx-backend", "qemu-kvm",
                                f"--apx-qemu={qemu10}", f"--apx-qemu={qemu11}"))
    assert both and all(re.match(r"qemu1[01]-kvm-", i) for i in both)
    assert len([i for i in both if i.startswith("qemu10-")]) == len([i for i in both if i.startswith("qemu11-")])
    one = _ids(suite.runpytest(*INNER, "--collect-only", "-q", "--apx-backend", "qemu-kvm", f"--apx-qemu={qemu11}"))
    assert one == [i.replace("qemu10-", "qemu-", 1) for i in both if i.startswith("qemu10-")]
    tcg = _ids(suite.runpytest(*INNER, "--collect-only", "-q", "--apx-backend", "qemu-tcg",
                               f"--apx-qemu={qemu10}", f"--apx-qemu={qemu11}"))
    assert {i.split("-")[0] for i in tcg} == {"qemu10", "qemu11"} and all("-tcg-" in i for i in tcg)


def test_a_broken_second_qemu_is_a_usage_error(suite, qemu10, tmp_path):
    result = suite.runpytest(*INNER, "--collect-only", "-q", f"--apx-qemu={qemu10}", f"--apx-qemu={tmp_path / 'nope'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --apx-qemu {tmp_path / 'nope'}: not an executable file (with several "
                                 f"QEMUs each must report its version: it names their case ids)"])


def test_one_run_on_both_qemus_reports_each(suite, qemu10, qemu11):
    """An APX case of each QEMU (skips, for their own reasons) and a passing xmm export of
    each: JUnit names both QEMUs, the summary has a row per QEMU."""
    keep = ["qemu10-tcg-xmm-export", "qemu11-tcg-xmm-export", "qemu10-tcg-apx-export", "qemu11-tcg-apx-export"]
    if KVM is None:
        keep += ["qemu11-kvm-apx-export"]
    result = suite.runpytest_inprocess(*INNER, "-m", "apx", f"--apx-qemu={qemu10}", f"--apx-qemu={qemu11}", "-rs",
                                       "-k", " or ".join(keep), "--junitxml=out.xml")
    result.assert_outcomes(passed=2, skipped=len(keep) - 2)
    text = result.stdout.str()
    assert re.search(r"qemu11-tcg-apx-export: TCG cannot emulate APX", text)
    if KVM is None:
        line = next(ln for ln in result.outlines if "qemu11-kvm-apx-export:" in ln)
        assert "host KVM lacks APX" in line and "too old" not in line and "11.1" not in line
    rows = [re.search(r"qemu1[01]-tcg", ln).group(0) for ln in result.outlines
            if re.match(r"^(xmm|apx)?\s+qemu1[01]-tcg ", ln)]
    assert rows == ["qemu10-tcg", "qemu11-tcg"] * 2  # apx rows, then xmm rows: one per QEMU
    root = ET.parse(suite.path / "out.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in root.find("properties")}
    v10, v11 = qb.qemu_version(qemu10)[0], qb.qemu_version(qemu11)[0]
    assert props["apx.qemu"] == f"{v10},{v11}"
    assert props["apx.qemu10"] == f"{v10} {qemu10}" and props["apx.qemu11"] == f"{v11} {qemu11}"
    assert props["apx.qemu11.apx.tcg"].startswith("TCG cannot emulate APX")
    backends = {}
    for case in root.findall("testcase"):
        found = case.find("properties")
        if found is not None:
            p = {x.get("name"): x.get("value") for x in found}
            backends[p.get("apx.case")] = p.get("apx.backend")
    assert backends["qemu11-tcg-xmm-export"] == "qemu11-tcg" and backends["qemu10-tcg-xmm-export"] == "qemu10-tcg"


def test_runner_picks_the_qemu_of_the_id(qemu10, qemu11):
    """The remote agent and avocado run cases through CaseRunner: an id's tag picks its QEMU."""
    with CaseRunner(qemu=[qemu10, qemu11]) as runner:
        for tag, qemu in (("10", qemu10), ("11", qemu11), ("", qemu10)):
            backend, error = runner.backend("qemu-tcg", tag)
            assert error is None and backend.host.qemu == qemu
        assert runner.run("qemu11-tcg-xmm-export").outcome == "pass"
        result = runner.run("qemu12-tcg-xmm-export")
        assert result.outcome == "skip"
        assert result.message.startswith("qemu12-tcg-xmm-export: qemu12-tcg backend unavailable: no QEMU 12 among")


# --- ci/bootstrap: the side QEMU ----------------------------------------------------------------

def _bash(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source ci/bootstrap; {script}"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_bootstrap_writes_the_qemu11_wrapper_from_the_debian13_rootfs(tmp_path):
    """ensure_side_qemu on Debian 12, in a cache of its own that holds (a link to) this
    machine's Debian 13 rootfs: the wrapper runs QEMU 11 on the host, a second run leaves
    it alone, APX_SKIP_SIDE_QEMU=1 skips it, and a rootfs being rebuilt (ci/in-debian13's
    exclusive lock) stops it with one line."""
    rootfs = Path(os.environ.get("APX_DEBIAN13_CACHE") or "/var/cache/apx_tests") / "debian13-rootfs"
    if not (rootfs / "usr/bin/qemu-system-x86_64").exists():
        pytest.skip(f"no QEMU in the Debian 13 rootfs {rootfs} (ci/in-debian13 + ci/bootstrap make it)")
    (tmp_path / "debian13-rootfs").symlink_to(rootfs)
    (tmp_path / "debian13.lock").touch()
    env = {"APX_DEBIAN13_CACHE": str(tmp_path)}
    first = _bash("CODENAME=bookworm; ensure_side_qemu " + str(REPO), **env)
    assert first.returncode == 0, first.stderr
    wrapper = tmp_path / "qemu11" / "bin" / "qemu-system-x86_64"
    (line,) = first.stdout.splitlines()
    assert re.fullmatch(rf"bootstrap: side QEMU ready: QEMU 11\.\d+\.\d+ and GNU gdb .* 16\.\d+ from "
                        rf"{re.escape(str(tmp_path / 'debian13-rootfs'))} \({re.escape(str(wrapper.parent))}\)", line), line
    assert qb.qemu_version(str(wrapper))[0].startswith("11.")
    assert (tmp_path / "qemu11" / "share" / "qemu" / "qboot.rom").is_file()
    again = _bash("CODENAME=bookworm; ensure_side_qemu " + str(REPO), **env)
    assert again.stdout.startswith("bootstrap: side QEMU present: QEMU 11.") and again.returncode == 0
    skipped = _bash("CODENAME=bookworm; ensure_side_qemu " + str(REPO), APX_SKIP_SIDE_QEMU="1", **env)
    assert skipped.stdout == "bootstrap: skipping the side-by-side QEMU (APX_SKIP_SIDE_QEMU=1)\n"
    holder = subprocess.Popen(["flock", "-x", str(tmp_path / "debian13.lock"), "sleep", "60"])
    try:
        for _ in range(100):  # until the holder has the lock (it is a separate process)
            if subprocess.run(["flock", "-n", "-s", str(tmp_path / "debian13.lock"), "true"]).returncode:
                break
            subprocess.run(["sleep", "0.05"])
        proc = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{wrapper}: error: the Debian 13 rootfs {tmp_path / 'debian13-rootfs'} is being rebuilt (ci/in-debian13 "
        f"holds {tmp_path / 'debian13.lock'}); run again when it is done"]
