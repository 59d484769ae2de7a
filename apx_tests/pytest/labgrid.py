"""pytest side of labgrid places (registered by apx_tests.pytest.plugin through `pytest_plugins`).

With ``--apx-place NAME`` (repeatable; ini ``apx_places``) the plugin asks the lab's
labgrid coordinator (``--apx-coordinator``, else ``LG_COORDINATOR``) for each place and
takes its SSH target from the place's NetworkService resource. The places join the fleet
of apx_tests.pytest.remote as PlaceHost members, so their cases are that module's
RemoteCaseItems (``test_scenario[place[apx1/root@lab7:22]-kvm-ymm-import]``), split or run
on each as ``--apx-fleet`` says, with the remote outcomes and a JUnit ``apx.place``.

Before the first test, every place that has items is acquired, concurrently, through a
labgrid reservation: a place someone else holds is waited for (a line says who holds
it), up to ``--apx-place-timeout``; a place not had by then makes its items errors with
that one line. Every place is released after its remote cleanup at the end of the
session, also when the run fails or is interrupted (Ctrl-C, SIGTERM, SIGHUP: the latter
two become a KeyboardInterrupt here, so pytest ends the session as for Ctrl-C).

A place that does not exist, a place without a NetworkService, a coordinator that cannot
be reached and a Python without labgrid stop the run before it starts, with one line.
docs/remote.md, "labgrid places".
"""

from __future__ import annotations

import queue
import signal
import threading

import pytest

from ..remote.labgrid import Coordinator, LabError, PlaceHost, PlaceSpec, coordinator_address, labgrid_missing
from .remote import RemoteCaseItem, _seconds, _value, ensure_fleet, fleet_of

DEFAULT_TIMEOUT = 600
_run_key = pytest.StashKey["PlaceRun"]()


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.plugin made the "apx" group
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx")
    group.addoption("--apx-place", action="append", default=None, dest="apx_place", metavar="NAME",
                    help="run the KVM scenarios on this labgrid place (its NetworkService is the SSH target), "
                         "holding the place for the run; repeat for several (ini apx_places)")
    group.addoption("--apx-coordinator", metavar="HOST[:PORT]", default=None, dest="apx_coordinator",
                    help="labgrid coordinator for --apx-place (default: $LG_COORDINATOR, else 127.0.0.1:20408)")
    group.addoption("--apx-place-timeout", metavar="SECONDS", type=float, default=None, dest="apx_place_timeout",
                    help=f"longest wait for a place someone else holds (default {DEFAULT_TIMEOUT})")
    parser.addini("apx_places", type="args", default=[], help="apx_tests: labgrid places (--apx-place)")
    parser.addini("apx_coordinator", default="", help="apx_tests: labgrid coordinator HOST[:PORT]")
    parser.addini("apx_place_timeout", default=str(DEFAULT_TIMEOUT),
                  help="apx_tests: longest wait for a held labgrid place, seconds")


