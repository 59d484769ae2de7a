"""A throwaway OpenSSH server on 127.0.0.1, for testing remote runs on this machine.

    with LocalSshd() as sshd:            # needs root and Debian's openssh-server
        sshd.spec                        # root@127.0.0.1:<free port>
        sshd.known_hosts                 # a known_hosts file listing its host key
        sshd.client_key                  # the private key in its authorized_keys

Everything lives in one private temp directory (host key, user key, authorized_keys,
sshd_config, pid file, log); `sshd -D -e -f <config>` runs in the foreground, listening
on 127.0.0.1 only. stop() ends the server and every session process it started, then
removes the directory. Only processes this object started are signalled (by pid).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .. import process, procfs
from ..procfs import alive
from .hosts import HostSpec

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"  # Debian's sshd refuses to start without it


class SshdUnavailable(RuntimeError):
    """No usable sshd here (not installed, not root); str() is one line."""


def sshd_unavailable_reason() -> str | None:
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (Debian package openssh-server; ci/bootstrap installs it)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not found (Debian package openssh-client)"
    if os.geteuid() != 0:
        return "a test sshd must run as root (it logs users in)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair at `path`; the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return Path(str(path) + ".pub").read_text().strip()


def descendants(pid: int) -> list[int]:
    """Every descendant pid of `pid` (zombies included)."""
    return [p.pid for p in procfs.descendants(pid)]


class LocalSshd:
    def __init__(self, user: str = "root", port: int | None = None):
        reason = sshd_unavailable_reason()
        if reason:
            raise SshdUnavailable(reason)
        self.user = user
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="apx-sshd."))
        self.process: subprocess.Popen | None = None
        try:
            self._prepare()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    # --- files ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        d = self.dir
        os.chmod(d, 0o700)
        self.host_key = d / "ssh_host_ed25519_key"
        self.host_key_line = keygen(self.host_key, "apx-test-sshd-host")
        self.client_key = d / "id_ed25519"
        client_pub = keygen(self.client_key, "apx-test-client")
        self.authorized_keys = d / "authorized_keys"
        self.authorized_keys.write_text(client_pub + "\n")
        self.known_hosts = d / "known_hosts"
        self.pid_file = d / "sshd.pid"
        self.log = d / "sshd.log"
        self.config = d / "sshd_config"
        self._write_config()

    def _write_config(self) -> None:
        """The files that name the port: known_hosts and sshd_config."""
        self.known_hosts.write_text(self.known_hosts_line() + "\n")
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AllowUsers {self.user}",
            "StrictModes no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PermitTunnel no",
            "MaxStartups 20:30:60",
            "MaxSessions 20",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            "",
        ]))

    def authorize(self, public_key_line: str) -> None:
        """Let another key log in too (e.g. one client key for a fleet of test servers)."""
        with open(self.authorized_keys, "a") as f:
            f.write(public_key_line.strip() + "\n")

    def known_hosts_line(self, key_line: str | None = None) -> str:
        key_type, key_b64 = (key_line or self.host_key_line).split()[:2]
        return f"[127.0.0.1]:{self.port} {key_type} {key_b64}"

    @property
    def spec(self) -> HostSpec:
        return HostSpec(self.user, "127.0.0.1", self.port)

    @property
    def host_arg(self) -> str:
        return self.spec.label

    # --- lifetime --------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "LocalSshd":
        for attempt in range(3):
            try:
                return self._start(timeout)
            except SshdUnavailable as exc:
                # free_port() is only free until someone else binds it: try another one.
                if self._fixed_port or "Bind to port" not in str(exc) or attempt == 2:
                    self.stop()  # removes the directory; the caller gets the one-line reason
                    raise
                self.port = free_port()
                self._write_config()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "LocalSshd":
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                status, self.process = self.process.returncode, None
                raise SshdUnavailable(f"sshd exited with status {status}: {' | '.join(tail)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.settimeout(2)
                    if sock.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SshdUnavailable(f"sshd on 127.0.0.1:{self.port} not answering after {timeout:g} s")

    def pids(self) -> list[int]:
        """The server and every process it started that is still alive."""
        if self.process is None or not alive(self.process.pid):
            return []
        return [self.process.pid, *descendants(self.process.pid)]

    def session_pids(self) -> list[int]:
        return [pid for pid in self.pids() if pid != getattr(self.process, "pid", None)]

    def stop(self) -> None:
        if self.process is not None:
            victims = self.pids()
            for pid in reversed(victims):  # sessions first, then the listener
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            deadline = time.monotonic() + 5
            while any(alive(pid) for pid in victims) and time.monotonic() < deadline:
                time.sleep(0.05)
            process.kill_survivors(pid for pid in victims if alive(pid))
        shutil.rmtree(self.dir, ignore_errors=True)
        # PRIVSEP_DIR stays: it is Debian's standard (empty) runtime directory, and another
        # sshd started meanwhile may need it.

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "LocalSshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# Set once per test run (tests/conftest.py) and inherited by every process the run starts,
# directly or through a child pytest: a leak check that asks for it sees this run's
# processes only, not those of another run on the same host.
RUN_TAG = "APX_TEST_RUN"


def processes_matching(*needles: str, this_run: bool = False) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains a needle;
    with `this_run`, only those started under this run's RUN_TAG."""
    found = []
    tag = os.environ.get(RUN_TAG) if this_run else None
    for pid, raw in procfs.cmdlines():
        if pid == os.getpid():
            continue
        if this_run and (tag is None or not procfs.has_env(pid, RUN_TAG, tag)):
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if cmdline and alive(pid) and any(n in cmdline for n in needles):
            found.append((pid, cmdline))
    return found


