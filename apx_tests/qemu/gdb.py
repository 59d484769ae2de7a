"""gdb/MI observer: QEMU's gdbstub on a Unix socket, driven through pygdbmi.

``GdbSession`` owns one ``gdb --interpreter=mi3 --nx -q`` process connected to a
QEMU started with ``-gdb unix:PATH,server=on,wait=off``.  Every MI command is sent
with a numeric token and the session waits for *that* token's result record
(``^done``/``^connected``/``^error``/...), so a command costs what gdb needs, not a
fixed read timeout.

Semantics measured on QEMU 10.0.2 + gdb 13.1 (docs/observers.md has the details):

* attaching (``connect``) STOPS the VM (QMP ``query-status``: ``paused``; a ``-S``
  VM stays ``prelaunch``; a QMP-``stop``ped VM stays ``paused``);
* ``detach`` RESUMES the VM, even one that was stopped by QMP ``stop`` or started
  with ``-S`` -- call it only when resuming is intended;
* ``close`` kills gdb without detaching: QEMU sees the socket close and leaves the
  run state alone, so the VM stays stopped (a later QMP ``cont`` resumes it);
* QEMU serves one gdbstub client at a time: a second ``connect`` waits until its
  timeout, and its queued connection stops the VM when QEMU accepts it later.

Registers are read and written as raw little-endian bytes, exactly as XSAVE stores
them (``st0`` = 10 bytes: 64-bit significand then 16-bit sign/exponent).  Reads use
``-data-list-register-values r`` (one MI command for any number of registers; vector
registers come as gdb unions, whose ``uint128`` member is the raw value); writes send
the raw remote-protocol ``P`` packet through ``maint packet`` and then flush gdb's
register cache, so no value goes through a gdb type conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

GDB_MISSING = "gdb not found: install gdb (needed for the gdbstub observer)"


class GdbError(RuntimeError):
    """A gdb/gdbstub problem; the message is one line naming the socket and command."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class TargetRegister:
    """One register of the target description QEMU sent.

    ``regnum`` is the remote (gdbstub) register number used by ``p``/``P`` packets;
    ``number`` is gdb's own number (the index in ``-data-list-register-names``).
    """

    name: str
    regnum: int
    bitsize: int
    type: str
    feature: str
    number: int = -1

    @property
    def size(self) -> int:
        return self.bitsize // 8


