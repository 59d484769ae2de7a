"""The QEMU backend (apx_tests.qemu.backend) with real QEMU and real guests, under TCG
and, where /dev/kvm works, KVM: availability reasons, the partial gdb/HMP views, the
detection self-test on a migration stream, what TCG does with XSTATE_BV, timings and
leaks.  The scenario cases themselves run through the plugin:
`pytest -m apx --apx-backend qemu` (ids `qemu-tcg-ymm-export`)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from apx_tests import procfs
from apx_tests.backend import BackendError
from apx_tests.cases import cases
from apx_tests.probe import BANK_ORDER
from apx_tests.guests.build import build_payload
from apx_tests.qemu import machine as qm
from apx_tests.qemu.backend import QemuBackend, QemuSession
from apx_tests.qemu.errors import QemuUnavailable
from apx_tests.qemu.host import kept_gdb_pids
from apx_tests.qemu.spec import kvm_usable, our_temp_dirs
from apx_tests.qemu.migration.stream import MigrationStream
from apx_tests.scenarios import SCENARIOS, Run, ScenarioFailure, ScenarioNotApplicable
from apx_tests.scenarios.engine import LOADED, load_bank
from apx_tests.xsave import BANKS, diff_registers

SYSTEM_QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(kvm_usable() is not None,
                                                               reason=f"KVM: {kvm_usable()}"))]
# Every stand-in bank; a test on a bank this host's QEMU cannot run skips with the
# backend's own reason (backend.unavailable_reason: the guest's XCR0 under this
# accelerator), so an AVX-512 host exercises zmm/opmask too and this one says why not.
STAND_INS = [bank for bank in BANK_ORDER if bank != "apx"]


@pytest.fixture(scope="module", params=ACCELS)
def backend(request):
    try:
        b = QemuBackend(request.param)
    except QemuUnavailable as exc:
        pytest.skip(str(exc))
    yield b
    b.host.close()


def _runnable(backend, bank_name):
    bank = BANKS[bank_name]
    reason = backend.unavailable_reason(bank)
    if reason:
        pytest.skip(f"{backend.name} {bank_name}: {reason}")
    return bank, build_payload(bank_name).code


def _children(names=("qemu-system-x86", "gdb")) -> list[str]:
    """Our QEMU and gdb children, but the gdbs live hosts keep between views on purpose
    (the module's backend fixture keeps one; test_gdb_is_kept_between_views checks them)."""
    kept = kept_gdb_pids()
    return [f"{p.pid} {p.comm}" for p in procfs.children() if p.comm in names and p.pid not in kept]


# --- availability -------------------------------------------------------------------------

def test_missing_qemu_is_one_line():
    with pytest.raises(QemuUnavailable) as err:
        QemuBackend("tcg", qemu="/nonexistent/qemu-system-x86_64")
    assert str(err.value) == "/nonexistent/qemu-system-x86_64: not an executable file"


def test_reasons(backend):
    apx = backend.unavailable_reason(BANKS["apx"])
    # The missing piece by name (tests/test_qemu11.py has each one): TCG, an old QEMU, the host's KVM.
    if backend.accel == "tcg":
        assert apx.startswith("TCG cannot emulate APX: ") if backend.host.apxf else \
            apx == (f"QEMU {backend.host.version_text} is too old for APX (`-cpu help` lists no apxf; QEMU >= 11 "
                    f"needed); QEMU's TCG does not emulate APX either")
    else:
        kvm = backend.host.kvm_host
        if not (kvm.apx_cpu and kvm.supported_xcr0 >> 19 & 1):
            assert apx.startswith("host KVM lacks APX: ")
        assert ("is too old for APX" in apx) == (not backend.host.apxf)
    guest = backend.host.guest.xcr0
    for name in ("hi16_zmm", "zmm_hi256", "opmask", "ymm", "xmm", "x87"):
        reason = backend.unavailable_reason(BANKS[name])
        missing = BANKS[name].xcr0_mask & ~guest
        assert (reason is None) == (missing == 0), (name, reason)
        if reason:
            assert f"lacks {missing:#x}" in reason and "\n" not in reason
    assert backend.layout.supported_xcr0 & guest == guest


def test_layout_is_the_guests_cpuid(backend):
    """The export layout is CPUID leaf 0xD as the guest sees it; under KVM it agrees with
    what KVM_GET_SUPPORTED_CPUID says for every component the guest enabled."""
    layout = backend.layout
    assert layout.component(2).offset == 576  # AVX, every x86 CPU with AVX
    if backend.accel == "kvm":
        kvm = backend.host.kvm_host.layout
        for n in range(2, 20):
            if backend.host.guest.xcr0 >> n & 1:
                assert layout.component(n) == kvm.component(n)


# --- the partial views --------------------------------------------------------------------

@pytest.mark.parametrize("bank_name", STAND_INS)
def test_gdb_and_hmp_views_agree_with_the_migration_export(backend, bank_name):
    bank, code = _runnable(backend, bank_name)
    with Run(backend, bank, code) as run:
        session = run.start()
        session.run_to(0)
        load_bank(run, session, run.pattern(LOADED))
        image = session.export()
        views = {name: view() for name, view in session.views().items()}
        # Stopped since the export's save (the gdb detach resumed it, the backend stopped it
        # again): the guest waits for its release, which resumes it.
        assert session.machine.status() != "running"
        session.run_to(LOADED + 1)  # released, resumed: the guest reached its next stage
    # what each observer can see on QEMU 10 (docs/qemu.md)
    expect_names = {
        "xmm": {"gdb": [f"xmm{i}" for i in range(16)], "hmp": [f"xmm{i}" for i in range(16)]},
        "ymm": {"gdb": [f"xmm{i}" for i in range(16)],
                "hmp": [f"ymm{i}" for i in range(16)] + [f"xmm{i}" for i in range(16)]},
        "x87": {"gdb": [f"st{i}" for i in range(8)], "hmp": [f"st{i}" for i in range(8)]},
        # AVX-512 (XCR0 0xe7): HMP prints ZMM00-31 and Opmask00-07; the gdbstub offers none of them
        "hi16_zmm": {"gdb": [], "hmp": [f"zmm{i}" for i in range(16, 32)]},
        "zmm_hi256": {"gdb": [f"xmm{i}" for i in range(16)],
                      "hmp": [f"{w}mm{i}" for w in "zyx" for i in range(16)]},
        "opmask": {"gdb": [], "hmp": [f"k{i}" for i in range(8)]},
        "pkru": {"gdb": [], "hmp": []},  # neither shows PKRU
    }[bank_name]
    for name, regs in views.items():
        assert sorted(regs) == sorted(expect_names[name]), name
        assert diff_registers({n: image.read(n) for n in regs}, regs) == [], name
    loaded = run.pattern(LOADED)
    assert all(views["hmp"][n] == loaded[n] for n in bank.names if n in views["hmp"])


# --- detection self-tests ---------------------------------------------------------------

def test_a_flipped_ymm_byte_in_the_saved_stream_is_reported(backend, monkeypatch):
    """Flip one byte of ymm5's upper half inside the snapshot's migration file: the
    fresh_vm scenario must name ymm5 and the byte."""
    bank, code = _runnable(backend, "ymm")
    register, byte = "ymm5", 20
    original = QemuSession.snapshot
    flipped = {}

    def tampered_snapshot(self):
        snap = original(self)
        stream = MigrationStream.open(snap.path)
        value = bytearray(stream.cpu_state(0).register(register))
        value[byte] ^= 0x5A
        edits = stream.register_edits(register, bytes(value), mark_xstate=False)
        before = open(snap.path, "rb").read()
        with open(snap.path, "r+b") as fh:
            for leaf, raw in edits.items():
                fh.seek(leaf.offset)
                fh.write(raw)
        after = open(snap.path, "rb").read()
        flipped["bytes"] = sum(a != b for a, b in zip(before, after))
        return snap

    monkeypatch.setattr(QemuSession, "snapshot", tampered_snapshot)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["fresh_vm"].run(run)
    assert flipped["bytes"] == 1
    assert failure.value.lines[0].startswith(f"fresh VM export: avx {register} byte {byte}: want ")


def test_import_tamper_is_reported_by_the_guest(backend):
    bank, code = _runnable(backend, "ymm")

    def tamper(image):
        value = bytearray(image.read("ymm13"))
        value[21] ^= 0x5A
        image.write("ymm13", bytes(value))

    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code, tamper=tamper) as run:
            SCENARIOS["import"].run(run)
    assert failure.value.lines[0] == "after import: guest verify failed at ymm ymm13 byte 21"