# --- running the apx suite in a child pytest and reading its JUnit report -----------------------

_REMOTE_NAME = re.compile(r"\[remote\[(?P<host>[^\]]+)\]-(?P<case>[^\[\]]+)\]$")
_PLACE_NAME = re.compile(r"\[place\[(?P<place>[^/\]]+)/(?P<host>[^\]]+)\]-(?P<case>[^\[\]]+)\]$")
_LOCAL_NAME = re.compile(r"\[(?P<case>[^\[\]]+)\]$")


@dataclass(frozen=True)
class Outcome:
    case: str
    host: str | None      # None for a local item
    outcome: str          # passed | failed | skipped | error
    message: str
    place: str | None = None  # a labgrid place's item (`...[place[PLACE/HOST]-CASE]`)


def junit_outcomes(path: str | Path) -> list[Outcome]:
    """The scenario items of a JUnit file: remote (`...[remote[HOST]-CASE]`), on a labgrid
    place (`...[place[PLACE/HOST]-CASE]`) and local."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        placed = _PLACE_NAME.search(name)
        match = placed or _REMOTE_NAME.search(name)
        host = match["host"] if match else None
        match = match or _LOCAL_NAME.search(name)
        if not match:
            continue
        outcome, message = "passed", ""
        for tag, word in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            child = case.find(tag)
            if child is not None:
                outcome, message = word, child.get("message", "")
                break
        out.append(Outcome(match["case"], host, outcome, message, placed["place"] if placed else None))
    return out


def run_apx_suite(repo: str | Path, junit: str | Path, *args: str, timeout: float = 300,
                  **popen) -> subprocess.CompletedProcess:
    """`pytest -m apx apx_tests/suite --apx-backend kvm --junitxml JUNIT ARGS` in a child."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "apx_tests/suite",
            "--apx-backend", "kvm", f"--junitxml={junit}", *args]
    return subprocess.run(argv, cwd=str(repo), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **popen)


# --- a labgrid coordinator and exporter on 127.0.0.1 ---------------------------------------------

LABGRID_TOOLS = ("labgrid-coordinator", "labgrid-exporter", "labgrid-client")


