"""GuestHost: a kernel under test as a transport beside SSH's RemoteHost.

One QEMU per kernel and pytest session: the kernel (apx_tests.kut.kernel) boots with an
initramfs holding /init (guests/kut/init.c) and the modules it needs; /init loads them,
mounts the host's root read-only over 9p, checks /dev/kvm and runs the remote agent
(apx_tests.remote.agent, unpacked from the bundle into a temp dir with its bytecode
compiled here) with the host's python3.  The agent's JSON records and /init's own
("kind": "guest") come back on the second serial port, written by QEMU to a file this
side follows; the first serial port is the console log.

Accelerator: nested KVM where this host's KVM can run Linux with nesting (kvm_intel or
kvm_amd, parameter nested on): ``-accel kvm -cpu host``.  Otherwise (kvm_pvm, no KVM,
nesting off) TCG with ``-cpu max``, an AMD CPU with SVM, so the guest's kvm_amd runs.

The interface is RemoteHost's (start_async, wait_started, result, close, hello, results,
counts, timings, cleanup_note), so apx_tests.pytest.remote's items work with it.
Errors are RemoteError with a one-line text ``apx-kernel kernel[R]: <phase>: <why>``;
``unusable`` marks the start errors that mean "cannot run here" (skip, or fail under
--apx-require), as opposed to an agent that broke mid-run.
"""

from __future__ import annotations

import compileall
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import process
from ..cases import CaseResult
from ..guests.build import GuestBuildError
from ..guests import linux, linux_programs as programs
from ..guests.build import guests_dir
from ..guests.initramfs import Directory
from ..remote.transport import AgentTransport, RemoteError, Timings
from . import kernel as kmod

INIT_SOURCE = "kut/init.c"
ROOT_TAG = "hostroot"
MEMORY = "1G"          # the nested VMs take 4 MiB each; the rest is the kernel's and python's
BOOT_TIMEOUT = 180.0   # QEMU start to /init's first record (TCG on a loaded 2-core host)
POLL = 0.05            # how often the records file is read while QEMU runs


@dataclass(frozen=True)
class KernelSpec:
    """What the items are named after: --apx-kernel's value and the release it gives."""

    spec: str
    modules: str | None
    release: str

    @property
    def label(self) -> str:
        return f"kernel[{self.release}]"

    def __str__(self) -> str:
        return self.label


@dataclass
class GuestOptions:
    qemu: str | None = None
    cpu_profile: str = "host"
    inject: str | None = None
    timeout: float = 300.0            # longest silence from the guest while cases are pending
    boot_timeout: float = BOOT_TIMEOUT
    artifacts: str | None = None      # --apx-artifacts: the session's console and records go here
    accel: str | None = None          # force "tcg" or "kvm" (tests); None: choose_accel()
    python_flags: tuple[str, ...] = ()  # extra interpreter flags (e.g. -X importtime, to the console)
    cpu: str | None = None            # -cpu instead of max/host (tests: "max,svm=off" has no KVM)


def choose_accel(sysfs: str = "/sys/module") -> tuple[str, str]:
    """(accel, why): "kvm" when this host's KVM is a standard one with nesting on (the
    guest's KVM then runs on hardware virtualisation), else "tcg" (nested SVM emulated)."""
    from ..kvm.system import kvm_flavour
    flavour = kvm_flavour(sysfs)
    if flavour in ("kvm_intel", "kvm_amd"):
        try:
            nested = Path(sysfs, flavour, "parameters", "nested").read_text().strip()
        except OSError:
            nested = "?"
        if nested in ("Y", "1") and os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "kvm", f"nested KVM: this host's {flavour} has nested={nested}"
        return "tcg", f"TCG + nested SVM: this host's {flavour} has nested={nested}"
    if flavour == "kvm_pvm":
        return "tcg", "TCG + nested SVM: this host's /dev/kvm is kvm_pvm, which boots no stock Linux kernel"
    return "tcg", "TCG + nested SVM: no kvm_intel/kvm_amd on this host"