@pytest.mark.parametrize("bank_name", STAND_INS)
def test_xstate_bv_init_rule(backend, bank_name):
    """Found out for real: an import with the bank's XSTATE_BV bits clear and garbage in
    its registers.  KVM loads the init state (KVM_SET_XSAVE honours XSTATE_BV); TCG
    keeps QEMU's register copies and the guest sees the garbage.  Hence the scenario
    feature "xstate_bv_init", which qemu-tcg lacks."""
    bank, code = _runnable(backend, bank_name)
    with Run(backend, bank, code) as run:
        if backend.accel == "kvm":
            assert "xstate_bv_init" in backend.features
            SCENARIOS["init_state"].run(run)
            return
        assert "xstate_bv_init" not in backend.features
        with pytest.raises(ScenarioFailure) as failure:
            SCENARIOS["init_state"].run(run)
    first = bank.registers[0].name
    assert failure.value.lines[0] == f"after init-state import: guest verify failed at {bank_name} {first} byte 0"
    garbage = run.pattern(3)[first]
    assert garbage[:10].hex() in failure.value.lines[1]


# --- errors, timings, leaks ----------------------------------------------------------------

def test_hang_is_one_line_and_nothing_remains(backend):
    bank = BANKS["xmm"]
    backend.host.timeout, saved = 0.5, backend.host.timeout
    try:
        session = backend.start(bank, b"\xf3\x90\xeb\xfc")  # pause; jmp: never syncs
        pid = session.machine.pid
        with pytest.raises(BackendError) as err:
            session.run_to(0)
        session.close()
    finally:
        backend.host.timeout = saved
    assert str(err.value) == (f"{backend.name} xmm: no '0' on debugcon within 0.5 s; debugcon 'blu' "
                              f"(waiting for stage 0, last stage none)")
    assert not procfs.alive(pid)  # gone, or a zombie


