"""pytest side of remote runs (registered by apx_tests.pytest.plugin through `pytest_plugins`).

With ``--apx-host USER@HOST[:PORT]`` (repeatable; ini ``apx_hosts``) every collected KVM
scenario case (a test taking the ``apx_case`` fixture with a ``kvm-...`` case) is replaced
by a RemoteCaseItem named ``<test>[remote[<host>]-<case id>]``, e.g.
``test_scenario[remote[root@127.0.0.1:2222]-kvm-ymm-import]``. QEMU cases stay local.

A fleet (several hosts): ``--apx-fleet split`` (default) deals the cases out round-robin in
collection order, one host per case; ``--apx-fleet each`` runs every case on every host.
All hosts are started together when the first remote item runs (connect, upload, launch
in parallel threads), so the hosts work concurrently while pytest reports in order.

Outcomes are the remote ones: pass; skip with the same reason (for the apx bank,
--apx-require turns it into a failure, as locally); failure with the same lines. The
remote probe and the case's facts are attached to each report (section "apx remote",
JUnit properties apx.remote.*). Infrastructure problems (connect, upload, run, collect)
are errors of the items, in one line naming host and phase.
"""

from __future__ import annotations

import os
import threading

import pytest

from ..cases import CaseId
from ..remote.hosts import HostSpec, HostSpecError, parse_hosts
from ..remote.ssh import RemoteError, RemoteHost, SshOptions
from .options import apx_cpu_profile, apx_skip_or_fail

FLEET_MODES = ("split", "each")
_fleet_key = pytest.StashKey["Fleet"]()


# --- options ------------------------------------------------------------------------------

@pytest.hookimpl(trylast=True)  # after apx_tests.pytest.plugin made the "apx" group
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apx")
    group.addoption("--apx-host", action="append", default=None, dest="apx_host", metavar="USER@HOST[:PORT]",
                    help="run the KVM scenarios on this host over SSH; repeat for a fleet (ini apx_hosts)")
    group.addoption("--apx-fleet", choices=FLEET_MODES, default=None, dest="apx_fleet",
                    help="with several --apx-host: split the cases round-robin (default) or run each "
                         "case on every host")
    group.addoption("--apx-known-hosts", metavar="FILE", default=None, dest="apx_known_hosts",
                    help="known_hosts file to check host keys against (default ~/.ssh/known_hosts)")
    group.addoption("--apx-host-insecure", action="store_true", default=None, dest="apx_host_insecure",
                    help="accept any host key (paramiko WarningPolicy); for throwaway lab hosts only")
    group.addoption("--apx-ssh-key", metavar="FILE", default=None, dest="apx_ssh_key",
                    help="private key for the SSH login (the ssh agent is tried too)")
    group.addoption("--apx-ssh-timeout", metavar="SECONDS", type=float, default=None, dest="apx_ssh_timeout",
                    help="timeout for connecting, authenticating and each SSH command (default 15)")
    group.addoption("--apx-remote-timeout", metavar="SECONDS", type=float, default=None,
                    dest="apx_remote_timeout",
                    help="longest time without any result from a remote host (default 300)")
    group.addoption("--apx-remote-python", metavar="COMMAND", default=None, dest="apx_remote_python",
                    help="python (>= 3.11) on the remote hosts (default python3)")
    parser.addini("apx_hosts", type="args", default=[], help="apx_tests: remote hosts (USER@HOST[:PORT] ...)")
    parser.addini("apx_fleet", default="split", help="apx_tests: split or each")
    parser.addini("apx_known_hosts", default="", help="apx_tests: known_hosts file for --apx-host")
    parser.addini("apx_host_insecure", type="bool", default=False, help="apx_tests: accept any host key")
    parser.addini("apx_ssh_key", default="", help="apx_tests: private key for --apx-host")
    parser.addini("apx_ssh_timeout", default="15", help="apx_tests: SSH timeout in seconds")
    parser.addini("apx_remote_timeout", default="300", help="apx_tests: remote silence timeout in seconds")
    parser.addini("apx_remote_python", default="python3", help="apx_tests: remote python command")


def _value(config: pytest.Config, name: str):
    value = config.getoption(name)
    return config.getini(name) if value is None else value


def _path(config: pytest.Config, value: str | None) -> str | None:
    if not value:
        return None
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else str(config.invocation_params.dir / value)


