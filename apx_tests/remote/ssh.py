"""One remote host: connect (paramiko, host key checked), upload the bundle into a private
temp dir, run the agent, collect its JSON lines, clean up.

Every failure is a RemoteError whose str() is one line naming the host and the phase:

    apx-host root@10.0.0.5:22: connect: connection refused
    apx-host root@10.0.0.5:22: host key not in known_hosts (connect: ...)
    apx-host root@10.0.0.5:22: upload: SFTP unavailable: ...
    apx-host root@10.0.0.5:22: run: no result for kvm-ymm-import within 300 s
    apx-host root@10.0.0.5:22: collect: connection lost before kvm-ymm-import was reported

Nothing is left behind on the remote host: the agent runs as the leader of its own process
group (sshd starts each session with setsid) and removes its directory when it exits;
close() kills that group (TERM, then KILL) and removes the directory again; if the
connection is gone by then, the agent still exits on its own when sshd closes its stdin.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shlex
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .bundle import BUNDLE_NAME, Bundle
from ..cases import CaseResult
from .hosts import HostSpec
from .transport import AgentTransport, RemoteError, Timings

PHASES = ("connect", "upload", "run", "collect")
PID_MARKER = "apx-agent-pid"
REMOTE_DIR_PREFIX = "apx-remote."


@dataclass
class SshOptions:
    known_hosts: str | None = None      # None: ~/.ssh/known_hosts
    insecure: bool = False              # accept any host key (paramiko WarningPolicy)
    key_filename: str | None = None     # private key; the ssh agent is tried as well
    connect_timeout: float = 15.0       # TCP connect, SSH banner, auth, each command
    run_timeout: float = 300.0          # longest silence from the agent while a case runs
    python: str = "python3"             # the remote interpreter (a command, may have args)
    cpu_profile: str = "host"           # --apx-cpu, applied by the agent's backends

    @property
    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")


def _fingerprint(key) -> str:
    try:
        return f"{key.get_name()} {key.fingerprint}"
    except Exception:
        return key.get_name()


class _UnknownHostKey(Exception):
    def __init__(self, hostname: str, key):
        super().__init__(hostname)
        self.hostname = hostname
        self.key = key


def _reject_policy():
    import paramiko

    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        """paramiko's RejectPolicy, but keeping the offered key for the message."""

        def missing_host_key(self, client, hostname, key):
            raise _UnknownHostKey(hostname, key)

    return RejectUnknown()


def _quiet_paramiko() -> None:
    """paramiko logs transport errors with tracebacks; ours say the same in one line."""
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False