def host_vendor() -> str:
    from ..hostcpu import cpuid
    _, ebx, ecx, edx = cpuid(0, 0)
    return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode(errors="replace")


def build_init() -> Path:
    """Static /init from guests/kut/init.c (cached like the Linux guests' programs)."""
    source = guests_dir() / INIT_SOURCE
    if not source.is_file():
        raise GuestBuildError(f"kernel-under-test init source missing: guests/{INIT_SOURCE}")
    cc = programs.find_cc()
    digest = programs._digest("kut-init", cc=programs._cc_version(cc), flags=list(programs.CFLAGS),
                           sources=[programs._file_digest(source)])
    return programs._cached_build("kut-init", digest, lambda tmp, out: programs._compile(cc, [source], out))


def guest_python() -> str:
    """The host's interpreter without the venv: the agent needs the standard library only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def parse_record(line: str) -> dict | None:
    """A JSON record line from the records port, or None for anything else."""
    line = line.strip().strip("\x00")
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "kind" in record else None


@dataclass
class GuestHost(AgentTransport):
    spec: KernelSpec
    options: GuestOptions
    bundle: object  # callable -> apx_tests.remote.bundle.Bundle (built once per session)

    hello: dict = field(default_factory=dict)
    probe_lines: list[str] = field(default_factory=list)
    results: dict[str, CaseResult] = field(default_factory=dict)
    guest_events: list[dict] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    cases: list[str] = field(default_factory=list)
    cleanup_note: str | None = None
    tree: kmod.KernelTree | None = None
    accel: str | None = None
    accel_why: str = ""
    workdir: Path | None = None
    unusable: bool = False            # the start error means "this kernel cannot run the cases here"

    THREAD_PREFIX = "apx-kut"

    def __post_init__(self) -> None:
        self._init_transport()
        self._proc: subprocess.Popen | None = None
        self.booted_at: float | None = None
        self.seconds: dict[str, float] = {}
        self.qemu_argv: list[str] = []
        self.kvm_state: str | None = None

    @property
    def label(self) -> str:
        return self.spec.label

    def error(self, phase: str, message: str) -> RemoteError:
        text = " ".join(f"apx-kernel {self.label}: {phase}: {message}".split())
        return RemoteError(self.spec, phase, message, text=text)

    # --- start -------------------------------------------------------------------------
    def start(self, case_ids: list[str]) -> None:
        """start_async and wait for the boot (tests, ci/bench)."""
        self.start_async(case_ids)
        self.wait_started()

    def _bring_up(self) -> None:
        began = time.monotonic()
        self._prepare()
        self.seconds["prepare"] = time.monotonic() - began
        if self._closed:
            raise self.error("boot", "the session ended before QEMU was started")
        self._launch()
        self._wait_for_agent()

    def _start_failure(self, exc: Exception) -> RemoteError:
        if isinstance(exc, (kmod.KernelError, GuestBuildError, linux.KernelUnavailable)):
            self.unusable = True
            return self.error("kernel", str(exc))
        return self.error("boot", f"{type(exc).__name__}: {exc}")

    def _prepare(self) -> None:
        self.tree = kmod.resolve(self.spec.spec, self.spec.modules)
        self.accel, self.accel_why = (self.options.accel, f"forced {self.options.accel}") \
            if self.options.accel else choose_accel()
        vendor = "AuthenticAMD" if self.accel == "tcg" else host_vendor()
        vendor_module = kmod.VENDOR_MODULES.get(vendor)
        if vendor_module is None:
            raise kmod.KernelError(f"no KVM module for a {vendor} vCPU")
        plan = self.tree.load_plan(kmod.TRANSPORT_MODULES + ("kvm", vendor_module))
        self.workdir = Path(tempfile.mkdtemp(prefix="apx-kut."))
        agent = self.workdir / "agent"
        with zipfile.ZipFile(io.BytesIO(self.bundle().data)) as zf:
            zf.extractall(agent)
        # Bytecode now, with this very interpreter: the guest's root is read-only, and
        # compiling every module under TCG would cost seconds per boot.
        compileall.compile_dir(str(agent), quiet=1, workers=1)
        argv = [guest_python(), "-E", "-S", "-B", *self.options.python_flags, str(agent / "__main__.py"),
                "run-remote", "--json",
                "--no-probe", "--cpu-profile", self.options.cpu_profile, "--cases", ",".join(self.cases)]
        if self.options.inject:
            argv += ["--inject", self.options.inject]
        files: dict[str, linux.Entry] = {
            "init": build_init(),
            "kut": Directory(),
            "kut/argv": b"\0".join(a.encode() for a in argv) + b"\0",
            "kut/modules": "".join(f"{name}.ko\n" for name, _ in plan).encode(),
            "newroot": Directory(),
        }
        for name, elf in plan:
            files[f"kut/{name}.ko"] = elf
        self.initramfs = linux.build_initramfs(files, self.workdir / "initramfs.cpio")
        self.kernel_image = linux.pvh_kernel(self.tree.image) or self.tree.image

    def command(self) -> list[str]:
        from ..qemu.spec import find_qemu
        qemu = find_qemu(self.options.qemu)
        words = linux.base_kernel_words(self.accel)
        cpu = self.options.cpu or ("max" if self.accel == "tcg" else "host")
        return [qemu, *linux.MACHINE_ARGS, "-accel", self.accel, "-cpu", cpu, "-m", MEMORY, "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.kernel_image), "-initrd", str(self.initramfs), "-append", " ".join(words),
                "-fsdev", f"local,id={ROOT_TAG},path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", f"virtio-9p-device,fsdev={ROOT_TAG},mount_tag={ROOT_TAG}",
                "-chardev", f"file,id=console,path={self.workdir / 'console.log'}", "-serial", "chardev:console",
                # microvm makes one ISA serial port of -serial; the records port is COM2,
                # which the kernel's legacy 8250 probe finds as ttyS1.
                "-chardev", f"file,id=records,path={self.workdir / 'records.jsonl'}",
                "-device", "isa-serial,chardev=records,iobase=0x2f8,irq=3"]

    def _launch(self) -> None:
        argv = self.command()
        self.qemu_argv = argv
        self._stderr = open(self.workdir / "qemu.stderr", "wb")
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                          stderr=self._stderr, start_new_session=True)
        except OSError as exc:
            raise self.error("boot", f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        self.booted_at = self._last_progress = time.monotonic()
        self._spawn(self._follow, "records")

    def _wait_for_agent(self) -> None:
        """Until the agent's hello: what /init said on the way (modules, /dev/kvm), or
        QEMU's own last words, is the one line when it never comes."""
        deadline = self.booted_at + self.options.boot_timeout
        with self._cond:
            while not self.hello:
                if self._ended:
                    raise self._boot_failure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._boot_failure(timeout=True)
                self._cond.wait(min(remaining, 1.0))
        self.seconds["boot"] = time.monotonic() - self.booted_at

    def _boot_failure(self, timeout: bool = False) -> RemoteError:
        events = self.guest_events
        problems = [e["detail"] for e in events if e.get("event") in ("module", "mount", "chroot", "argv", "exec")
                    or (e.get("event") == "kvm" and e.get("detail") != "ok")]
        self.unusable = True
        if problems:
            return self.error("boot", "; ".join(problems))
        if timeout:
            where = "no word from /init" if not events else f"/init's last word: {events[-1].get('detail')}"
            return self.error("boot", f"no agent within {self.options.boot_timeout:g} s ({where}; console: "
                                      f"{self._console_tail()})")
        status = self._proc.poll() if self._proc else None
        return self.error("boot", f"QEMU exited with status {status} before the agent started "
                                  f"({self._qemu_tail() or self._console_tail()})")

    def _console_tail(self) -> str:
        try:
            lines = [l for l in (self.workdir / "console.log").read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return "no console output"
        return lines[-1].strip() if lines else "no console output"

    def _qemu_tail(self) -> str:
        try:
            lines = [l for l in (self.workdir / "qemu.stderr").read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    # --- records -------------------------------------------------------------------------
    def _follow(self) -> None:
        """Read records.jsonl as QEMU writes it, line by line, until QEMU has exited and
        the file is drained."""
        path = self.workdir / "records.jsonl"
        buffer = b""
        handle = None
        try:
            while True:
                exited = self._proc.poll() is not None
                if handle is None and path.exists():
                    handle = open(path, "rb")
                chunk = handle.read() if handle is not None else b""
                if chunk:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for raw in lines:
                        self._line(raw.decode(errors="replace"))
                elif exited:
                    break
                else:
                    time.sleep(POLL)
            if buffer.strip():
                self._line(buffer.decode(errors="replace"))
        finally:
            if handle is not None:
                handle.close()
            self._end_of_output()

    def _line(self, line: str) -> None:
        record = parse_record(line)
        if record is None:
            return
        with self._cond:
            self._last_progress = time.monotonic()
            self._take(record)

    def _took(self, kind: str, record: dict) -> None:
        if kind == "hello":
            self.seconds["hello_uptime"] = self._uptime()
        elif kind == "guest":
            self.guest_events.append(record)
            if record.get("event") == "kvm":
                self.kvm_state = record.get("detail")
        elif kind == "done":
            if self.booted_at is not None:
                self.timings.run = time.monotonic() - self.booted_at
                self.seconds["total"] = self.timings.run
            self.seconds["cases"] = float(record.get("duration", 0.0))

    def _uptime(self) -> float:
        for event in reversed(self.guest_events):
            if "uptime" in event:
                return float(event["uptime"])
        return 0.0

    def _result_timeout(self) -> float:
        return self.options.timeout

    def _ended_without(self, case_id: str) -> RemoteError:
        exits = [e["detail"] for e in self.guest_events if e.get("event") in ("exit", "exec")]
        if exits:
            return self.error("run", f"{exits[-1]} before reporting {case_id} (console: {self._console_tail()})")
        return self.error("run", f"QEMU exited before {case_id} was reported "
                                 f"({self._qemu_tail() or self._console_tail()})")

    def wait_done(self, timeout: float = 60.0) -> None:
        """Until the agent's "done" record (its last line) arrived or the guest ended."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._done_record is None and not self._ended and time.monotonic() < end:
                self._cond.wait(0.5)

    @property
    def kvm_xcr0(self) -> str | None:
        for result in self.results.values():
            if result.facts.get("kvm_supported_xcr0"):
                return result.facts["kvm_supported_xcr0"]
        return None

    def console_text(self) -> str:
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def records_text(self) -> str:
        try:
            return (self.workdir / "records.jsonl").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # --- the end ---------------------------------------------------------------------------
    def _close(self) -> None:
        """Stop QEMU (TERM, then KILL), save the session's console and records under
        --apx-artifacts, remove the work directory."""
        if self._threads and not self._started.is_set():
            self._started.wait(timeout=self.options.boot_timeout + 60)
        process.stop(self._proc, grace=3.0, kill_wait=5.0, group=True)  # TERM, then KILL
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        stderr = getattr(self, "_stderr", None)
        if stderr is not None:
            stderr.close()
        if self.workdir is not None:
            if self.options.artifacts:
                self._save_artifacts(Path(self.options.artifacts))
            if not process.remove_tree(self.workdir):
                self.cleanup_note = f"could not remove {self.workdir}"
        self._end_of_output()

    def _save_artifacts(self, root: Path) -> None:
        dest = root / f"kernel-{self.spec.release}"
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("console.log", "records.jsonl", "qemu.stderr"):
                if (self.workdir / name).is_file():
                    shutil.copyfile(self.workdir / name, dest / name)
            (dest / "qemu.cmdline").write_text(" ".join(self.qemu_argv) + "\n")
        except OSError as exc:
            self.cleanup_note = f"cannot save artifacts to {dest}: {exc}"
