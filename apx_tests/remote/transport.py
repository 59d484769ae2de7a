"""What every way of running the remote agent shares: AgentTransport.

A transport brings a host up in a thread (send the bundle, start the agent), reads the
agent's JSON lines (apx_tests.remote.agent: hello, probe, case, done), hands a case's
result to the test item that waits for it (as long as the agent makes progress) and
closes once, from whichever thread comes first.  Two transports subclass it:

- apx_tests.remote.ssh.RemoteHost: over SSH (paramiko), the agent in a remote temp dir;
- apx_tests.kut.guest.GuestHost: a kernel under test booted in QEMU, the agent its /init
  starts, the records on a serial port.

Every failure is a RemoteError whose str() is one line naming the host and the phase.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..cases import CaseResult


class RemoteError(RuntimeError):
    """A remote host could not do its part; str() is one line naming host and phase."""

    def __init__(self, host, phase: str, message: str, *, text: str | None = None):
        self.host = host
        self.phase = phase
        self.reason = " ".join(str(message).split())
        prefix = getattr(host, "prefix", None) or f"apx-host {host.label}"
        line = text or f"{prefix}: {phase}: {self.reason}"
        super().__init__(" ".join(line.split()))


@dataclass
class Timings:
    acquire: float | None = None  # a labgrid place: from asking for it to holding it
    connect: float | None = None
    upload: float | None = None
    run: float | None = None      # from launching the agent to its "done" line

    def text(self) -> str:
        parts = [f"{name} {value:.2f} s" for name, value in
                 (("acquire", self.acquire), ("connect", self.connect), ("upload", self.upload),
                  ("run", self.run)) if value is not None]
        return ", ".join(parts) or "not started"


class AgentTransport:
    """The agent's side of a host, whatever carries it.

    The subclass (a dataclass) has the fields `hello`, `probe_lines`, `results`, `cases`
    and `timings`, calls _init_transport() from __post_init__, and provides:

    - label, error(phase, message) -> RemoteError
    - _bring_up(): send the bundle and start the agent (in the start thread)
    - _start_failure(exc) -> RemoteError: an unexpected exception of _bring_up, in one line
    - _took(kind, record): what it does with a record beyond the common kinds
    - _result_timeout() -> float: the longest silence while a case runs
    - _ended_without(case_id) -> RemoteError: why the output ended before that case
    - _close(): stop the agent, clean up (runs once)
    """

    THREAD_PREFIX = "apx-agent"   # thread names: f"{THREAD_PREFIX}-<what> {label}"
    STOPPED_AFTER = ""            # in "no result for X: <STOPPED_AFTER><why it broke>"

    def _init_transport(self) -> None:
        self._cond = threading.Condition()
        self._started = threading.Event()
        self._start_error: RemoteError | None = None
        self._broken: RemoteError | None = None
        self._ended = False            # the agent's output ended: nothing more will come
        self._done_record: dict | None = None
        self._last_progress = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._close_done = threading.Event()

    def _spawn(self, target, what: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"{self.THREAD_PREFIX}-{what} {self.label}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    # --- start -------------------------------------------------------------------------
    def start_async(self, case_ids: list[str]) -> None:
        self.cases = list(case_ids)
        self._spawn(self._start, "start")

    def _start(self) -> None:
        try:
            self._bring_up()
        except RemoteError as exc:
            self._start_error = exc
        except Exception as exc:  # a bug here must still be one line, and not hang the items
            self._start_error = self._start_failure(exc)
        finally:
            self._started.set()

    @property
    def start_error(self) -> RemoteError | None:
        return self._start_error if self._started.is_set() else None

    def wait_started(self) -> None:
        """Block until the host is up and the agent started; raise their error (every time)."""
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    # --- collect -------------------------------------------------------------------------
    def _take(self, record: dict) -> None:
        """One record of the agent's (the caller holds self._cond)."""
        kind = record["kind"]
        if kind == "case":
            result = CaseResult.from_json(record)
            self.results[result.id] = result
        elif kind == "hello":
            self.hello = record
        elif kind == "probe":
            self.probe_lines = list(record.get("lines", []))
        elif kind == "done":
            self._done_record = record
        self._took(kind, record)
        self._cond.notify_all()

    def _took(self, kind: str, record: dict) -> None:
        """What the transport does with a record beyond the common kinds (under _cond)."""

    def _end_of_output(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def result(self, case_id: str) -> CaseResult:
        """The case's result, waiting as long as the agent makes progress."""
        self.wait_started()
        timeout = self._result_timeout()
        with self._cond:
            while case_id not in self.results:
                if self._broken is not None:
                    raise self.error(self._broken.phase,
                                     f"no result for {case_id}: {self.STOPPED_AFTER}{self._broken.reason}")
                if self._ended:
                    raise self._ended_without(case_id)
                remaining = self._last_progress + timeout - time.monotonic()
                if remaining <= 0:
                    self._broken = self.error("run", f"no result for {case_id} within {timeout:g} s")
                    break
                self._cond.wait(min(remaining, 1.0))
            else:
                return self.results[case_id]
        self.close()  # stop the silent agent now; the remaining cases fail fast
        raise self._broken

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "fail": 0, "skip": 0}
        for result in self.results.values():
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
        return counts

    # --- the end ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the agent and clean up (the subclass's _close).  Idempotent; never raises
        (what it could not do goes to `cleanup_note`)."""
        with self._cond:
            closing = self._closed
            self._closed = True
        if closing:  # another thread closes: wait for it, so the caller may exit after us
            self._close_done.wait(timeout=60)
            return
        try:
            self._close()
        finally:
            self._close_done.set()