def test_phases_of_one_scenario(backend, capsys):
    """boot -> snapshot -> restore -> verdict for fresh_vm; the numbers go to the log."""
    bank, code = _runnable(backend, "ymm")
    with Run(backend, bank, code) as run:  # warm caches (images, imports)
        SCENARIOS["fresh_vm"].run(run)
    backend.host.clock.reset()
    started = time.perf_counter()
    with Run(backend, bank, code) as run:
        SCENARIOS["fresh_vm"].run(run)
    total = time.perf_counter() - started
    phases = backend.host.clock.phases
    with capsys.disabled():
        print(f"\n{backend.name} ymm fresh_vm {total * 1000:.0f} ms: "
              + ", ".join(f"{k} {v * 1000:.0f} ms/{backend.host.clock.counts[k]}" for k, v in phases.items()))
    assert {"boot", "save", "parse", "restore", "guest", "finish"} <= set(phases)


def test_no_process_or_directory_is_left_behind(backend):
    """A run of QEMU scenarios (and the gdb/HMP views) with a backend of its own, closed
    at the end as the plugin closes its backends: no QEMU or gdb child and no private
    directory of ours remains.  Between runs the host keeps at most one gdb, detached
    (QemuHost.gdb_session); it goes with the host.  Snapshot files live until their
    snapshot object goes or the backend closes."""

    before = set(our_temp_dirs())
    own = QemuBackend(backend.accel)
    try:
        for name in STAND_INS:
            if own.unavailable_reason(BANKS[name]):
                continue
            code = build_payload(name).code
            for scenario in ("export", "import", "fresh_vm"):
                with Run(own, BANKS[name], code) as run:
                    SCENARIOS[scenario].run(run)
                assert qm.live_machines() == [] and _children() == []
            with Run(own, BANKS[name], code) as run:
                s = run.start()
                s.run_to(0)
                s.gdb_view()
                s.hmp_view()
                s.snapshot()
            assert qm.live_machines() == [] and _children() == []
            assert own.host._spare_gdb is not None and own.host._spare_gdb.pid in kept_gdb_pids()
    finally:
        own.host.close()
    assert _children() == [] and own.host._spare_gdb is None
    assert set(our_temp_dirs()) - before == set()