@dataclass
class RemoteHost(AgentTransport):
    spec: HostSpec
    options: SshOptions
    bundle: Callable[[], Bundle]

    client: object = None
    channel: object = None
    remote_dir: str | None = None
    agent_pgid: int | None = None
    hello: dict = field(default_factory=dict)
    probe_lines: list[str] = field(default_factory=list)
    probe_facts: dict = field(default_factory=dict)
    results: dict[str, CaseResult] = field(default_factory=dict)
    stray: deque = field(default_factory=lambda: deque(maxlen=20))
    stderr: deque = field(default_factory=lambda: deque(maxlen=50))
    timings: Timings = field(default_factory=Timings)
    cases: list[str] = field(default_factory=list)
    cleanup_note: str | None = None

    THREAD_PREFIX = "apx-remote"
    STOPPED_AFTER = "the agent was stopped after "

    def __post_init__(self) -> None:
        self._init_transport()
        self._launched_at: float | None = None

    @property
    def label(self) -> str:
        return self.spec.title

    def error(self, phase: str, message: str, **kw) -> RemoteError:
        return RemoteError(self.spec, phase, message, **kw)

    # --- start: connect, upload, launch ------------------------------------------------
    def prepare(self) -> None:
        """Before connecting: nothing for a plain host (a labgrid place checks that it holds
        the place, apx_tests.remote.labgrid)."""

    def _bring_up(self) -> None:
        self.prepare()
        self.connect()
        self.upload()
        if self._closed:
            raise self.error("run", "the session ended before the agent was started")
        self.launch()

    def _start_failure(self, exc: Exception) -> RemoteError:
        return self.error("connect" if self.client is None else "run", f"{type(exc).__name__}: {exc}")

    def connect(self) -> None:
        import paramiko
        _quiet_paramiko()
        opts, spec = self.options, self.spec
        began = time.monotonic()
        client = paramiko.SSHClient()
        if opts.insecure:
            client.set_missing_host_key_policy(paramiko.WarningPolicy())
        else:
            path = opts.known_hosts_path
            if os.path.isfile(path):
                try:
                    client.load_system_host_keys(path)  # "system": never written back
                except (OSError, paramiko.SSHException) as exc:
                    raise self.error("connect", f"cannot read known_hosts {path}: {exc}") from None
            client.set_missing_host_key_policy(_reject_policy())
        try:
            client.connect(spec.host, spec.port, username=spec.user,
                           key_filename=opts.key_filename, allow_agent=True,
                           look_for_keys=opts.key_filename is None,
                           timeout=opts.connect_timeout, banner_timeout=opts.connect_timeout,
                           auth_timeout=opts.connect_timeout, channel_timeout=opts.connect_timeout)
        except BaseException as exc:
            client.close()
            raise self._connect_error(exc) from None
        transport = client.get_transport()
        transport.set_keepalive(15)
        self.client = client
        self.timings.connect = time.monotonic() - began

    def _connect_error(self, exc: BaseException) -> RemoteError:
        import paramiko
        opts, spec = self.options, self.spec
        path = opts.known_hosts_path
        if isinstance(exc, _UnknownHostKey):
            where = f"no entry for {spec.known_hosts_name} in {path}" if os.path.isfile(path) else f"{path} does not exist"
            return self.error("connect", "", text=(
                f"{self.spec.prefix}: host key not in known_hosts (connect: {where}; the server offers "
                f"{_fingerprint(exc.key)}; check it and add it, e.g. with ssh-keyscan, or pass --apx-host-insecure)"))
        if isinstance(exc, paramiko.BadHostKeyException):
            return self.error("connect", "", text=(
                f"{self.spec.prefix}: host key not in known_hosts (connect: {path} lists "
                f"{_fingerprint(exc.expected_key)} for {spec.known_hosts_name}, the server offers "
                f"{_fingerprint(exc.key)}: the host key changed or someone is in between)"))
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            codes = {getattr(e, "errno", None) for e in exc.errors.values()}
            if codes == {errno.ECONNREFUSED}:
                return self.error("connect", f"connection refused ({spec.host} port {spec.port})")
            return self.error("connect", f"cannot reach {spec.host} port {spec.port}: "
                              + "; ".join(os.strerror(c) if c else "error" for c in codes))
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return self.error("connect", f"timed out after {opts.connect_timeout:g} s")
        if isinstance(exc, paramiko.AuthenticationException):
            tried = ([f"key {opts.key_filename}"] if opts.key_filename else ["~/.ssh/id_* keys"]) + ["the ssh agent"]
            return self.error("connect", f"authentication as {spec.user} failed ({str(exc).rstrip('.')}; tried {', '.join(tried)})")
        if isinstance(exc, socket.gaierror):
            return self.error("connect", f"cannot resolve {spec.host}: {exc.strerror}")
        if isinstance(exc, OSError):
            return self.error("connect", exc.strerror or str(exc))
        if isinstance(exc, paramiko.SSHException):
            text = str(exc)
            if "timeout" in text.lower() or "banner" in text.lower():
                return self.error("connect", f"{text} (after {opts.connect_timeout:g} s)")
            return self.error("connect", text)
        if isinstance(exc, Exception):
            return self.error("connect", f"{type(exc).__name__}: {exc}")
        raise exc  # KeyboardInterrupt and friends

    def _exec(self, command: str, phase: str, timeout: float | None = None) -> tuple[int, str, str]:
        """Run a short command; (exit status, stdout, stderr)."""
        timeout = timeout or self.options.connect_timeout
        try:
            channel = self.client.get_transport().open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
            out, err = io.BytesIO(), io.BytesIO()
            while True:
                data = channel.recv(65536)
                if not data:
                    break
                out.write(data)
            while channel.recv_stderr_ready():
                err.write(channel.recv_stderr(65536))
            status = channel.recv_exit_status()
            channel.close()
        except (socket.timeout, TimeoutError):
            raise self.error(phase, f"`{command.split()[0]}` took longer than {timeout:g} s") from None
        except Exception as exc:
            raise self.error(phase, f"{type(exc).__name__}: {exc}") from None
        return status, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace")

    def upload(self) -> None:
        began = time.monotonic()
        status, out, err = self._exec(f'mktemp -d "${{TMPDIR:-/tmp}}/{REMOTE_DIR_PREFIX}XXXXXXXX"', "upload")
        path = out.strip()
        if status != 0 or not path.startswith("/") or "\n" in path:
            raise self.error("upload", f"mktemp -d failed (status {status}): {err.strip() or out.strip()}")
        self.remote_dir = path
        try:
            bundle = self.bundle()
        except Exception as exc:
            raise self.error("upload", f"cannot build the bundle here: {type(exc).__name__}: {exc}") from None
        try:
            sftp = self.client.open_sftp()
        except Exception as exc:
            raise self.error("upload", f"SFTP unavailable: {exc}") from None
        try:
            sftp.get_channel().settimeout(self.options.connect_timeout)
            sftp.putfo(io.BytesIO(bundle.data), f"{path}/{BUNDLE_NAME}", file_size=len(bundle.data), confirm=True)
        except (socket.timeout, TimeoutError):
            raise self.error("upload", f"SFTP put took longer than {self.options.connect_timeout:g} s") from None
        except Exception as exc:
            raise self.error("upload", f"SFTP put {path}/{BUNDLE_NAME}: {exc}") from None
        finally:
            sftp.close()
        self.timings.upload = time.monotonic() - began

    def command(self) -> str:
        q = shlex.quote
        python = " ".join(q(word) for word in shlex.split(self.options.python))
        directory = q(self.remote_dir)
        return (f"cd {directory} && echo {PID_MARKER} $$ && exec {python} -E -s {directory}/{BUNDLE_NAME} "
                f"run-remote --json --watch-stdin --workdir {directory} --cpu-profile {q(self.options.cpu_profile)} "
                f"--cases {q(','.join(self.cases))}")

    def launch(self) -> None:
        try:
            channel = self.client.get_transport().open_session(timeout=self.options.connect_timeout)
            channel.exec_command(self.command())
        except Exception as exc:
            raise self.error("run", f"cannot start the agent: {exc}") from None
        self.channel = channel
        self._launched_at = self._last_progress = time.monotonic()
        self._spawn(self._read_stdout, "stdout")
        self._spawn(self._read_stderr, "stderr")

    # --- collect -------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        try:
            for raw in self.channel.makefile("rb"):
                self._line(raw.decode(errors="replace").rstrip("\r\n"))
        except Exception as exc:
            with self._cond:
                self.stray.append(f"(reading stopped: {type(exc).__name__}: {exc})")
        finally:
            self._end_of_output()

    def _read_stderr(self) -> None:
        try:
            for raw in self.channel.makefile_stderr("rb"):
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.strip():
                    self.stderr.append(line)
        except Exception:
            pass

    def _line(self, line: str) -> None:
        with self._cond:
            self._last_progress = time.monotonic()
            if line.startswith(PID_MARKER + " "):
                try:
                    self.agent_pgid = int(line.split()[1])
                except ValueError:
                    self.stray.append(line)
                return
            try:
                record = json.loads(line)
                record["kind"]  # a record is an object with a kind (else KeyError/TypeError)
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    self.stray.append(line)
                return
            self._take(record)

    def _took(self, kind: str, record: dict) -> None:
        if kind == "probe":
            self.probe_facts = record.get("facts", {})
        elif kind == "done" and self._launched_at is not None:
            self.timings.run = time.monotonic() - self._launched_at

    def _result_timeout(self) -> float:
        return self.options.run_timeout

    def _ended_without(self, case_id: str) -> RemoteError:
        """The agent's output ended before `case_id` was reported: say why, in one line."""
        channel = self.channel
        deadline = time.monotonic() + 2
        while not channel.exit_status_ready() and not channel.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        # The exit status can arrive before the stderr reader has taken the agent's last
        # words (the reason it could not start): let that reader finish first.
        for thread in self._threads:
            if thread.name.startswith("apx-remote-stderr"):
                thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        last_err = self.stderr[-1].strip() if self.stderr else ""
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        if status != -1:  # -1: the channel closed without an exit status (paramiko)
            if status == 0 and self._done_record is not None:
                return self.error("collect", f"the agent finished without reporting {case_id}")
            detail = f": {last_err}" if last_err else ""
            return self.error("run", f"the agent exited with status {status} before reporting {case_id}{detail}")
        transport = self.client.get_transport() if self.client else None
        why = transport.get_exception() if transport is not None else None
        detail = f" ({why})" if why else ""
        return self.error("collect", f"connection lost before {case_id} was reported{detail}")

    # --- the end ---------------------------------------------------------------------------
    def _close(self) -> None:
        """Kill the agent's process group, remove the remote directory, disconnect."""
        if self._threads and not self._started.is_set():
            # Still connecting or uploading (e.g. Ctrl-C early): let that finish (each step has
            # its timeout) so what it creates remotely is cleaned up below, not after us.
            self._started.wait(timeout=self.options.connect_timeout * 4 + 5)
        if self.client is not None and self.remote_dir:
            pgid = self.agent_pgid or 0
            q = shlex.quote
            script = (
                f"d={q(self.remote_dir)}; p={pgid}; "
                'if [ "$p" -gt 1 ] && kill -0 -- "-$p" 2>/dev/null; then '
                'kill -TERM -- "-$p" 2>/dev/null; i=0; '
                'while [ $i -lt 30 ] && kill -0 -- "-$p" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; '
                'kill -KILL -- "-$p" 2>/dev/null; fi; '
                'case "$d" in */' + REMOTE_DIR_PREFIX + '*) rm -rf -- "$d";; esac; '
                'test ! -e "$d"'
            )
            try:
                transport = self.client.get_transport()
                if transport is None or not transport.is_active():
                    raise self.error("collect", "connection already closed")
                status, _, err = self._exec(script, "collect", timeout=max(self.options.connect_timeout, 10))
                if status != 0:
                    self.cleanup_note = f"remote cleanup of {self.remote_dir} failed: {err.strip() or status}"
            except RemoteError as exc:
                self.cleanup_note = (f"remote cleanup not confirmed ({exc.reason}); the agent exits by itself "
                                     f"when its stdin closes and removes {self.remote_dir}")
        if self.channel is not None:
            try:
                self.channel.close()
            except Exception:
                pass
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self._end_of_output()
