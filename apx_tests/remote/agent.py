"""The remote end: ``python3 apx.pyz run-remote --cases ID[,ID...] [--json]``.

Runs the requested scenario cases with the real KVM backend and prints, with --json, one
JSON object per line (flushed as it goes):

  {"kind": "hello", "agent": 1, "pid": ..., "python": "3.11.2", "hostname": ...}
  {"kind": "probe", "lines": [apx-tests probe report], "facts": {Probe.to_dict()}}
  {"kind": "case", "id": "kvm-ymm-import", "outcome": "pass|fail|skip", "lines": [...],
   "duration": 0.012, "require_applies": false, "traceback": null, "facts": {...}}
  ...
  {"kind": "done", "counts": {"pass": n, "fail": n, "skip": n}, "duration": ...}

Without --json the same as plain text. Standard library and apx_tests only (no pytest).

--workdir DIR      the private directory the bundle was uploaded to: the agent keeps its
                   build cache there and removes DIR when it exits, however it exits
                   (done, SIGTERM/SIGHUP/SIGINT, or stdin closed with --watch-stdin).
--watch-stdin      exit as soon as stdin reaches EOF: the SSH channel closed or the
                   connection died, so nothing is left running on the remote host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
import zipfile

AGENT_PROTOCOL = 1
EXIT_ABANDONED = 75   # stdin closed / signalled before the cases were done

_workdir: str | None = None
_out_lock = threading.Lock()


def _emit(record: dict, as_json: bool) -> None:
    if as_json:
        text = json.dumps(record, sort_keys=True)
    else:
        text = _human(record)
    with _out_lock:
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, OSError, ValueError):  # nobody listens any more
            _abandon(EXIT_ABANDONED)


def _human(record: dict) -> str:
    kind = record["kind"]
    if kind == "case":
        head = f"{record['outcome'].upper():4} {record['id']} ({record['duration']:.3f} s)"
        return "\n".join([head, *("    " + line for line in record["lines"])])
    if kind == "probe":
        return "\n".join("probe: " + line for line in record["lines"])
    if kind == "done":
        counts = record["counts"]
        return f"done: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
    return f"{kind}: " + " ".join(f"{k}={v}" for k, v in sorted(record.items()) if k != "kind")


def _remove_workdir() -> None:
    if _workdir:
        shutil.rmtree(_workdir, ignore_errors=True)


_abandon_lock = threading.Lock()


def _abandon(code: int) -> None:
    """Leave now: remove the work directory and exit without Python's shutdown (which
    could try to import from the zip that was just removed).  The first caller wins: a
    second one (the main thread failing to import from the vanishing zip while the stdin
    watchdog is leaving) waits for the first one's exit instead of racing it."""
    if not _abandon_lock.acquire(blocking=False):
        while True:
            time.sleep(3600)
    _remove_workdir()
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os._exit(code)


def _watch_stdin() -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    _abandon(EXIT_ABANDONED)


def _on_signal(signum, _frame) -> None:
    _abandon(128 + signum)


class _BundlePayloads:
    """Payload bytes from the bundle's payloads/; a bank missing there is built on this
    host from the bundle's guests/ (which then needs llvm-mc >= 18 here)."""

    def __init__(self, bundle: str | None, workdir: str | None):
        self.zip = zipfile.ZipFile(bundle) if bundle and zipfile.is_zipfile(bundle) else None
        # The bundle unpacked into a directory (a kernel under test runs it from the
        # host's read-only root, with bytecode compiled beforehand): payloads/ is there.
        self.directory = bundle if bundle and os.path.isdir(os.path.join(bundle, "payloads")) else None
        self.workdir = workdir

    def __call__(self, bank: str) -> bytes:
        from ..guests.build import GuestBuildError, build_payload
        if self.directory is not None:
            base = os.path.join(self.directory, "payloads", bank)
            if os.path.isfile(base + ".bin"):
                with open(base + ".bin", "rb") as f:
                    return f.read()
            if os.path.isfile(base + ".error"):
                with open(base + ".error") as f:
                    raise GuestBuildError(f.read())
        if self.zip is not None:
            names = set(self.zip.namelist())
            if f"payloads/{bank}.bin" in names:
                return self.zip.read(f"payloads/{bank}.bin")
            if f"payloads/{bank}.error" in names:
                raise GuestBuildError(self.zip.read(f"payloads/{bank}.error").decode())
            self._extract_guests()
        return build_payload(bank).code

    def _extract_guests(self) -> None:
        if os.environ.get("APX_GUESTS_DIR") or not self.workdir:
            return
        target = os.path.join(self.workdir, "guests")
        for name in self.zip.namelist():
            if name.startswith("guests/") and not name.endswith("/"):
                self.zip.extract(name, self.workdir)
        os.environ["APX_GUESTS_DIR"] = target