def _seconds(config: pytest.Config, name: str) -> float:
    value = _value(config, name)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{name}: {value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise pytest.UsageError(f"{name}: must be > 0, got {value}")
    return seconds


def ssh_options(config: pytest.Config) -> SshOptions:
    return SshOptions(
        known_hosts=_path(config, _value(config, "apx_known_hosts")),
        insecure=bool(_value(config, "apx_host_insecure")),
        key_filename=_path(config, _value(config, "apx_ssh_key")),
        connect_timeout=_seconds(config, "apx_ssh_timeout"),
        run_timeout=_seconds(config, "apx_remote_timeout"),
        python=_value(config, "apx_remote_python") or "python3",
        cpu_profile=apx_cpu_profile(config),
    )


def pytest_configure(config: pytest.Config) -> None:
    texts = config.getoption("apx_host") or config.getini("apx_hosts")
    if not texts:
        return
    try:
        hosts = parse_hosts(texts)
    except HostSpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    fleet = ensure_fleet(config, "--apx-host")
    for spec in hosts:
        fleet.add(spec)


def ensure_fleet(config: pytest.Config, option: str) -> "Fleet":
    """This session's fleet, made (and its options checked) by the first option that adds
    members to it: --apx-host here, --apx-place in apx_tests.pytest.labgrid."""
    fleet = fleet_of(config)
    if fleet is not None:
        return fleet
    mode = _value(config, "apx_fleet")
    if mode not in FLEET_MODES:
        raise pytest.UsageError(f"apx_fleet: {mode!r}; choose from {', '.join(FLEET_MODES)}")
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError(f"{option} does not combine with pytest-xdist (-n): remote hosts already "
                                f"run in parallel; give several {option} instead (docs/remote.md)")
    options = ssh_options(config)
    if options.key_filename and not os.path.isfile(options.key_filename):
        raise pytest.UsageError(f"--apx-ssh-key {options.key_filename}: no such file")
    if options.known_hosts and not os.path.isfile(options.known_hosts):
        raise pytest.UsageError(f"--apx-known-hosts {options.known_hosts}: no such file")
    fleet = config.stash[_fleet_key] = Fleet([], options, mode)
    return fleet


def fleet_of(config: pytest.Config) -> "Fleet | None":
    return config.stash.get(_fleet_key, None)


def pytest_report_header(config: pytest.Config) -> list[str]:
    fleet = fleet_of(config)
    if fleet is None:
        return []
    keys = ("NOT checked (--apx-host-insecure)" if fleet.options.insecure
            else f"checked against {fleet.options.known_hosts_path}")
    how = "each case on every host" if fleet.mode == "each" else "cases split round-robin"
    return [f"apx remote: KVM cases on {', '.join(h.title for h in fleet.hosts)} ({how}); host keys {keys}"]


# --- the fleet ------------------------------------------------------------------------------

class Fleet:
    """The remote hosts of this session; started once, together, by the first remote item."""

    def __init__(self, hosts: list[HostSpec], options: SshOptions, mode: str):
        self.hosts: list[HostSpec] = []
        self.options = options
        self.mode = mode
        self._lock = threading.Lock()
        self._bundle = None
        self.remotes: dict[HostSpec, RemoteHost] = {}
        self.started = False
        for spec in hosts:
            self.add(spec)

    def add(self, spec: HostSpec, remote: RemoteHost | None = None) -> None:
        """A member: a host (--apx-host), or a RemoteHost subclass that does more around the
        SSH run (a labgrid place acquires the machine first and releases it after)."""
        if spec in self.remotes:
            raise pytest.UsageError(f"{spec.prefix} given twice")
        self.hosts.append(spec)
        self.remotes[spec] = remote or RemoteHost(spec, self.options, self.bundle)

    def bundle(self):
        from ..remote.bundle import build_bundle
        with self._lock:
            if self._bundle is None:
                self._bundle = build_bundle()
            return self._bundle

    def assign(self, index: int) -> list[HostSpec]:
        return list(self.hosts) if self.mode == "each" else [self.hosts[index % len(self.hosts)]]

    def ensure_started(self, session: pytest.Session) -> None:
        with self._lock:
            if self.started:
                return
            self.started = True
        plan: dict[HostSpec, list[str]] = {}
        for item in session.items:
            if isinstance(item, RemoteCaseItem):
                ids = plan.setdefault(item.host, [])
                if item.case.id not in ids:
                    ids.append(item.case.id)
        for spec, ids in plan.items():
            self.remotes[spec].start_async(ids)

    def close(self) -> None:
        threads = [threading.Thread(target=r.close, daemon=True) for r in self.remotes.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(30.0, self.options.connect_timeout * 3))


# --- collection: KVM cases become remote items -------------------------------------------------

def _kvm_case(item: pytest.Item) -> CaseId | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("apx_case") if callspec is not None else None
    return case if isinstance(case, CaseId) and case.backend == "kvm" else None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so both apply to the remote items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    fleet = fleet_of(config)
    if fleet is None:
        return
    out, index, seen = [], 0, set()
    for item in items:
        case = _kvm_case(item)
        if case is None:
            out.append(item)
            continue
        key = (item.parent.nodeid, item.originalname, case)
        if key in seen:  # the same case under another parametrization: one remote run is enough
            continue
        seen.add(key)
        for host in fleet.assign(index):
            out.append(RemoteCaseItem.from_parent(
                item.parent, name=f"{item.originalname}[{host.item_tag}-{case.id}]",
                case=case, host=host, origin=item))
        index += 1
    items[:] = out


def _error_of(call) -> str | None:
    """The RemoteError of `call` as its one line (raised outside the except block, so the
    report shows no chained exception)."""
    try:
        call()
    except RemoteError as exc:
        return str(exc)
    return None


class RemoteCaseItem(pytest.Item):
    """One scenario case run on a remote host; its outcome is the remote outcome."""

    # No fixtures. Said explicitly because other plugins read it from every item: labgrid's
    # (loaded whenever labgrid is installed) fails each item without it (AttributeError).
    fixturenames: tuple[str, ...] = ()

    def __init__(self, *, case: CaseId, host: HostSpec, origin: pytest.Item, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.host = host
        self._origin_info = origin.reportinfo()
        for mark in origin.own_markers:
            if mark.name != "parametrize":
                self.add_marker(mark)
        self.keywords[case.id] = True

    def reportinfo(self):
        path, lineno, _ = self._origin_info
        return path, lineno, self.name

    def _remote(self) -> RemoteHost:
        return fleet_of(self.config).remotes[self.host]

    def setup(self) -> None:
        fleet_of(self.config).ensure_started(self.session)
        error = _error_of(self._remote().wait_started)
        if error:
            pytest.fail(error, pytrace=False)

    def runtest(self) -> None:
        remote = self._remote()
        box = []
        error = _error_of(lambda: box.append(remote.result(self.case.id)))
        if error:
            pytest.fail(error, pytrace=False)
        result = box[0]
        self._attach(remote, result)
        if result.outcome == "pass":
            return
        if result.outcome == "skip":
            if result.require_applies:
                apx_skip_or_fail(result.message, self.config)
            raise pytest.skip.Exception(result.message, _use_item_location=True)
        pytest.fail(result.message or f"{self.case.id}: failed on {self.host.label}", pytrace=False)

    def _attach(self, remote: RemoteHost, result) -> None:
        self.user_properties.append(("apx.remote.host", self.host.label))
        self.user_properties.extend(self.host.junit_properties())
        self.user_properties.append(("apx.remote.duration", f"{result.duration:.6f}"))
        for key, value in sorted(result.facts.items()):
            if value is not None:
                self.user_properties.append((f"apx.remote.{key}", str(value)))
        lines = [f"host: {self.host.title} (agent pid {remote.hello.get('pid', '?')}, "
                 f"python {remote.hello.get('python', '?')}, hostname {remote.hello.get('hostname', '?')})",
                 f"case: {result.id} {result.outcome} in {result.duration:.3f} s"]
        lines += [f"fact {k}: {v}" for k, v in sorted(result.facts.items())]
        lines += ["probe: " + line for line in remote.probe_lines]
        if result.traceback:
            lines += ["remote traceback:", *result.traceback.rstrip().splitlines()]
        self.add_report_section("call", "apx remote", "\n".join(lines))


# --- the end: nothing left running remotely -------------------------------------------------------

def pytest_sessionfinish(session: pytest.Session) -> None:
    fleet = fleet_of(session.config)
    if fleet is not None:
        fleet.close()


def pytest_unconfigure(config: pytest.Config) -> None:
    fleet = fleet_of(config)
    if fleet is not None:
        fleet.close()  # idempotent; covers a session that ended before sessionfinish


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    fleet = fleet_of(config)
    if fleet is None or not fleet.started:
        return
    terminalreporter.section("apx remote")
    for remote in fleet.remotes.values():
        if not remote.cases:
            continue
        c = remote.counts()
        line = (f"{remote.label}: {len(remote.results)}/{len(remote.cases)} cases reported "
                f"({c['pass']} passed, {c['fail']} failed, {c['skip']} skipped); {remote.timings.text()}")
        terminalreporter.write_line(line)
        if remote.start_error is not None:
            terminalreporter.write_line(str(remote.start_error))
        if remote.cleanup_note:
            terminalreporter.write_line(f"{remote.label}: {remote.cleanup_note}")
        if remote.probe_lines and config.getoption("verbose") > 0:
            for probe_line in remote.probe_lines:
                terminalreporter.write_line(f"{remote.label} probe: {probe_line}")
