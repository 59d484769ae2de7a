"""labgrid places as remote hosts (``--apx-place``): the lab's coordinator says which
machine a place is, the run holds the place while it uses the machine.

- `PlaceSpec`: a HostSpec (the SSH target, from the place's NetworkService resource) that
  also names its place: item ids ``place[<place>/<user@host:port>]-<case>``, errors
  ``apx-place <place> (<user@host:port>): <phase>: <why>``, JUnit ``apx.place``.
- `Coordinator`: what the plugin (and the tests) use: a coordinator session that lives in
  a helper process, ``python -c 'from apx_tests.remote.labgrid_helper import serve; serve()'``,
  spoken to in JSON lines over its stdin/stdout. Look places up, acquire one through a
  labgrid reservation (waiting while someone else holds it), release it.
- The helper's side (`LabgridSession`, `serve`) is ``labgrid_helper``: labgrid's own
  Python client (ClientSession, gRPC) on an event loop in a thread, called synchronously.
- `PlaceHost`: a RemoteHost that checks it holds its place before connecting and releases
  the place after the remote cleanup.

Why a helper process and not labgrid's client inside pytest: gRPC's threads make every
fork of the pytest process unsafe, and the QEMU backends fork with a preexec_fn (a forked
child crashed in Python code, SIGSEGV, in the first try). Why labgrid's Python client and
not `labgrid-client` subprocesses: one session for the run, replies and errors as data,
and a helper that notices when pytest dies (its stdin closes) and releases the places
then. docs/remote.md, "labgrid places". labgrid is optional (the ``lab`` extra): only the
helper imports its client.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .hosts import HostSpec
from .ssh import RemoteHost

DEFAULT_PORT = 20408          # labgrid's coordinator port (labgrid-client's default too)
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
INSTALL_HINT = "pip install apx-tests[lab]"


class LabError(RuntimeError):
    """A coordinator or place problem; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class PlaceSpec(HostSpec):
    place: str = ""
    resource: str = ""  # exporter/group/cls/name of the NetworkService the host came from

    @property
    def title(self) -> str:
        return f"{self.place} ({self.label})"

    @property
    def prefix(self) -> str:
        return f"apx-place {self.title}"

    @property
    def item_tag(self) -> str:
        return f"place[{self.place}/{self.label}]"

    def junit_properties(self) -> list[tuple[str, str]]:
        return [("apx.place", self.place), ("apx.place.resource", self.resource)]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port); the port defaults to 20408."""
    match = re.fullmatch(r"\s*(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\s\[\]]+))(?::(?P<port>\d+))?\s*", text or "")
    if not match:
        raise LabError(f"coordinator address {text!r}: expected HOST[:PORT]")
    port = int(match["port"] or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise LabError(f"coordinator address {text!r}: port {port} out of range")
    return match["v6"] or match["host"], port


def coordinator_address(option: str | None) -> tuple[str, str]:
    """(address, where it came from): --apx-coordinator, else labgrid's LG_COORDINATOR,
    else labgrid's own default."""
    if option:
        return option, "--apx-coordinator"
    if os.environ.get("LG_COORDINATOR"):
        return os.environ["LG_COORDINATOR"], "LG_COORDINATOR"
    return DEFAULT_ADDRESS, "labgrid's default; set --apx-coordinator or LG_COORDINATOR"


def labgrid_missing(client: bool = False) -> str | None:
    """Why labgrid cannot be used here, in one line; None when it can. The pytest side
    imports only the `labgrid` package (which does not start gRPC); the helper (`client`)
    its gRPC client too."""
    try:
        import labgrid  # noqa: F401
        if client:
            from labgrid.remote.client import ClientSession
            from labgrid.remote.generated import labgrid_coordinator_pb2  # noqa: F401
    except ImportError as exc:
        return f"--apx-place needs labgrid, which this Python cannot import ({exc}): {INSTALL_HINT}"
    try:
        from importlib.metadata import version
        major = int(version("labgrid").split(".")[0])
    except Exception:
        major = None
    if major is not None and major < 24 or client and not hasattr(ClientSession, "sync_with_coordinator"):
        # before 24.0 the coordinator spoke WAMP (crossbar), not gRPC
        return f"--apx-place needs labgrid >= 24 (the gRPC coordinator): {INSTALL_HINT}"
    return None