def test_gdb_is_kept_between_views_and_retargeted(backend):
    """One gdb serves the views of successive QEMUs of a host (a new gdb costs ~0.3 s):
    the second view attaches the same gdb process to the second QEMU and reads that
    guest's registers, not the first's.  A gdb whose view failed is not kept, and the
    host's close() ends the kept one."""
    from apx_tests.qemu import gdb as gdbmod

    own = QemuBackend(backend.accel)
    bank = BANKS["xmm"]
    try:
        seen = []
        for load in (True, False):
            with Run(own, bank, build_payload("xmm").code) as run:
                s = run.start()
                s.run_to(0)
                if load:  # guest 1 holds pattern(LOADED); guest 2 never loads it
                    load_bank(run, s, run.pattern(LOADED))
                view = s.gdb_view(["xmm5"])
                seen.append((own.host._spare_gdb.pid, s.machine.pid, view["xmm5"]))
        (gdb1, qemu1, xmm5_1), (gdb2, qemu2, xmm5_2) = seen
        assert gdb1 == gdb2 and qemu1 != qemu2 and gdb1 in kept_gdb_pids()
        assert xmm5_1 == bank.pattern(LOADED)["xmm5"] != xmm5_2
        # A view whose gdb dies is an error, and that gdb is not kept.
        with Run(own, bank, build_payload("xmm").code) as run:
            s = run.start()
            s.run_to(0)
            original = gdbmod.GdbSession.register_names

            def dying(self):
                self._kill()
                return original(self)
            gdbmod.GdbSession.register_names = dying
            try:
                with pytest.raises(BackendError):
                    s.gdb_view(["xmm5"])
            finally:
                gdbmod.GdbSession.register_names = original
            assert own.host._spare_gdb is None and gdb1 not in kept_gdb_pids()
            s.gdb_view(["xmm5"])  # a new gdb, kept again
            kept = own.host._spare_gdb.pid
            assert kept != gdb1
    finally:
        own.host.close()
    assert own.host._spare_gdb is None and not procfs.alive(kept)


def test_host_close_removes_everything():
    before = set(our_temp_dirs())
    b = QemuBackend("tcg")
    bank, code = BANKS["xmm"], build_payload("xmm").code
    s = b.start(bank, code)
    s.run_to(0)
    snap = s.snapshot()
    assert os.path.exists(snap.path)
    b.host.close()
    assert not s.machine.running and not os.path.exists(snap.path)
    assert _children() == [] and set(our_temp_dirs()) <= before


# --- the plugin ---------------------------------------------------------------------------

# `suite`: the pytester tree with the scenario suite (tests/conftest.py).


def test_plugin_ids(suite):
    # One QEMU: plain ids (several side by side carry the version: tests/test_qemu11.py).
    result = suite.runpytest("--collect-only", "-q", "--apx-backend", "qemu", f"--apx-qemu={SYSTEM_QEMU}")
    ids = {line.split("[", 1)[1].rstrip("]") for line in result.outlines if "test_scenario[" in line}
    assert "qemu-tcg-ymm-export" in ids and "qemu-kvm-ymm-init_state" in ids
    assert "qemu-tcg-ymm-init_state" not in ids  # TCG lacks "xstate_bv_init"
    assert not any(i.startswith("kvm-") for i in ids)
    assert not any(i.endswith(("-negative", "-xcr0_cycle")) for i in ids)


def test_plugin_runs_a_case_and_skips_without_qemu(suite):
    suite.runpytest_inprocess("-m", "apx", "--apx-backend", "qemu", "-k", "qemu-tcg-xmm-export",
                              f"--apx-qemu={SYSTEM_QEMU}", "-q").assert_outcomes(passed=1)
    result = suite.runpytest_inprocess("-m", "apx", "--apx-backend", "qemu", "-k", "qemu-tcg-xmm",
                                       "--apx-qemu=/nonexistent/qemu", "-q", "-rs")
    xmm_cases = [c for c in cases(("qemu-tcg",)) if c.bank == "xmm"]
    result.assert_outcomes(skipped=len(xmm_cases))
    result.stdout.fnmatch_lines(["*qemu-tcg-xmm-export: qemu-tcg backend unavailable: "
                                 "/nonexistent/qemu: not an executable file"])


