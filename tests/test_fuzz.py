"""Fuzzing the two readers of outside bytes: `apx-tests decode` (apx_tests.cli.main) and
the migration-stream reader (MigrationStream.open on files).

Random, truncated and mutated inputs, a bounded number of examples each (hypothesis;
APX_FUZZ_EXAMPLES per test, default 150; derandomized under CI by the repository
conftest's "ci" profile).  The only outcomes allowed are the documented ones:

- decode: exit 0 (decoded), 1 (with --expect: differences), or 2 with exactly one line
  on stderr starting `apx-tests decode: `; never an exception or a traceback;
- MigrationStream.open: a stream, or MigrationStreamError (one line, `PATH: byte N`);
  and for a stream that opens, cpu_state()/to_xsave()/read_guest_memory() also raise
  nothing but MigrationStreamError.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from apx_tests.cli import main
from apx_tests.qemu.migration.stream import MigrationStream, MigrationStreamError
from apx_tests.xsave import BANKS, Layout, XsaveImage

APX = Layout.reference("intel-apx")
# Examples per test; APX_FUZZ_EXAMPLES=5000 for a longer hunt (the default keeps the file ~7 s).
EXAMPLES = int(os.environ.get("APX_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="apx-fuzz-") as tmp:
        yield tmp


def _valid_image(compacted: bool = False) -> bytes:
    image = XsaveImage.build(APX, {}, compacted=compacted)
    for bank in ("apx", "ymm", "x87", "opmask"):
        image.write_registers(BANKS[bank].pattern(1))
    return image.to_bytes()


VALID = _valid_image()
VALID_COMPACTED = _valid_image(compacted=True)


def mutated(base: bytes):
    """`base` with some bytes xored (half of them in the 576-byte legacy+header area, where
    the parser decides most), an optional XSTATE_BV/XCOMP_BV overwrite and an optional cut."""
    edit = st.tuples(st.one_of(st.integers(0, 575), st.integers(0, len(base) - 1)), st.integers(1, 255))
    return st.builds(_mutate, st.just(base), st.lists(edit, max_size=6),
                     st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                     st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                     st.one_of(st.none(), st.integers(0, len(base) + 64)))


def _mutate(base, edits, xstate_bv, xcomp_bv, cut):
    data = bytearray(base)
    for offset, xor in edits:
        data[offset] ^= xor
    if xstate_bv is not None:
        data[512:520] = xstate_bv.to_bytes(8, "little")
    if xcomp_bv is not None:
        data[520:528] = xcomp_bv.to_bytes(8, "little")
    if cut is not None:
        data = data[:cut] if cut <= len(data) else data + bytes(cut - len(data))
    return bytes(data)


def decode(workdir, data: bytes, *args: str, expect: bytes | None = None) -> tuple[int, str, str]:
    path = os.path.join(workdir, "image.xsave")
    with open(path, "wb") as fh:
        fh.write(data)
    argv = ["decode", path, *args]
    if expect is not None:
        other = os.path.join(workdir, "expect.xsave")
        with open(other, "wb") as fh:
            fh.write(expect)
        argv += ["--expect", other]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_decode(rc: int, out: str, err: str, *, expect: bool = False) -> None:
    assert rc in ((0, 1, 2) if expect else (0, 2)), (rc, out, err)
    if rc == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("apx-tests decode: "), err
        assert "Traceback" not in err
    else:
        assert err == "" and out.startswith("file: ")


LAYOUT_ARGS = st.sampled_from([("--cpuid", "intel-apx"), ("--cpuid", "intel-apx", "--layout", "auto"),
                               ("--cpuid", "intel-apx", "--layout", "compacted"), ("--cpuid", "amd-zen4"),
                               ("--cpuid", "host", "--layout", "auto")])


@FUZZ
@given(data=st.binary(max_size=4200), args=LAYOUT_ARGS)
def test_decode_random_bytes(workdir, data, args):
    check_decode(*decode(workdir, data, *args))


@FUZZ
@given(data=st.one_of(mutated(VALID), mutated(VALID_COMPACTED)), args=LAYOUT_ARGS)
def test_decode_mutated_images(workdir, data, args):
    check_decode(*decode(workdir, data, *args))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=mutated(VALID), expect=mutated(VALID))
def test_decode_mutated_expect(workdir, data, expect):
    check_decode(*decode(workdir, data, "--cpuid", "intel-apx", expect=expect), expect=True)


def test_decode_valid_inputs_still_decode(workdir):
    """The control: unmutated images decode (exit 0), compared with themselves (exit 0)."""
    assert decode(workdir, VALID, "--cpuid", "intel-apx")[0] == 0
    assert decode(workdir, VALID_COMPACTED, "--cpuid", "intel-apx", "--layout", "auto")[0] == 0
    assert decode(workdir, VALID, "--cpuid", "intel-apx", expect=VALID)[0] == 0


def test_decode_process_exit_code_is_2(workdir):
    """The installed command itself: bad input is exit status 2 and one stderr line."""
    for name, data in (("empty", b""), ("short", VALID[:300]), ("bad-bv", _mutate(VALID, [], 1 << 40, None, None))):
        path = os.path.join(workdir, f"{name}.xsave")
        with open(path, "wb") as fh:
            fh.write(data)
        proc = subprocess.run([sys.executable, "-m", "apx_tests.cli", "decode", path, "--cpuid", "intel-apx"],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"apx-tests decode: {path}: ")


# --- the migration reader -----------------------------------------------------------------------

class _Stream(tuple):
    """(stream bytes, the guest's layout); a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<real QEMU stream, {len(self[0])} bytes>"


@pytest.fixture(scope="module")
def stream_bytes():
    """A real QEMU (TCG) stream of a guest with the ymm bank loaded."""
    from apx_tests.guests.build import build_payload
    from apx_tests.qemu.backend import QemuBackend
    from apx_tests.qemu.errors import QemuUnavailable
    from apx_tests.scenarios import Run
    from apx_tests.scenarios.engine import LOADED, load_bank

    try:
        backend = QemuBackend("tcg")
    except QemuUnavailable as exc:
        pytest.skip(f"QEMU unavailable: {exc}")
    try:
        with Run(backend, BANKS["ymm"], build_payload("ymm").code) as run:
            session = run.start()
            session.run_to(0)
            load_bank(run, session, run.pattern(LOADED))
            snap = session.snapshot()
            with open(snap.path, "rb") as fh:
                data = fh.read()
        layout = backend.layout
    finally:
        backend.host.close()
    return _Stream((data, layout))


def open_stream(workdir, data: bytes, **kw):
    path = os.path.join(workdir, "stream.mig")
    with open(path, "wb") as fh:
        fh.write(data)
    return MigrationStream.open(path, **kw)


def check_stream(workdir, data: bytes, layout, **kw) -> None:
    try:
        stream = open_stream(workdir, data, **kw)
        cpu = stream.cpu_state(0)
        cpu.to_xsave(layout)
        stream.read_guest_memory(0x200000, 64)
    except MigrationStreamError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(os.path.join(workdir, "stream.mig") + ": byte "), message


def test_the_real_stream_reads(workdir, stream_bytes):
    data, layout = stream_bytes
    image = open_stream(workdir, data).cpu_state(0).to_xsave(layout)
    assert image.read_registers(BANKS["ymm"].names) == BANKS["ymm"].pattern(1)


@FUZZ
@given(st.data())
def test_stream_mutations(workdir, stream_bytes, data):
    raw, layout = stream_bytes
    size = len(raw)
    # Device sections and the vmdesc are at the end of the file (RAM comes first): most
    # edits go there, some anywhere.
    offset = st.one_of(st.integers(max(0, size - 24000), size - 1), st.integers(0, size - 1), st.integers(0, 63))
    edits = data.draw(st.lists(st.tuples(offset, st.integers(1, 255)), max_size=8), label="edits")
    cut = data.draw(st.one_of(st.none(), st.integers(0, size)), label="cut")
    buf = bytearray(raw)
    for at, xor in edits:
        buf[at] ^= xor
    if cut is not None:
        del buf[cut:]
    check_stream(workdir, bytes(buf), layout)


@FUZZ
@given(st.binary(max_size=2000))
def test_stream_random_bytes(workdir, stream_bytes, tail):
    _, layout = stream_bytes
    check_stream(workdir, b"QEVM\x00\x00\x00\x03" + tail, layout)
    check_stream(workdir, tail, layout)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["name", "instance_id", "version", "fields", "field",
                                                       "type", "size", "subsections", "vmsd_name", "Description",
                                                       "devices", "page_size", "struct", "array_len"]),
                                      children, max_size=5),
                    max_leaves=20)


@settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))
@given(st.data())
def test_stream_with_a_mangled_vm_description(workdir, stream_bytes, data):
    """The VM description (trusted to say what every field is) replaced by random JSON, or
    by the real one with random values spliced in."""
    raw, layout = stream_bytes
    real = open_stream(workdir, raw).vmdesc
    if data.draw(st.booleans(), label="whole"):
        desc = data.draw(JSON, label="vmdesc")
    else:
        desc = json.loads(json.dumps(real))
        for _ in range(data.draw(st.integers(1, 4), label="splices")):
            node, key = _random_slot(desc, data)
            if node is not None:
                node[key] = data.draw(JSON, label="value")
    check_stream(workdir, raw, layout, vmdesc=desc)


def _random_slot(desc, data):
    """A random (container, key) inside the JSON tree."""
    node, key = None, None
    current = desc
    for _ in range(data.draw(st.integers(1, 8), label="depth")):
        if isinstance(current, dict) and current:
            k = data.draw(st.sampled_from(sorted(current)), label="key")
        elif isinstance(current, list) and current:
            k = data.draw(st.integers(0, len(current) - 1), label="index")
        else:
            break
        node, key, current = current, k, current[k]
    return node, key