from ..profiles import PROFILES  # noqa: E402  (standard library + apx_tests only, like the rest)

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apx.pyz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-remote", help="run scenario cases with the KVM backend")
    run.add_argument("--cases", action="append", required=True, metavar="ID[,ID...]",
                     help="case ids such as kvm-ymm-import (repeatable, comma separated)")
    run.add_argument("--json", action="store_true", help="one JSON object per line")
    run.add_argument("--workdir", metavar="DIR", help="private directory to use and remove at exit")
    run.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    run.add_argument("--no-probe", action="store_true", help="skip the host probe record")
    run.add_argument("--cpu-profile", default="host", choices=sorted(PROFILES), metavar="PROFILE",
                     help="CPU profile the backends give guests (apx_tests.profiles; --apx-cpu)")
    run.add_argument("--inject", metavar="FAULT", default=None,
                     help="run the cases with this deliberate VMM bug (apx_tests.faults; --apx-inject)")
    return parser


def main(argv: list[str] | None = None, *, bundle: str | None = None) -> int:
    global _workdir
    args = _parser().parse_args(argv)
    try:
        code = _run(args, bundle)
    except BaseException as exc:  # still remove the workdir; say what happened in one line
        if _workdir:
            try:
                sys.stderr.write(f"apx agent: {type(exc).__name__}: {exc}\n")
            except Exception:
                pass
            _abandon(1)
        raise
    if _workdir:
        _abandon(code)  # removes the workdir (and the zip this runs from) as the very last thing
    return code


def _run(args: argparse.Namespace, bundle: str | None) -> int:
    global _workdir
    ids = [c for chunk in args.cases for c in chunk.split(",") if c]
    if args.workdir:
        _workdir = os.path.abspath(args.workdir)
        os.environ["XDG_CACHE_HOME"] = os.path.join(_workdir, "cache")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    if args.watch_stdin:
        threading.Thread(target=_watch_stdin, name="apx-stdin-watch", daemon=True).start()

    start = time.monotonic()
    _emit({"kind": "hello", "agent": AGENT_PROTOCOL, "pid": os.getpid(), "hostname": platform.node(),
           "python": platform.python_version(), "kernel": platform.release()}, args.json)
    if not args.no_probe:
        from ..probe import probe
        try:
            p = probe()
            _emit({"kind": "probe", "lines": p.report_lines(), "facts": p.to_dict()}, args.json)
        except Exception as exc:  # the probe never should; the cases still can run
            _emit({"kind": "probe", "lines": [f"probe failed: {type(exc).__name__}: {exc}"], "facts": {}},
                  args.json)

    from ..cases import CaseRunner
    wrapper = None
    if args.inject:
        from ..faults import FAULTS
        if args.inject not in FAULTS:
            sys.stderr.write(f"apx agent: --inject {args.inject}: no such fault (known: {', '.join(FAULTS)})\n")
            return 2
        wrapper = FAULTS[args.inject].wrap
    counts = {"pass": 0, "fail": 0, "skip": 0}
    with CaseRunner(_BundlePayloads(bundle, _workdir), profile=args.cpu_profile,
                    session_wrapper=wrapper) as runner:
        for case_id in ids:
            result = runner.run(case_id)
            counts[result.outcome] += 1
            _emit(result.to_json(), args.json)
    _emit({"kind": "done", "counts": counts, "duration": round(time.monotonic() - start, 6)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