# --- the export scenario uses every observer: whole images and partial views -------------

# What each partial observer reaches, in bytes, written out by hand: xmm0-15 are 16 x 16 B
# of component 1; ymm's own bytes are 16 x 16 B upper halves in component 2; st0-7 are
# 8 x 10 B of component 0.  QEMU's gdbstub has xmm but no ymm: for ymm it reaches none
# of component 2 and is not judged; HMP prints whole ymm registers.
VIEW_NOTES = {
    "xmm": {"gdb": "gdb: reaches 256/256 bytes of component 1 (sse)",
            "hmp": "hmp: reaches 256/256 bytes of component 1 (sse)"},
    "ymm": {"gdb": "gdb: not checked, reaches 0/256 bytes of component 2 (avx), 256/256 bytes of "
                   "component 1 (sse); offers xmm0-15 (16 B each)",
            "hmp": "hmp: reaches 256/256 bytes of component 2 (avx), 256/256 bytes of component 1 (sse)"},
    "x87": {"gdb": "gdb: reaches 80/80 bytes of component 0 (x87)",
            "hmp": "hmp: reaches 80/80 bytes of component 0 (x87)"},
    # zmm16-31: 16 x 64 B of component 7; zmm0-15's own bytes: 16 x 32 B upper halves in
    # component 6 (the rest are ymm's and xmm's); k0-7: 8 x 8 B of component 5.
    "hi16_zmm": {"gdb": "gdb: not checked, reaches 0/1024 bytes of component 7 (hi16_zmm); "
                        "offers no register of this bank",
                 "hmp": "hmp: reaches 1024/1024 bytes of component 7 (hi16_zmm)"},
    "zmm_hi256": {"gdb": "gdb: not checked, reaches 0/512 bytes of component 6 (zmm_hi256), 256/256 bytes of "
                         "component 1 (sse), 0/256 bytes of component 2 (avx); offers xmm0-15 (16 B each)",
                  "hmp": "hmp: reaches 512/512 bytes of component 6 (zmm_hi256), 256/256 bytes of "
                         "component 1 (sse), 256/256 bytes of component 2 (avx)"},
    "opmask": {"gdb": "gdb: not checked, reaches 0/64 bytes of component 5 (opmask); "
                      "offers no register of this bank",
               "hmp": "hmp: reaches 64/64 bytes of component 5 (opmask)"},
    # PKRU (component 9, 4 bytes): neither the gdbstub nor HMP `info registers` shows it.
    "pkru": {"gdb": "gdb: not checked, reaches 0/4 bytes of component 9 (pkru); offers no register of this bank",
             "hmp": "hmp: not checked, reaches 0/4 bytes of component 9 (pkru); offers no register of this bank"},
}


@pytest.mark.parametrize("bank_name", STAND_INS)
def test_export_compares_gdb_and_hmp_views(backend, bank_name):
    bank, code = _runnable(backend, bank_name)
    with Run(backend, bank, code) as run:
        SCENARIOS["export"].run(run)
    notes = {note.split(":")[0]: note for note in run.notes}
    assert notes == VIEW_NOTES[bank_name], run.notes


@pytest.mark.parametrize("view_name,bank_name", [("gdb", "xmm"), ("hmp", "ymm")])
def test_export_reports_a_view_that_disagrees(backend, view_name, bank_name, monkeypatch):
    """A partial observer that sees a wrong byte must fail the scenario, naming the
    observer, the register and the byte (here: the view's xmm5/ymm5 byte 3 flipped)."""
    bank, code = _runnable(backend, bank_name)
    real_views = QemuSession.views

    def corrupted(self):
        views = real_views(self)
        honest = views[view_name]

        def lying():
            view = dict(honest())
            name = "ymm5" if "ymm5" in view else "xmm5"
            value = bytearray(view[name])
            value[3] ^= 0x20
            view[name] = bytes(value)
            return view
        views[view_name] = lying
        return views

    monkeypatch.setattr(QemuSession, "views", corrupted)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["export"].run(run)
    first = failure.value.lines[0]
    assert first.startswith(f"{view_name}: ") and "mm5 byte 3" in first, failure.value.lines
    assert any(line.startswith(f"{view_name} vs migration: ") for line in failure.value.lines)