@dataclass
class Held:
    """A place we hold: its reservation token and how long getting it took."""
    place: str
    token: str
    waited: float
    released: bool = False
    note: str | None = None


# --- the helper process, from pytest's side (labgrid_helper.py is the other) --------------------

HELPER_CODE = "from apx_tests.remote.labgrid_helper import serve; serve()"


class Coordinator:
    """The plugin's coordinator: a LabgridSession in a helper process (module docstring).

    Thread-safe: requests from several threads (one per place) are answered by id. The
    helper writes its stderr into a pipe read here; its tail explains a helper that died.
    """

    def __init__(self, address: str, source: str, timeout: float = 15.0):
        self.host, self.port = parse_address(address)
        self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.source = source
        self.timeout = timeout
        self.name: str | None = None
        self.held: dict[str, Held] = {}
        self._proc: subprocess.Popen | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, list] = {}   # id -> [Event, reply]
        self._waiters: dict[str, Callable[[str], None]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stderr: deque[str] = deque(maxlen=20)
        self._dead: str | None = None

    @property
    def where(self) -> str:
        return f"coordinator {self.address} ({self.source})"

    @property
    def pid(self) -> int | None:
        """The helper's pid (while it runs)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def open(self) -> "Coordinator":
        why = labgrid_missing()
        if why:
            raise LabError(why)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", HELPER_CODE], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                          env=env, start_new_session=True)
        except OSError as exc:
            raise LabError(f"cannot start the labgrid helper ({sys.executable}): {exc}") from None
        for target, name in ((self._read_replies, "replies"), (self._read_stderr, "stderr")):
            thread = threading.Thread(target=target, name=f"apx-labgrid-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        try:
            reply = self._request({"op": "open", "address": self.address, "source": self.source,
                                   "timeout": self.timeout}, self.timeout * 3 + 30)
        except LabError:
            self.close()
            raise
        self.name = reply["name"]
        return self

    # --- the pipe ---------------------------------------------------------------------------
    def _read_replies(self) -> None:
        try:
            for line in self._proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    callback = self._waiters.get(msg.get("name"))
                    if callback is not None:
                        callback(msg.get("text", ""))
                    continue
                with self._lock:
                    slot = self._pending.get(msg.get("id"))
                if slot is not None:
                    slot[1] = msg
                    slot[0].set()
        finally:
            self._proc.wait()
            tail = self._stderr[-1].strip() if self._stderr else ""
            with self._lock:
                self._dead = (f"the labgrid helper exited (status {self._proc.returncode})"
                              + (f": {tail}" if tail else ""))
                for slot in self._pending.values():
                    slot[0].set()

    def _read_stderr(self) -> None:
        for line in self._proc.stderr:
            if line.strip():
                self._stderr.append(" ".join(line.split()))

    def _send(self, msg: dict) -> None:
        try:
            with self._lock:
                self._proc.stdin.write(json.dumps(msg) + "\n")
                self._proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the helper is gone: the reply reader says so

    def _request(self, msg: dict, timeout: float, cancel: threading.Event | None = None):
        """Send `msg`, wait for its reply (at most `timeout` s; once `cancel` is set, the
        helper is told to stop waiting and gets a short while to say so)."""
        rid = next(self._ids)
        slot = [threading.Event(), None]
        with self._lock:
            if self._dead:
                raise LabError(self._dead)
            self._pending[rid] = slot
        self._send({**msg, "id": rid})
        deadline = time.monotonic() + timeout
        cancelled = False
        try:
            while not slot[0].wait(0.2):
                now = time.monotonic()
                if cancel is not None and cancel.is_set() and not cancelled:
                    self._send({"op": "cancel", "name": msg["name"]})
                    cancelled = True  # it cancels the reservation, then replies
                    deadline = min(deadline, now + self.timeout * 3 + 5)
                if now > deadline:
                    raise LabError(f"{msg['op']}: no answer from the labgrid helper within {timeout:g} s")
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        reply = slot[1]
        if reply is None:
            raise LabError(self._dead or "the labgrid helper did not answer")
        if "error" in reply:
            raise LabError(reply["error"])
        return reply["result"]

    # --- what the plugin asks -----------------------------------------------------------------
    def resolve(self, name: str) -> PlaceSpec:
        r = self._request({"op": "resolve", "name": name}, self.timeout * 2 + 5)
        return PlaceSpec(r["user"], r["host"], int(r["port"]), place=r["place"], resource=r["resource"])

    def acquire(self, name: str, wait: float, cancel: threading.Event, on_wait=None) -> Held:
        """Hold place `name` (LabgridSession.acquire, in the helper); `on_wait(text)` hears
        who holds it while we wait; `cancel` set: stop waiting (LabError)."""
        if on_wait is not None:
            self._waiters[name] = on_wait
        try:
            # the helper gives up after `wait`; its calls have their own timeouts on top
            r = self._request({"op": "acquire", "name": name, "wait": wait}, wait + self.timeout * 6 + 30, cancel)
        finally:
            self._waiters.pop(name, None)
        held = self.held[name] = Held(name, r["token"], float(r["waited"]))
        return held

    def release(self, name: str) -> str | None:
        """Release place `name` if we hold it; never raises: what could not be done, or None."""
        held = self.held.get(name)
        if held is None or held.released:
            return held.note if held else None
        try:
            held.note = self._request({"op": "release", "name": name}, self.timeout * 4 + 10)["note"]
        except LabError as exc:
            held.note = (f"NOT released ({exc}); release it with: labgrid-client -x {self.address} -p {name} "
                         "release")
            return held.note
        held.released = held.note is None or not held.note.startswith("NOT released")
        return held.note

    def acquired(self) -> dict[str, str | None]:
        return self._request({"op": "acquired"}, self.timeout * 2 + 5)

    def reservations(self) -> list[tuple[str, str, str]]:
        return [tuple(r) for r in self._request({"op": "reservations"}, self.timeout * 2 + 5)]

    def close(self) -> None:
        """Release what we hold (the helper does, whatever it still holds), end the helper."""
        if self._proc is None:
            return
        proc, alive = self._proc, self._proc.poll() is None
        if alive and not self._dead:
            try:
                notes = self._request({"op": "close"}, self.timeout * (len(self.held) + 2) * 2 + 10)
            except LabError:
                notes = {}
            for name, note in notes.items():
                held = self.held.get(name)
                if held is not None and not held.released:
                    held.note = note
                    held.released = note is None or not note.startswith("NOT released")
        try:
            proc.stdin.close()  # EOF: the helper releases and exits by itself, too
        except OSError:
            pass
        try:
            proc.wait(timeout=self.timeout * 2 + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


@dataclass
class PlaceHost(RemoteHost):
    """A RemoteHost on a labgrid place: the place must be held (the plugin acquires every
    place before the first test) before connecting, and is released after the cleanup."""

    lab: Coordinator | None = None
    acquire_error: LabError | None = None
    place_note: str | None = field(default=None)

    def prepare(self) -> None:
        if self.acquire_error is not None:
            raise self.error("acquire", str(self.acquire_error))
        held = self.lab.held.get(self.spec.place)
        if held is None:
            raise self.error("acquire", "the place was not acquired")
        self.timings.acquire = held.waited
        try:
            now = self.lab.resolve(self.spec.place)
        except LabError as exc:
            raise self.error("acquire", str(exc)) from None
        if (now.user, now.host, now.port) != (self.spec.user, self.spec.host, self.spec.port):
            raise self.error("acquire", f"its NetworkService now says {now.label}, not {self.spec.label} as at "
                                        "collection; run again")

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            # after the agent is gone and the directory removed: only then is the machine free
            if self.lab is not None and self.spec.place in self.lab.held:
                self.place_note = self.lab.release(self.spec.place)