def labgrid_tool(name: str) -> str | None:
    """A labgrid console script: beside this Python (a venv), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if os.access(here, os.X_OK) else shutil.which(name)


def labgrid_unavailable_reason(*, quick: bool = False) -> str | None:
    """Why a local labgrid cannot run here, in one line; None when it can.  `quick`: decided
    from the installed package (its import spec and version) without importing labgrid,
    about a second of imports: what a module-level skipif needs at collection time, where
    every run would pay for it (LocalLabgrid imports it for real before it starts)."""
    if quick:
        why = _labgrid_not_installed()
    else:
        from .labgrid import labgrid_missing
        why = labgrid_missing()
    if why:
        return why
    missing = [name for name in LABGRID_TOOLS if labgrid_tool(name) is None]
    if missing:
        return f"{', '.join(missing)} not found beside {sys.executable} or on PATH (pip install labgrid)"
    return None


def _labgrid_not_installed() -> str | None:
    from .labgrid import INSTALL_HINT
    try:
        found = importlib.util.find_spec("labgrid") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"--apx-place needs labgrid, which this Python does not have: {INSTALL_HINT}"
    try:
        major = int(importlib.metadata.version("labgrid").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = None
    if major is not None and major < 24:  # before 24.0 the coordinator spoke WAMP, not gRPC
        return f"--apx-place needs labgrid >= 24 (the gRPC coordinator): {INSTALL_HINT}"
    return None


class LabgridUnavailable(RuntimeError):
    """The coordinator or exporter would not start; str() is one line."""


class LocalLabgrid:
    """A labgrid coordinator on 127.0.0.1:<free port> and one exporter ("apxlab") that
    exports a NetworkService per place (group ``apxhost-<place>``), and the places, each
    matching its group. The places are written to the coordinator's places.yaml before
    it starts (what `labgrid-client create` + `add-match` would store), which saves a
    client start (1-2 s of imports) per call.

        with LocalLabgrid({"a": sshd_a.spec, "b": sshd_b.spec}) as lab:
            lab.address                      # 127.0.0.1:<port>
            lab.client("-p", "a", "acquire", user="alice")

    Everything lives in one private temp directory; stop() ends both processes (by pid,
    TERM then KILL) and removes it.
    """

    EXPORTER = "apxlab"

    def __init__(self, places: dict[str, HostSpec], port: int | None = None):
        reason = labgrid_unavailable_reason()
        if reason:
            raise LabgridUnavailable(reason)
        self.places = dict(places)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="apx-labgrid."))
        self.coordinator: subprocess.Popen | None = None
        self.exporter: subprocess.Popen | None = None
        self.spawned: list[int] = []  # every pid started here, for "nothing left" checks after stop()
        os.chmod(self.dir, 0o700)
        self.exporter_yaml = self.dir / "exporter.yaml"
        self.exporter_yaml.write_text("".join(
            f"apxhost-{name}:\n  NetworkService:\n    address: {spec.host}\n    port: {spec.port}\n"
            f"    username: {spec.user}\n" for name, spec in self.places.items()))
        (self.dir / "places.yaml").write_text("".join(
            f"{name}:\n  matches:\n  - exporter: {self.EXPORTER}\n    group: apxhost-{name}\n    cls: '*'\n"
            for name in self.places))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def group_pattern(self, name: str) -> str:
        return f"{self.EXPORTER}/apxhost-{name}/*"

    # --- lifetime -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "LocalLabgrid":
        try:
            for attempt in range(3):
                try:
                    self._start_coordinator(timeout)
                    break
                except LabgridUnavailable as exc:
                    # free_port() is only free until someone else binds it: try another one
                    if self._fixed_port or "bind" not in str(exc).lower() or attempt == 2:
                        raise
                    self.port = free_port()
            self._start_exporter(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LG_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.dir / log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env, start_new_session=True)
        self.spawned.append(proc.pid)
        return proc

    def log_text(self, log: str) -> str:
        try:
            return (self.dir / log).read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self, log: str) -> str:
        return " | ".join(self.log_text(log).strip().splitlines()[-3:])

    def _start_coordinator(self, timeout: float) -> None:
        (self.dir / "coordinator.log").write_bytes(b"")
        self.coordinator = self._spawn([labgrid_tool("labgrid-coordinator"), "-l", self.address], "coordinator.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                status, self.coordinator = self.coordinator.returncode, None
                raise LabgridUnavailable(f"labgrid-coordinator exited with status {status}: "
                                         f"{self._tail('coordinator.log')}")
            if f"listening on 127.0.0.1:{self.port}" in self.log_text("coordinator.log"):
                return
            time.sleep(0.05)
        raise LabgridUnavailable(f"labgrid-coordinator on {self.address} not ready after {timeout:g} s: "
                                 f"{self._tail('coordinator.log')}")

    def _start_exporter(self, timeout: float) -> None:
        self.exporter = self._spawn([labgrid_tool("labgrid-exporter"), "-c", self.address, "-n", self.EXPORTER,
                                     "--hostname", "127.0.0.1", str(self.exporter_yaml)], "exporter.log")
        from .labgrid import Coordinator, LabError
        deadline = time.monotonic() + timeout
        lab = Coordinator(self.address, "test", timeout=10).open()
        try:
            while time.monotonic() < deadline:
                if self.exporter.poll() is not None:
                    status, self.exporter = self.exporter.returncode, None
                    raise LabgridUnavailable(f"labgrid-exporter exited with status {status}: "
                                             f"{self._tail('exporter.log')}")
                try:
                    if all(lab.resolve(name) for name in self.places):
                        return
                except LabError:
                    time.sleep(0.1)
            raise LabgridUnavailable(f"labgrid-exporter's resources not on the coordinator after {timeout:g} s: "
                                     f"{self._tail('exporter.log')}")
        finally:
            lab.close()

    def client(self, *args: str, user: str | None = None, host: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        """`labgrid-client -x ADDRESS ARGS`, as LG_USERNAME=user / LG_HOSTNAME=host if given
        (another client, as the coordinator sees it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LG_")}
        if user:
            env["LG_USERNAME"] = user
        if host:
            env["LG_HOSTNAME"] = host
        return subprocess.run([labgrid_tool("labgrid-client"), "-x", self.address, *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in (self.exporter, self.coordinator) if p is not None]

    def pids(self) -> list[int]:
        """Coordinator, exporter and anything they started, while alive."""
        out = []
        for proc in self.processes():
            if alive(proc.pid):
                out += [proc.pid, *descendants(proc.pid)]
        return out

    def stop(self) -> None:
        for proc in self.processes():  # the exporter first: it would only reconnect
            victims = [proc.pid, *descendants(proc.pid)] if alive(proc.pid) else []
            for pid in reversed(victims):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)  # the coordinator gives its clients up to 5 s to finish
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            process.kill_survivors(pid for pid in victims if alive(pid))
        self.exporter = self.coordinator = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalLabgrid":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
