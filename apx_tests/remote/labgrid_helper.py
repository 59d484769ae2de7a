"""The labgrid helper process: ``python -c 'from apx_tests.remote.labgrid_helper import
serve; serve()'``, started by ``labgrid.Coordinator`` and spoken to in JSON lines over its
stdin/stdout (``serve``).  Inside it, ``LabgridSession`` is labgrid's own Python client
(ClientSession, gRPC) on an event loop in a thread, called synchronously: look places up,
acquire one through a labgrid reservation (waiting while someone else holds it), release
it.  Only this process imports labgrid's client (gRPC threads make a forking pytest
unsafe: ``labgrid``'s docstring has the why).  docs/remote.md, "labgrid places".
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from .labgrid import Held, LabError, labgrid_missing, parse_address

POLL = 0.5                    # seconds between looks at a reservation we wait for

# labgrid's ReservationState values (labgrid.remote.common), as the wire carries them
_WAITING, _ALLOCATED, _ACQUIRED, _EXPIRED, _INVALID = range(5)
_STATE_NAMES = ("waiting", "allocated", "acquired", "expired", "invalid")


class _LabgridLog(logging.Filter):
    """labgrid's client logs through the root logger, some of it with tracebacks ("error in
    coordinator message pump task"). Our messages say it in one line: keep its last word
    for them, and keep the rest off the helper's stderr (whose last line explains a helper
    that died)."""

    def __init__(self):
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        if "/labgrid/" not in path:
            return True
        if record.levelno >= logging.WARNING:
            self.last = " ".join(record.getMessage().split())
        return False


class LabgridSession:
    """The helper's session with a labgrid coordinator, usable from synchronous code and
    threads.

    labgrid's ClientSession is asyncio code: it lives on an event loop that runs forever in
    a thread of its own (so the coordinator's place and resource updates keep arriving
    between requests), and every call here submits a coroutine to that loop and waits for
    it, never longer than `timeout` seconds; the helper serves each request in a thread.
    """

    def __init__(self, address: str, source: str, timeout: float = 15.0):
        self.source = source
        self.timeout = timeout
        self.host, self.port = parse_address(address)
        self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.name: str | None = None        # how the coordinator knows us: host/user
        self.held: dict[str, Held] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session = None
        self._log = _LabgridLog()
        self._lock = threading.Lock()
        self._release_lock = threading.Lock()  # the plugin's release and close() may meet

    @property
    def where(self) -> str:
        return f"coordinator {self.address} ({self.source})"

    # --- the session ------------------------------------------------------------------------
    def open(self) -> "LabgridSession":
        why = labgrid_missing(client=True)
        if why:
            raise LabError(why)
        logging.getLogger().addFilter(self._log)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="apx-labgrid-loop", daemon=True)
        self._thread.start()
        try:
            self._session = self._connect()
        except BaseException:
            self.close()  # the loop thread and the log filter go again
            raise
        self.name = f"{self._session.gethostname()}/{self._session.getuser()}"
        return self

    def _reachable(self) -> None:
        """A plain TCP connect first: 'connection refused' says more than gRPC's
        'failed to connect to all addresses'."""
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                pass
        except ConnectionRefusedError:
            raise LabError(f"{self.where}: connection refused") from None
        except socket.gaierror as exc:
            raise LabError(f"{self.where}: cannot resolve {self.host}: {exc.strerror}") from None
        except (socket.timeout, TimeoutError):
            raise LabError(f"{self.where}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise LabError(f"{self.where}: {exc.strerror or exc}") from None

    def _connect(self):
        from labgrid.remote.client import ClientSession

        self._reachable()

        async def start():
            session = ClientSession(self.address, asyncio.get_running_loop())
            try:
                await asyncio.wait_for(session.start(), self.timeout)
            except BaseException:
                await self._stop_session(session)
                raise
            return session

        try:
            return self._call(start(), "connect")
        except LabError as exc:
            raise LabError(f"{self.where}: {exc}") from None

    @staticmethod
    async def _stop_session(session) -> None:
        try:
            await asyncio.wait_for(session.stop(), 5)
        except BaseException:
            pass
        try:
            await asyncio.wait_for(session.close(), 5)
        except BaseException:
            pass

    def _alive(self):
        """The session, reconnected if the coordinator connection died meanwhile (a release
        at the end must still reach the coordinator)."""
        with self._lock:
            if self._session is None or self._session.stopping.is_set():
                if self._session is not None:
                    old, self._session = self._session, None
                    self._submit(self._stop_session(old)).result(self.timeout + 11)
                self._session = self._connect()
            return self._session

    def _submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _read(self, fn):
        """fn(session) on the loop thread: labgrid updates its place and resource dicts
        there, and iterating them from another thread could see them change size."""
        session = self._alive()

        async def read():
            return fn(session)

        return self._submit(read()).result(self.timeout + 1)

    def _rpc(self, method: str, request, what: str):
        """One call of the coordinator's gRPC service. The call object must be made on the
        loop's thread (grpc.aio binds it to the running loop), hence the coroutine."""
        session = self._alive()

        async def call():
            return await getattr(session.stub, method)(request)

        return self._call(call(), what)

    def _call(self, coro, what: str):
        """Run `coro` on the session's loop; one-line LabError for every failure."""
        import grpc
        from labgrid.remote.client import Error as ClientError

        future = self._submit(coro)
        try:
            return future.result(self.timeout + 1)
        except (TimeoutError, asyncio.TimeoutError):
            future.cancel()
            raise LabError(f"{what}: no answer within {self.timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise LabError(f"{what}: {exc.details() or exc.code().name}") from None
        except ClientError as exc:  # labgrid's own: "Could not connect to coordinator"
            detail = f" ({self._log.last})" if self._log.last else ""
            raise LabError(f"{what}: {exc}{detail}") from None

    def close(self) -> dict[str, str | None]:
        """End the session and its thread; what we still hold is released first. The
        notes of every place we held (None: released, nothing to say)."""
        notes = {}
        for held in list(self.held.values()):
            notes[held.place] = self.release(held.place)
        if self._loop is not None:
            if self._session is not None:
                session, self._session = self._session, None
                try:
                    self._submit(self._stop_session(session)).result(15)
                except Exception:
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = None
        logging.getLogger().removeFilter(self._log)
        return notes

    # --- looking places up -------------------------------------------------------------------
    def resolve(self, name: str) -> dict:
        """The SSH target of place `name`: its one NetworkService resource."""
        return self._read(lambda session: self._resolve(session, name))

    def _resolve(self, session, name: str) -> dict:
        place = session.places.get(name)
        if place is None:
            known = ", ".join(sorted(session.places)) or "none"
            raise LabError(f"apx-place {name}: no such place on {self.where}; places there: {known}")
        matches = ", ".join(repr(m) for m in place.matches) or "none"
        services = []
        for exporter, groups in sorted(session.resources.items()):
            for group, resources in sorted(groups.items()):
                for rname, entry in sorted(resources.items()):
                    path = (exporter, group, entry.cls, rname)
                    if entry.cls == "NetworkService" and place.hasmatch(path):
                        services.append(("/".join(path), entry))
        if not services:
            raise LabError(f"apx-place {name}: no NetworkService resource matches the place (its matches: "
                           f"{matches}); export one (address, port, username) from the machine's exporter")
        if len(services) > 1:
            raise LabError(f"apx-place {name}: several NetworkService resources match "
                           f"({', '.join(p for p, _ in services)}); the place must match exactly one")
        path, entry = services[0]
        if not entry.avail:
            raise LabError(f"apx-place {name}: its NetworkService {path} is not available (is exporter "
                           f"{path.split('/')[0]} running?)")
        params = entry.params
        try:
            return {"user": params.get("username") or getpass.getuser(), "host": str(params["address"]),
                    "port": int(params.get("port") or 22), "place": name, "resource": path}
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"apx-place {name}: NetworkService {path} has no usable address/port ({exc})") from None

    def acquired(self) -> dict[str, str | None]:
        """Every place and who holds it (None: nobody), as the coordinator says now."""
        return self._read(lambda session: {name: place.acquired for name, place in session.places.items()})

    def reservations(self) -> list[tuple[str, str, str]]:
        """(owner, token, state) of every reservation on the coordinator."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        response = self._rpc("GetReservations", pb.GetReservationsRequest(), "reservations")
        return [(r.owner, r.token, _STATE_NAMES[r.state] if r.state < len(_STATE_NAMES) else str(r.state))
                for r in response.reservations]

    # --- acquire and release -----------------------------------------------------------------------
    def holder(self, name: str) -> str:
        """Who has place `name` now, in words (for waiting and timeout lines)."""
        acquired, changed, reservation, busy = self._read(lambda session: self._state(session, name))
        if acquired is None and changed is None:
            return "the place is gone from the coordinator"
        if acquired:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(changed))
            mine = (" (that is this host and user: a run that did not release it? "
                    f"labgrid-client -p {name} release)") if acquired == self.name else ""
            return f"held by {acquired} since {since}{mine}"
        mine = self.held.get(name)
        if reservation and (mine is None or reservation != mine.token):
            return f"reserved for {self._reservation_owner(reservation)} (reservation {reservation})"
        if busy:
            return f"free, but its resources are held by place {busy}"
        return "free"

    @staticmethod
    def _state(session, name: str):
        """(acquired by, changed, reservation token, place holding its resources) of a place."""
        place = session.places.get(name)
        if place is None:
            return None, None, None, None
        busy = None
        for exporter, groups in session.resources.items():
            for group, resources in groups.items():
                for rname, entry in resources.items():
                    if entry.acquired and entry.acquired != name and place.hasmatch((exporter, group, entry.cls, rname)):
                        busy = entry.acquired
        return place.acquired, place.changed, place.reservation, busy

    def _reservation_owner(self, token: str) -> str:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        try:
            response = self._rpc("GetReservations", pb.GetReservationsRequest(), "reservations")
        except LabError:
            return "someone"
        return next((r.owner for r in response.reservations if r.token == token), "someone")

    def acquire(self, name: str, wait: float, cancel: threading.Event, on_wait=None) -> Held:
        """Hold place `name`: reserve it (labgrid's queue: whoever asked first gets it when it
        becomes free), wait up to `wait` seconds for the reservation, then acquire it.
        `on_wait(text)` is called when we have to wait, and whenever the holder changes."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        began = time.monotonic()
        request = pb.CreateReservationRequest(filters={"main": pb.Reservation.Filter(filter={"name": name})},
                                              prio=0.0)
        token = self._rpc("CreateReservation", request, "reserve").reservation.token
        held = Held(name, token, 0.0)
        self.held[name] = held
        said = None
        try:
            while True:
                poll = self._rpc("PollReservation", pb.PollReservationRequest(token=token),
                                 f"reservation {token}").reservation
                if poll.state in (_EXPIRED, _INVALID):
                    raise LabError(f"reservation {token} became {_STATE_NAMES[poll.state]} while waiting")
                if poll.state == _ALLOCATED and self._try_acquire(name):
                    held.waited = time.monotonic() - began
                    return held
                waited = time.monotonic() - began
                if waited >= wait:
                    raise LabError(f"{self.holder(name)}; still so after waiting {waited:.0f} s "
                                   f"(--apx-place-timeout {wait:g})")
                why = self.holder(name)
                if on_wait is not None and why != said:
                    on_wait(why)
                    said = why
                if cancel.wait(POLL):
                    raise LabError(f"the run ended while waiting for it ({why})")
        except BaseException:
            self._cancel_reservation(held)
            self.held.pop(name, None)
            raise

    def _try_acquire(self, name: str) -> bool:
        """AcquirePlace for an allocated reservation. False when the coordinator could not
        take the place's resources (another place that shares them holds them): keep
        waiting."""
        import grpc
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        session = self._alive()

        async def acquire():
            await session.stub.AcquirePlace(pb.AcquirePlaceRequest(placename=name))
            await session.sync_with_coordinator()  # our view of the place now shows us

        future = self._submit(acquire())
        try:
            future.result(self.timeout + 1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "resources" in (exc.details() or ""):
                return False
            raise LabError(f"acquire: {exc.details() or exc.code().name}") from None
        except TimeoutError:
            future.cancel()
            raise LabError(f"acquire: no answer within {self.timeout:g} s") from None
        return True

    def _cancel_reservation(self, held: Held) -> str | None:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        try:
            self._rpc("CancelReservation", pb.CancelReservationRequest(token=held.token),
                      f"cancel reservation {held.token}")
        except LabError as exc:
            if "does not exist" in str(exc):  # expired and removed meanwhile: nothing to undo
                return None
            return f"reservation {held.token} not cancelled ({exc}); it expires within a minute"
        return None

    def release(self, name: str) -> str | None:
        """Release place `name` (only if we still hold it) and cancel its reservation.
        Never raises: returns what could not be done, in one line, or None."""
        with self._release_lock:
            return self._release(name)

    def _release(self, name: str) -> str | None:
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb
        held = self.held.get(name)
        if held is None or held.released:
            return held.note if held else None
        notes = []
        try:
            session = self._alive()

            async def release():
                # fromuser: the coordinator releases it only if it is still ours
                await session.stub.ReleasePlace(pb.ReleasePlaceRequest(placename=name, fromuser=self.name))
                await session.sync_with_coordinator()

            self._call(release(), "release")
            acquired = self._read(lambda s: self._state(s, name))[0]
            if acquired and acquired != self.name:
                notes.append(f"at the end it was held by {acquired}, not by us: left alone")
        except LabError as exc:
            notes.append(f"NOT released ({exc}); release it with: labgrid-client -x {self.address} -p {name} "
                         "release")
        else:
            held.released = True
        cancelled = self._cancel_reservation(held) if held.released else None
        if cancelled:
            notes.append(cancelled)
        held.note = "; ".join(notes) or None
        return held.note


class _Stop(Exception):
    """SIGTERM in the helper: release what we hold, then exit."""


def serve() -> None:
    """The helper: requests on stdin, one JSON object a line; replies (by "id") and wait
    events on stdout. Ends on {"op": "close"}, when stdin closes (pytest is gone, however
    it went) and on SIGTERM: in every case after releasing every place it holds."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printing (labgrid, gRPC) goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    # Ctrl-C and a hangup are the plugin's to handle (it then closes us in order); the helper
    # runs in a session of its own anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def stop(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    out_lock = threading.Lock()

    def send(obj: dict) -> None:
        with out_lock:
            try:
                proto.write(json.dumps(obj) + "\n")
            except (OSError, ValueError):  # pytest is gone: nobody to tell
                pass

    session: LabgridSession | None = None
    cancels: dict[str, threading.Event] = {}
    workers: list[threading.Thread] = []
    closing: dict | None = None

    def handle(msg: dict) -> None:
        rid, op = msg.get("id"), msg.get("op")
        try:
            if op == "resolve":
                result = session.resolve(msg["name"])
            elif op == "acquire":
                name = msg["name"]
                held = session.acquire(name, float(msg["wait"]), cancels.setdefault(name, threading.Event()),
                                       on_wait=lambda why: send({"event": "wait", "name": name, "text": why}))
                result = {"token": held.token, "waited": held.waited}
            elif op == "release":
                result = {"note": session.release(msg["name"])}
            elif op == "acquired":
                result = session.acquired()
            elif op == "reservations":
                result = session.reservations()
            else:
                raise LabError(f"unknown request {op!r}")
        except LabError as exc:
            send({"id": rid, "error": str(exc)})
        except Exception as exc:  # a bug: still one line, and the helper lives on
            send({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
        else:
            send({"id": rid, "result": result})

    try:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "cancel":
                cancels.setdefault(msg["name"], threading.Event()).set()
            elif op == "open":
                try:
                    session = LabgridSession(msg["address"], msg["source"], float(msg["timeout"])).open()
                except LabError as exc:
                    send({"id": msg.get("id"), "error": str(exc)})
                    break
                send({"id": msg.get("id"), "result": {"name": session.name, "address": session.address}})
            elif op == "close":
                closing = msg
                break
            elif session is not None:
                worker = threading.Thread(target=handle, args=(msg,), daemon=True)
                workers.append(worker)
                worker.start()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        # SIGTERM again now would cut the releases short: they have their own timeouts
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for event in cancels.values():
            event.set()
        for worker in workers:
            worker.join(timeout=(session.timeout * 3 + 5) if session else 5)
        notes = session.close() if session is not None else {}
        if closing is not None:
            send({"id": closing.get("id"), "result": notes})
        proto.close()