# (partial view, bank, register, byte, component label): a byte of the bank's own component
# that the view shows (gdb reaches xmm and st, HMP ymm's upper halves).
DISAGREE = [("hmp", "ymm", "ymm5", 19, "avx"), ("gdb", "xmm", "xmm5", 3, "sse"), ("hmp", "x87", "st5", 3, "x87")]


@pytest.mark.parametrize("view_name,bank_name,register,byte,label", DISAGREE, ids=[d[1] for d in DISAGREE])
def test_export_reports_a_stream_the_views_disagree_with(backend, view_name, bank_name, register, byte, label,
                                                         monkeypatch):
    """Partial observers agreeing with the whole image: the migration file QEMU wrote at
    stage 1 gets one byte of the register flipped before it is parsed (the views stay
    honest).  Besides the stream's own wrong byte, the export scenario must report the
    view against the stream, naming register and byte, with the stream's value as `want`."""
    bank, code = _runnable(backend, bank_name)
    real_save = QemuSession._save
    flipped = []

    def save_and_flip(self):
        path = real_save(self)
        if self.stage == LOADED:
            stream = MigrationStream.open(path)
            value = bytearray(stream.cpu_state(0, accelerator=backend.accel).register(register))
            value[byte] ^= 0x5A
            with open(path, "r+b") as fh:
                for leaf, raw in stream.register_edits(register, bytes(value), mark_xstate=False).items():
                    fh.seek(leaf.offset)
                    fh.write(raw)
            flipped.append(path)
        return path

    monkeypatch.setattr(QemuSession, "_save", save_and_flip)
    truth = BANKS[bank_name].pattern(LOADED)[register][byte]
    lie = truth ^ 0x5A
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["export"].run(run)
    lines = failure.value.lines
    assert flipped, "the stream was never saved at stage 1"
    assert lines[0] == f"migration: {label} {register} byte {byte}: want 0x{truth:02x} got 0x{lie:02x}", lines
    assert f"{view_name} vs migration: {label} {register} byte {byte}: want 0x{lie:02x} got 0x{truth:02x}" \
        in lines, lines
    assert not any(line.startswith(f"{view_name}: ") for line in lines), "the view itself was honest"


@pytest.mark.parametrize("bank_name", ["xmm", "x87"])
def test_debugger_import_writes_reach_the_guest(backend, bank_name):
    bank, code = _runnable(backend, bank_name)
    with Run(backend, bank, code) as run:
        SCENARIOS["debugger_import"].run(run)
    assert run.notes == ["debugger wrote " + VIEW_NOTES[bank_name]["gdb"].split("reaches ", 1)[1]]


def test_debugger_import_that_reaches_none_of_the_bank_is_a_skip(backend):
    """QEMU's gdbstub offers xmm0-15 but no ymm: writing them edits component 1 only.  The
    case is not a pass ("16/16 registers") but a skip saying, in bytes, what the edit path
    reached and what the stub offered."""
    bank, code = _runnable(backend, "ymm")
    with pytest.raises(ScenarioNotApplicable) as skip:
        with Run(backend, bank, code) as run:
            SCENARIOS["debugger_import"].run(run)
    assert str(skip.value) == (
        "the debugger's edit path reaches 0/256 bytes of component 2 (avx), 256/256 bytes of "
        "component 1 (sse): none of ymm's own component; it offers xmm0-15 (16 B each) "
        "(gdbstub features org.gnu.gdb.i386.core)")


def test_debugger_import_catches_a_dropped_write(backend, monkeypatch):
    """A gdbstub that acknowledges a write but drops it: the guest still holds pattern 1,
    and the scenario names the register whose write was lost."""
    bank, code = _runnable(backend, "xmm")
    real = QemuSession.debugger_write

    def drop_xmm6(self, values):
        kept = {n: v for n, v in values.items() if n != "xmm6"}
        written = real(self, kept)
        written["xmm6"] = values["xmm6"]  # claimed, never sent
        return written

    monkeypatch.setattr(QemuSession, "debugger_write", drop_xmm6)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["debugger_import"].run(run)
    assert "xmm xmm6 byte 0" in failure.value.lines[0], failure.value.lines