class PlaceRun:
    """The places of this session and the one coordinator session that holds them."""

    def __init__(self, lab: Coordinator, timeout: float):
        self.lab = lab
        self.timeout = timeout
        self.places: dict[PlaceSpec, PlaceHost] = {}
        self.cancel = threading.Event()   # set: stop waiting for places (the run is ending)
        self.signalled: int | None = None
        self._old_handlers: dict[int, object] = {}
        self.closed = False

    # --- SIGTERM/SIGHUP end the session like Ctrl-C, so the places are released -------------
    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[signum] = signal.signal(signum, self._interrupt)

    def _interrupt(self, signum, frame) -> None:
        self.cancel.set()
        if self.signalled is not None:  # already on the way out: let the releases finish
            return
        self.signalled = signum
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: ending the session, releasing the places")

    def restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    # --- acquire, before the first test ------------------------------------------------------
    def acquire_all(self, session: pytest.Session) -> None:
        wanted = {item.host for item in session.items if isinstance(item, RemoteCaseItem)}
        hosts = [remote for spec, remote in self.places.items() if spec in wanted]
        if not hosts:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        verbose = session.config.getoption("verbose") > 0
        lines: queue.Queue[str] = queue.Queue()

        def acquire(remote: PlaceHost) -> None:
            spec = remote.spec
            try:
                held = self.lab.acquire(spec.place, self.timeout, self.cancel, on_wait=lambda why: lines.put(
                    f"{spec.prefix}: {why}; waiting for it (up to {self.timeout:g} s, --apx-place-timeout)"))
                if held.waited >= 1 or verbose:
                    lines.put(f"{spec.prefix}: acquired after {held.waited:.1f} s")
            except LabError as exc:
                remote.acquire_error = exc
                lines.put(f"{spec.prefix}: acquire: {exc}")
            except Exception as exc:  # a bug must still end as one line on the items, not a hang
                remote.acquire_error = LabError(f"{type(exc).__name__}: {exc}")
                lines.put(f"{spec.prefix}: acquire: {remote.acquire_error}")

        threads = [threading.Thread(target=acquire, args=(r,), name=f"apx-place {r.spec.place}", daemon=True)
                   for r in hosts]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads) or not lines.empty():
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if reporter is not None:
                    reporter.write_line(line)
        except BaseException:
            # Ctrl-C or SIGTERM while waiting: stop every wait now (each thread cancels its
            # reservation, or releases nothing it did not get), then let pytest end.
            self.cancel.set()
            for thread in threads:
                thread.join(timeout=self.lab.timeout * 2 + 5)
            raise

    # --- release, after the remote cleanup -------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cancel.set()
        # A signal now would cut a release short and leave a place acquired for good:
        # defer them (every step below has its timeout).
        deferred = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                deferred[signum] = signal.signal(signum, lambda *_: None)
        try:
            self.lab.close()  # releases what PlaceHost._close did not (e.g. a place with no started host)
        finally:
            for signum, handler in deferred.items():
                signal.signal(signum, handler)
            self.restore_signals()


def run_of(config: pytest.Config) -> PlaceRun | None:
    return config.stash.get(_run_key, None)


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.remote: its --apx-host members come first
def pytest_configure(config: pytest.Config) -> None:
    names = config.getoption("apx_place") or config.getini("apx_places")
    if not names or config.getoption("help", False):  # --help configures too: no coordinator for it
        return
    for name in names:
        if names.count(name) > 1:
            raise pytest.UsageError(f"--apx-place {name} given twice")
    why = labgrid_missing()
    if why:
        raise pytest.UsageError(why)
    timeout = _seconds(config, "apx_place_timeout")
    fleet = ensure_fleet(config, "--apx-place")
    address, source = coordinator_address(_value(config, "apx_coordinator"))
    try:
        lab = Coordinator(address, source, timeout=fleet.options.connect_timeout)
        lab.open()
    except LabError as exc:
        raise pytest.UsageError(f"apx-place: {exc}") from None
    run = PlaceRun(lab, timeout)
    try:
        specs = [lab.resolve(name) for name in names]
    except LabError as exc:
        lab.close()
        raise pytest.UsageError(str(exc)) from None
    for spec in specs:
        remote = PlaceHost(spec, fleet.options, fleet.bundle, lab=lab)
        fleet.add(spec, remote)
        run.places[spec] = remote
    config.stash[_run_key] = run
    run.install_signals()


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = run_of(config)
    if run is None:
        return []
    return [f"apx places: {', '.join(s.place for s in run.places)} on {run.lab.where} as {run.lab.name}; "
            f"waiting up to {run.timeout:g} s for a place someone else holds"]


@pytest.hookimpl(tryfirst=True)  # before pytest's own loop runs the first test
def pytest_runtestloop(session: pytest.Session) -> None:
    run = run_of(session.config)
    if run is None or session.config.option.collectonly:
        return
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        return  # pytest's loop stops at the collection errors: nothing will use the places
    run.acquire_all(session)


@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.remote's unconfigure closed the fleet
def pytest_unconfigure(config: pytest.Config) -> None:
    run = run_of(config)
    if run is None:
        return
    fleet = fleet_of(config)
    if fleet is not None:
        fleet.close()  # idempotent: waits for the closes (and releases) already under way
    run.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    run = run_of(config)
    if run is None or not run.lab.held and not any(r.acquire_error for r in run.places.values()):
        return
    terminalreporter.section("apx places")
    for spec, remote in run.places.items():
        held = run.lab.held.get(spec.place)
        if remote.acquire_error is not None:
            terminalreporter.write_line(f"{spec.prefix}: not acquired: {remote.acquire_error}")
        elif held is not None:
            state = "released" if held.released else "still held"
            note = f"; {held.note}" if held.note else ""
            terminalreporter.write_line(f"{spec.prefix}: acquired after {held.waited:.1f} s as {run.lab.name}, "
                                        f"{state}{note}")