def _mi_quote(text: str) -> str:
    """An MI c-string argument (gdb unquotes it before use)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_HEX_SCALAR = re.compile(r"0x([0-9a-fA-F]+)")
_UINT128 = re.compile(r"\buint128 = 0x([0-9a-fA-F]+)")


class GdbSession:
    """One gdb process attached to one QEMU gdbstub socket (context manager)."""

    def __init__(self, socket_path: str | os.PathLike, *, gdb: str = "gdb", timeout: float = 10.0,
                 transcript_path: str | os.PathLike | None = None):
        self.socket_path = str(socket_path)
        self.gdb = gdb
        self.timeout = float(timeout)
        self.transcript_path = Path(transcript_path) if transcript_path is not None else None
        #: every MI command sent and the records gdb answered, in order (for artifacts)
        self.transcript: list[dict] = []
        self._controller = None
        self._token = 0
        self._connected = False
        self._closed = False
        self._tdesc: list[TargetRegister] | None = None
        self._features: set[str] | None = None
        self._names: list[str] | None = None
        self._t0 = time.monotonic()
        #: the ``*stopped`` record gdb reported when attaching (frame, thread)
        self.stop_record: dict | None = None
        self._doing = ""          # the public operation in progress, for error messages
        self._lost = ""           # why the connection went away, if it did

    # ---- life cycle ------------------------------------------------------------

    def __enter__(self) -> "GdbSession":
        if not self._connected:
            try:
                self.connect()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last resort: never leave a gdb process behind
        try:
            self._kill()
        except Exception:
            pass

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def _proc(self) -> subprocess.Popen | None:
        return getattr(self._controller, "gdb_process", None) if self._controller is not None else None

    def connect(self) -> "GdbSession":
        """Start gdb and attach to the gdbstub.  Attaching STOPS the VM."""
        if self._closed:
            raise GdbError(f"gdb session for {self.socket_path} is closed")
        if self._connected:
            return self
        exe = shutil.which(self.gdb)
        if exe is None:
            raise GdbError(GDB_MISSING)
        if not os.path.exists(self.socket_path):
            raise GdbError(f"gdbstub socket {self.socket_path} does not exist "
                           f"(is QEMU running with -gdb unix:{self.socket_path},server=on,wait=off?)")
        if re.search(r'[\s"\'\\]', self.socket_path):
            # gdb's `target remote` takes the rest of the line literally (no unquoting)
            raise GdbError(f"gdbstub socket path {self.socket_path!r} contains whitespace or quotes; "
                           "gdb cannot connect to it: use a plain path (e.g. from tempfile.mkdtemp())")
        from pygdbmi.gdbcontroller import GdbController  # imported late: only this observer needs it

        try:
            if self._controller is None:         # (after a detach gdb is still there: re-attach)
                try:
                    self._controller = GdbController(command=[exe, "--interpreter=mi3", "--nx", "-q"],
                                                     time_to_check_for_additional_output_sec=0.001)
                except (OSError, ValueError) as e:
                    raise GdbError(f"cannot start {exe} for {self.socket_path}: {e}") from None
                self.command("-gdb-set confirm off")
                self.command("-gdb-set architecture i386:x86-64")
            records = self.command(f"-target-select remote {self.socket_path}", expect="connected")
        except BaseException:
            self._kill()                         # a failed attach leaves no gdb behind
            raise
        self.stop_record = None
        for r in records:
            if r.get("type") == "notify" and r.get("message") == "stopped":
                self.stop_record = r.get("payload")
        self._connected = True
        self._lost = ""
        return self

    @property
    def reusable(self) -> bool:
        """Detached cleanly, gdb still running: retarget() can point it at another stub."""
        proc = self._proc
        return not self._closed and not self._connected and proc is not None and proc.poll() is None

    def retarget(self, socket_path: str | os.PathLike, *,
                 transcript_path: str | os.PathLike | None = None) -> "GdbSession":
        """Point this detached session's gdb at another gdbstub; connect() then attaches
        there.  A running gdb attaches in ~6 ms, a new one costs ~0.3 s here (gdb's own
        start-up), so a QEMU host keeps one between views (QemuHost.gdb_session).  What
        was learned from the old target (its description, names, transcript) is dropped:
        the next QEMU may be another process of the same binary, never assumed equal."""
        if not self.reusable:
            raise GdbError(f"gdb session for {self.socket_path} cannot be retargeted "
                           f"({'closed' if self._closed else 'attached' if self._connected else 'gdb gone'})")
        self.socket_path = str(socket_path)
        self.transcript_path = Path(transcript_path) if transcript_path is not None else None
        self.transcript = []
        self._tdesc = self._features = self._names = None
        self.stop_record = None
        self._doing = self._lost = ""
        self._t0 = time.monotonic()
        return self

    def detach(self) -> None:
        """Detach from the gdbstub.  QEMU RESUMES the VM (even one paused by QMP ``stop``)."""
        self._need_connection("-target-detach")
        self.command("-target-detach")
        self._connected = False

    def close(self) -> None:
        """Kill gdb without detaching; write the transcript.

        QEMU sees the socket close and leaves the VM's run state alone: a VM the attach
        stopped stays stopped (resume it with QMP ``cont``), one resumed meanwhile by
        QMP ``cont`` keeps running.  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._connected = False
        self._kill()
        if self.transcript_path is not None:
            self.save_transcript(self.transcript_path)

    def save_transcript(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"socket": self.socket_path, "commands": self.transcript}, indent=1,
                                   default=str) + "\n")
        return path

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not time out
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._controller.gdb_process = None
        self._controller = None

    # ---- the MI loop -------------------------------------------------------------

    def command(self, mi: str, *, timeout: float | None = None, expect: str | Iterable[str] = ("done",)) -> list[dict]:
        """Send one MI (or CLI) command and return gdb's records up to its result record.

        ``^error`` and any result class not in ``expect`` raise ``GdbError`` naming the
        socket and the command.  gdb dying or not answering within ``timeout`` also
        raise ``GdbError`` (and a timed-out gdb is killed: its state is unknown).
        """
        if self._controller is None:
            raise GdbError(f"gdb is not running for {self.socket_path} (command `{_short(mi)}`)")
        expect = (expect,) if isinstance(expect, str) else tuple(expect)
        timeout = self.timeout if timeout is None else timeout
        self._token += 1
        token = self._token
        started = time.monotonic()
        entry = {"t": round(started - self._t0, 6), "command": mi, "records": [], "seconds": None}
        self.transcript.append(entry)
        proc = self._proc
        try:
            self._controller.write(f"{token}{mi}", timeout_sec=timeout, read_response=False)
        except (OSError, ValueError) as e:
            self._dead(mi, f"cannot write to gdb: {e}")
        deadline = started + timeout
        result = None
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                entry["seconds"] = round(time.monotonic() - started, 6)
                self._kill()
                hint = ""
                if mi.startswith("-target-select"):
                    hint = ("; is another gdb attached? QEMU serves one gdbstub client at a time, and this "
                            "queued connection will STOP the VM when QEMU accepts it after the current client leaves")
                raise GdbError(f"gdb gave no answer within {timeout:g}s to `{_short(mi)}`{self._context()} "
                               f"on {self.socket_path} (gdb killed){hint}")
            try:
                # Wait for output ourselves, then let pygdbmi read what is there without
                # waiting: its own wait lingers time_to_check_for_additional_output_sec
                # after every chunk, ~1 ms per command, ~1 s over the main job's views.
                ready, _, _ = select.select(self._controller.io_manager.read_list, [], [], min(remaining, 0.2))
                records = self._controller.get_gdb_response(timeout_sec=0, raise_error_on_timeout=False) \
                    if ready else []
            except (OSError, ValueError) as e:
                self._dead(mi, f"reading gdb output failed: {e}")
            for r in records:
                entry["records"].append(r)
                if r.get("type") == "result" and r.get("token") == token:
                    result = r
            if result is None and proc.poll() is not None:
                entry["seconds"] = round(time.monotonic() - started, 6)
                self._dead(mi, f"gdb exited with status {proc.returncode}")
        entry["seconds"] = round(time.monotonic() - started, 6)
        if result["message"] == "error":
            msg = (result.get("payload") or {}).get("msg", "")
            if re.search(r"Target disconnected|Remote connection closed|Remote communication error", msg):
                self._connected = False          # QEMU is gone or closed the socket
                self._lost = _short(msg, 100)
            raise GdbError(f"gdb `{_short(mi)}`{self._context()} on {self.socket_path} failed: {_short(msg, 300)}")
        if result["message"] not in expect:
            raise GdbError(f"gdb `{_short(mi)}`{self._context()} on {self.socket_path}: expected "
                           f"^{'/^'.join(expect)}, got ^{result['message']}")
        return entry["records"]

    def _dead(self, mi: str, why: str):
        stderr = " ".join(str(r.get("payload", "")) for e in self.transcript[-1:] for r in e["records"]
                          if r.get("type") in ("log", "output") or r.get("stream") == "stderr")
        self._kill()
        self._connected = False
        self._lost = why
        detail = f" ({_short(stderr, 200)})" if stderr.strip() else ""
        raise GdbError(f"{why} during `{_short(mi)}`{self._context()} on {self.socket_path}{detail}")

    def _context(self) -> str:
        return f" ({self._doing})" if self._doing else ""

    def console(self, cli: str, **kw) -> str:
        """Run a CLI command; return what it printed on the console stream."""
        records = self.command(f"-interpreter-exec console {_mi_quote(cli)}", **kw)
        return "".join(r.get("payload") or "" for r in records if r.get("type") == "console")

    def _need_connection(self, what: str) -> None:
        if not self._connected:
            why = f"; connection lost: {self._lost}" if self._lost else ""
            raise GdbError(f"gdb is not attached to {self.socket_path} (command `{what}`{why})")

    # ---- target description --------------------------------------------------------

    def register_names(self) -> list[str]:
        """gdb's register names for this target (``-data-list-register-names``), empty names dropped."""
        self._need_connection("-data-list-register-names")
        return [n for n in self._all_names() if n]

    def _all_names(self) -> list[str]:
        if self._names is None:
            records = self.command("-data-list-register-names")
            self._names = list(self._result(records).get("register-names", []))
        return self._names

    def features(self) -> set[str]:
        """Feature names of the target description (``maint print xml-tdesc``).

        QEMU 10 on x86-64 sends ONE feature, ``org.gnu.gdb.i386.core``, holding GPRs,
        segments, control registers, x87, xmm0-15 and mxcsr.  If gdb cannot print the
        description, features are inferred from the register names (best effort).
        """
        self._need_connection("maint print xml-tdesc")
        self._target_registers()
        return set(self._features or ())

    def target_registers(self) -> dict[str, TargetRegister]:
        """Registers of the target description by name (remote number, size, type, feature)."""
        self._need_connection("maint print xml-tdesc")
        return {r.name: r for r in self._target_registers()}

    def _target_registers(self) -> list[TargetRegister]:
        if self._tdesc is not None:
            return self._tdesc
        numbers = {n: i for i, n in enumerate(self._all_names()) if n}
        regs: list[TargetRegister] = []
        features: set[str] = set()
        try:
            xml = self.console("maint print xml-tdesc")
            root = ET.fromstring(xml[xml.index("<"):]) if "<" in xml else None
        except (GdbError, ET.ParseError, ValueError):
            root = None
        if root is not None:
            next_regnum = 0
            for feat in root.iter("feature"):
                fname = feat.get("name", "")
                features.add(fname)
                for reg in feat.iter("reg"):
                    regnum = int(reg.get("regnum", next_regnum))
                    next_regnum = regnum + 1
                    name = reg.get("name", "")
                    regs.append(TargetRegister(name, regnum, int(reg.get("bitsize", "0")), reg.get("type", ""),
                                               fname, numbers.get(name, -1)))
        else:
            # No XML: fall back to gdb's own idea of the registers (sizes from a read).
            for name, num in numbers.items():
                regs.append(TargetRegister(name, -1, 0, "", "", num))
            if "rax" in numbers:
                features.add("org.gnu.gdb.i386.core")
            if "xmm0" in numbers:
                features.add("org.gnu.gdb.i386.sse")
            if "ymm0h" in numbers or "ymm0" in numbers:
                features.add("org.gnu.gdb.i386.avx")
            if "k0" in numbers:
                features.add("org.gnu.gdb.i386.avx512")
            if "r16" in numbers:
                features.add("org.gnu.gdb.i386.apx")
        self._tdesc = regs
        self._features = features
        return regs

    def _register(self, name: str, what: str) -> TargetRegister:
        regs = self.target_registers()
        reg = regs.get(name)
        if reg is None or reg.number < 0:
            offered = [r.name for r in self._target_registers()]
            hint = ""
            if re.fullmatch(r"(ymm|zmm)\d+|k[0-7]|r(1[6-9]|2\d|3[01])", name):
                hint = (" (QEMU's gdbstub, 10.0 and 11.1 alike, offers no ymm/zmm/k; r16-r31 only for a "
                        "vCPU with APX, QEMU 11.0+)")
            raise GdbError(f"{what} {name}: the target on {self.socket_path} does not offer this register{hint}; "
                           f"it offers {', '.join(offered[:6])}, ... ({len(offered)} registers)")
        return reg

    # ---- registers ------------------------------------------------------------------

    def read_registers(self, names: Iterable[str] | None = None) -> dict[str, bytes]:
        """Raw little-endian bytes of ``names`` (default: every register of the target description).

        GPRs 8 bytes, eflags/segments/x87 control 4, ``st0``..``st7`` 10 (QEMU reads
        them relative to TOP, i.e. ST(i)), ``xmm0``..``xmm15`` 16, ``mxcsr`` 4.  Outside
        64-bit mode QEMU returns r8-r15 as 0 and rax..rdi/rip zero-extended from 32 bits.
        """
        names = None if names is None else [n.lower() for n in names]
        with self._operation(f"read_registers {','.join(names) if names else 'all'}"):
            return self._read_registers(names)

    def _read_registers(self, names: list[str] | None) -> dict[str, bytes]:
        """The public method's body (the caller set the operation context)."""
        self._need_connection("-data-list-register-values")
        wanted = [r.name for r in self._target_registers()] if names is None else names
        regs = [self._register(n, "read") for n in wanted]
        if not regs:
            return {}
        by_number = {r.number: r for r in regs}
        nums = " ".join(str(r.number) for r in regs)
        # gdb caches registers until the target resumes; QMP `cont`/`stop`, a dead QEMU or
        # a raw P packet would go unnoticed.  Flush so every read asks the stub.
        self.console("maint flush register-cache")
        records = self.command(f"-data-list-register-values r {nums}")
        out: dict[str, bytes] = {}
        slow: list[TargetRegister] = []
        for item in self._result(records).get("register-values", []):
            reg = by_number.get(int(item["number"]))
            if reg is None:
                continue
            value = self._decode(reg, item.get("value", ""))
            if value is None:
                slow.append(reg)
            else:
                out[reg.name] = value
        for reg in slow:  # no raw scalar form: ask the stub for the raw bytes
            out[reg.name] = self._read_raw(reg)
        missing = [r.name for r in regs if r.name not in out]
        if missing:
            raise GdbError(f"gdb returned no value for {', '.join(missing)} on {self.socket_path}")
        return {r.name: out[r.name] for r in regs}

    def _decode(self, reg: TargetRegister, text: str) -> bytes | None:
        text = text.strip()
        if "<unavailable>" in text:
            raise GdbError(f"register {reg.name} is <unavailable> on {self.socket_path}")
        m = _HEX_SCALAR.fullmatch(text)
        if m is None and text.startswith("{"):
            m = _UINT128.search(text) if reg.bitsize == 128 else None
        if m is None:
            return None
        digits = m.group(1)
        size = reg.size or (len(digits) + 1) // 2
        value = int(digits, 16)
        if value >> (8 * size):
            raise GdbError(f"register {reg.name}: value {text} does not fit its {size} bytes")
        return value.to_bytes(size, "little")

    def _read_raw(self, reg: TargetRegister) -> bytes:
        if reg.regnum < 0:
            raise GdbError(f"register {reg.name}: no raw form and no remote register number on {self.socket_path}")
        reply = self._packet(f"p{reg.regnum:x}", f"read {reg.name}")
        try:
            data = bytes.fromhex(reply)
        except ValueError:
            raise GdbError(f"read {reg.name} on {self.socket_path}: stub answered {reply!r}") from None
        if reg.size and len(data) != reg.size:
            raise GdbError(f"read {reg.name} on {self.socket_path}: {len(data)} bytes, expected {reg.size}")
        return data

    def _packet(self, packet: str, what: str) -> str:
        text = self.console(f"maint packet {packet}")
        m = re.search(r'received: "(.*)"', text)
        if m is None:
            raise GdbError(f"{what}: no reply to packet {packet[:20]} on {self.socket_path}: {_short(text)}")
        reply = m.group(1)
        if reply == "" or re.fullmatch(r"E[0-9a-fA-F]{2}(;.*)?|E\..*", reply):
            raise GdbError(f"{what}: gdbstub on {self.socket_path} answered {reply!r} to packet "
                           f"{packet[:24]}{'...' if len(packet) > 24 else ''}")
        return reply

    def write_register(self, name: str, value: bytes, *, verify: bool = True) -> None:
        """Write raw little-endian bytes to a register (remote ``P`` packet).

        Works for every register of the target description (GPRs, rip, eflags,
        ``st0``-``st7`` as 10 raw bytes, ``xmm0``-``xmm15``, mxcsr).  With ``verify``
        the register is read back and a difference raises ``GdbError`` -- QEMU drops
        or truncates some writes silently: outside 64-bit mode it keeps only the low
        32 bits of rax..rdi/rip and ignores r8-r15; and it writes ``stN`` to the
        *physical* x87 register N while reading ``stN`` as ST(N) relative to TOP, so
        with TOP != 0 a written ``stN`` reads back elsewhere.

        Under KVM a write lands in QEMU's copy of the state; on resume QEMU hands it to
        KVM_SET_XSAVE with QEMU's XSTATE_BV, which the gdbstub does not update: an x87,
        SSE or mxcsr write to a component the guest left in its init state
        (XSTATE_BV bit 0/1 clear) is dropped by KVM.  GPR writes always survive.
        """
        with self._operation(f"write_register {name}"):
            self._write_register(name, value, verify)

    def _write_register(self, name: str, value: bytes, verify: bool) -> None:
        """The public method's body (the caller set the operation context)."""
        reg = self._register(name.lower(), "write")
        value = bytes(value)
        if reg.size and len(value) != reg.size:
            raise GdbError(f"write {reg.name}: {len(value)} bytes given, the register has {reg.size}")
        if reg.regnum < 0:
            raise GdbError(f"write {reg.name}: no remote register number for it on {self.socket_path}")
        self._need_connection(f"write {reg.name}")
        reply = self._packet(f"P{reg.regnum:x}={value.hex()}", f"write {reg.name}")
        if reply != "OK":
            raise GdbError(f"write {reg.name}: gdbstub on {self.socket_path} answered {reply!r}")
        self.console("maint flush register-cache")
        if verify:
            got = self._read_registers([reg.name])[reg.name]
            if got != value:
                raise GdbError(f"write {reg.name} on {self.socket_path} did not stick: wrote {value.hex()}, "
                               f"reads back {got.hex()} (little-endian hex)")

    # ---- memory ---------------------------------------------------------------------

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest memory at ``addr`` (a guest *virtual* address in the vCPU's current mode)."""
        self._need_connection("-data-write-memory-bytes")
        if not data:
            return
        self.command(f"-data-write-memory-bytes {addr:#x} {bytes(data).hex()}")

    def read_memory(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes of guest memory at ``addr`` (guest virtual address)."""
        self._need_connection("-data-read-memory-bytes")
        if size <= 0:
            return b""
        records = self.command(f"-data-read-memory-bytes {addr:#x} {size}")
        out = bytearray()
        pos = addr
        for block in self._result(records).get("memory", []):
            begin = int(block["begin"], 16) + int(block.get("offset", "0x0"), 16)
            if begin != pos:
                break
            chunk = bytes.fromhex(block["contents"])
            out += chunk
            pos += len(chunk)
        if len(out) != size:
            raise GdbError(f"read_memory {addr:#x}+{size} on {self.socket_path}: only {len(out)} bytes readable")
        return bytes(out)

    # ---- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _operation(self, what: str):
        outer = self._doing
        self._doing = outer or _short(what, 80)
        try:
            yield
        finally:
            self._doing = outer

    @staticmethod
    def _result(records: list[dict]) -> dict:
        for r in reversed(records):
            if r.get("type") == "result":
                return r.get("payload") or {}
        return {}