def test_gprs_scenario_uses_three_observers(backend):
    bank, code = _runnable(backend, "xmm")
    with Run(backend, bank, code) as run:
        SCENARIOS["gprs"].run(run)
    note = run.notes[0]
    for observer in ("migration", "gdb", "hmp"):
        assert f"{observer} (" in note, note


def test_gprs_scenario_names_the_observer_that_disagrees(backend, monkeypatch):
    bank, code = _runnable(backend, "xmm")
    real = QemuSession.gpr_views

    def skewed(self):
        views = real(self)
        honest = views["hmp"]
        views["hmp"] = lambda: {**honest(), "rbx": (0x1234).to_bytes(8, "little")}
        return views

    monkeypatch.setattr(QemuSession, "gpr_views", skewed)
    with pytest.raises(ScenarioFailure) as failure:
        with Run(backend, bank, code) as run:
            SCENARIOS["gprs"].run(run)
    assert failure.value.lines[0].startswith("hmp vs migration: rbx: 0000000000001234 vs ")


def test_a_restore_continues_in_the_standby_and_none_outlives_the_run(backend):
    """Session.expect_restore (the scenarios that import or restore call it after the boot)
    starts the restore's QEMU (-incoming defer), not waited for: the snapshot takes it, the restore continues in that very process (the stream loaded
    through migrate-incoming) and the guest runs on there; a standby nobody
    restored into goes with the session or, held by a snapshot, with the Run."""
    bank, code = BANKS["xmm"], build_payload("xmm").code
    with Run(backend, bank, code) as run:
        session = run.start()
        assert session._standby is None  # only on the scenario's word
        session.expect_restore()
        standby = session._standby
        assert standby is not None and standby.running and standby.pid != session.machine.pid
        assert "-incoming" in standby.argv and standby.argv[standby.argv.index("-incoming") + 1] == "defer"
        session.run_to(0)
        snap = session.snapshot()
        assert session._standby is None and snap.standby == [standby]
        session.close()
        assert standby.running  # the session went, its snapshot keeps the standby
        restored = run.adopt(session.restore(snap))
        assert restored.machine is standby and standby.incoming == snap.path and snap.standby == []
        restored.run_to(1)  # the guest continues in the standby process
        assert restored.machine.pid == standby.pid
        again = run.adopt(session.restore(snap))  # no standby left: a QEMU with -incoming file:
        assert again.machine.pid not in (standby.pid, None) and again.machine.incoming == snap.path
        again.run_to(1)
        plain = run.start()  # no hint: no standby; its import starts its QEMU then
        plain.run_to(0)
        plain.import_image(plain.export())
        assert plain._standby is None and plain.machine.incoming is not None
        plain.run_to(1)
    assert qm.live_machines() == [] and _children() == []
    with Run(backend, bank, code) as run:
        session = run.start()
        session.expect_restore()
        session.run_to(0)
        kept = session.snapshot()  # held past the Run: its file stays, its standby does not
        assert kept.standby and kept.standby[0].running
    assert qm.live_machines() == [] and _children() == [] and os.path.exists(kept.path)
    with Run(backend, bank, code) as run:
        session = run.start()
        session.expect_restore()
        standby = session._standby
    assert not standby.running and qm.live_machines() == [] and _children() == []


