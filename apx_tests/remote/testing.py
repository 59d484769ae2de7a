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


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    out, pending = [], [pid]
    while pending:
        for kid in _children(pending.pop()):
            out.append(kid)
            pending.append(kid)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
            for pid in victims:
                if alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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


def processes_matching(*needles: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains a needle."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline and alive(int(entry)) and any(n in cmdline for n in needles):
            found.append((int(entry), cmdline))
    return found


# --- running the apx suite in a child pytest and reading its JUnit report -----------------------

_REMOTE_NAME = re.compile(r"\[remote\[(?P<host>[^\]]+)\]-(?P<case>[^\[\]]+)\]$")
_LOCAL_NAME = re.compile(r"\[(?P<case>[^\[\]]+)\]$")


@dataclass(frozen=True)
class Outcome:
    case: str
    host: str | None      # None for a local item
    outcome: str          # passed | failed | skipped | error
    message: str


def junit_outcomes(path: str | Path) -> list[Outcome]:
    """The scenario items of a JUnit file: remote (`...[remote[HOST]-CASE]`) and local."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        match = _REMOTE_NAME.search(name)
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
        out.append(Outcome(match["case"], host, outcome, message))
    return out


def run_apx_suite(repo: str | Path, junit: str | Path, *args: str, timeout: float = 300,
                  **popen) -> subprocess.CompletedProcess:
    """`pytest -m apx apx_tests/suite --apx-backend kvm --junitxml JUNIT ARGS` in a child."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "apx", "apx_tests/suite",
            "--apx-backend", "kvm", f"--junitxml={junit}", *args]
    return subprocess.run(argv, cwd=str(repo), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **popen)