def test_a_spare_boot_is_fresh_and_none_outlives_idle(backend):
    """QemuHost.spare_boots: each boot spawns the next one's QEMU (-S: paused before the
    guest's first instruction); the next boot of the same guest continues in that very
    process, which holds none of the previous guest's RAM; a boot of another guest closes
    it unused; idle() and close() end the one kept."""
    bank, code = BANKS["xmm"], build_payload("xmm").code
    host = backend.host
    host.spare_boots = True
    try:
        with Run(backend, bank, code) as run:
            first = run.start()
            spare = host._spare_boot[1]
            assert spare.running and spare.pid not in (None, first.machine.pid) and "-S" in spare.argv
            fresh = first.read_area(0, 64)
            first.write_area(0, b"\xa5" * 64)  # the first guest's RAM changes ...
            first.run_to(0)
            second = run.start()
            assert second.machine is spare
            assert second.read_area(0, 64) == fresh  # ... and none of it is in the spare's
            assert host._spare_boot[1].pid not in (first.machine.pid, spare.pid)
        with Run(backend, bank, code) as run:
            SCENARIOS["export"].run(run)  # a whole scenario, booted in a spare: it passes
        xmm_spare = host._spare_boot[1]
        with Run(backend, BANKS["x87"], build_payload("x87").code) as run:
            run.start().run_to(0)  # another guest: the xmm spare is closed unused
            assert not xmm_spare.running and host._spare_boot[1] is not xmm_spare
        assert host._spare_boot[1].running  # the Run's end does not end it ...
        backend.idle()  # ... the backend going idle does
        assert host._spare_boot is None and qm.live_machines() == [] and _children() == []
        with Run(backend, bank, code) as run:  # a spare killed from outside: a fresh QEMU boots instead
            run.start()
            dead = host._spare_boot[1]
            dead.proc.kill()
            dead.proc.wait()
            session = run.start()
            assert session.machine is not dead and session.machine.running and not dead.running
            session.run_to(0)
        backend.idle()
        own = QemuBackend(backend.accel)  # host.close() ends it too (not the module's host)
        own.host.spare_boots = True
        with Run(own, bank, code) as run:
            run.start()
        assert own.host._spare_boot[1].running
        own.host.close()
        assert own.host._spare_boot is None and qm.live_machines() == [] and _children() == []
    finally:
        host.spare_boots = False
        host.drop_spare_boot()


def test_a_spare_that_cannot_start_does_not_fail_the_boot(backend, monkeypatch):
    """Spawning the spare is only a head start: when it fails (here: the spawn raises as a
    full /dev/shm would), the boot it followed still runs its guest, and nothing is kept."""
    from apx_tests.qemu import host as host_mod

    real = host_mod.Machine

    def spawn(*args, connect=True, **kw):
        if not connect:
            raise QemuUnavailable("spare: cannot create its private directory: No space left on device")
        return real(*args, connect=connect, **kw)

    monkeypatch.setattr(host_mod, "Machine", spawn)
    bank, code = BANKS["xmm"], build_payload("xmm").code
    backend.host.spare_boots = True
    try:
        with Run(backend, bank, code) as run:
            session = run.start()
            assert backend.host._spare_boot is None and session.machine.running
            session.run_to(0)
    finally:
        backend.host.spare_boots = False
    assert qm.live_machines() == [] and _children() == []


SPARE_RECORDER = """
import json, os
import pytest
from apx_tests import procfs

SEEN = []

@pytest.hookimpl(trylast=True)  # after the plugin's teardown hook
def pytest_runtest_teardown(item, nextitem):
    qemus = sorted(p.pid for p in procfs.children() if p.comm == "qemu-system-x86")
    SEEN.append([item.name, nextitem.name if nextitem else None, qemus])

def pytest_sessionfinish(session):
    with open(os.path.join(str(session.config.rootpath), "seen.json"), "w") as fh:
        json.dump(SEEN, fh)
"""


def test_plugin_keeps_a_spare_boot_within_a_backend_and_drops_it_after(suite):
    """The plugin's case runner keeps the next boot's QEMU warm between two cases of one
    backend and ends it after the backend's last case, so no spare outlives its cases."""
    suite.makeconftest(SPARE_RECORDER)
    suite.makepyfile(test_zz_after="def test_after():\n    pass\n")
    suite.runpytest_inprocess("-m", "apx or not apx", "--apx-backend", "qemu-tcg", f"--apx-qemu={SYSTEM_QEMU}",
                              "-k", "qemu-tcg-xmm-export or qemu-tcg-xmm-import or test_after",
                              "-q", "-p", "no:randomly").assert_outcomes(passed=3)
    seen = json.loads((suite.path / "seen.json").read_text())
    assert [s[0] for s in seen] == ["test_scenario[qemu-tcg-xmm-export]", "test_scenario[qemu-tcg-xmm-import]",
                                    "test_after"]
    assert len(seen[0][2]) == 1  # after the first case: only the spare for the second
    assert seen[1][2] == []      # after the backend's last case: nothing
    assert _children() == []
