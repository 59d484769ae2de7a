"""Teardown helpers: stop and reap a child process, close things that may already be gone.

The close() methods of the QEMU machine, the Linux holder run and the kernel-under-test
guest all do the same chores (terminate, kill, reap, close handles quietly, remove the
private directory); they call these.  Pure standard library, no pytest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess


def send_signal(proc: subprocess.Popen, sig: int, *, group: bool = False) -> None:
    """Send `sig` to `proc` (its process group when `group`); a process already gone is fine."""
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except OSError:
        pass


def stop(proc: subprocess.Popen | None, *, exit_code: int | None = None, grace: float = 0.0,
         kill_wait: float | None = None, group: bool = False) -> int | None:
    """Stop `proc` if it still runs and reap it; its exit status.

    With `grace` > 0, SIGTERM first and up to `grace` seconds for it to exit; then SIGKILL
    and up to `kill_wait` seconds (None: as long as it takes) to reap it.  `exit_code`,
    when already known (reaped earlier), is returned as is; None when it could not be
    reaped in time.  Never raises for a process that is gone or will not die.
    """
    if proc is None:
        return exit_code
    if proc.poll() is None:
        if grace > 0:
            send_signal(proc, signal.SIGTERM, group=group)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            send_signal(proc, signal.SIGKILL, group=group)
    if exit_code is not None:
        return exit_code
    try:
        return proc.wait(timeout=kill_wait)
    except Exception:
        return None


def close_quietly(*things, errors: tuple[type[BaseException], ...] = (Exception,)) -> None:
    """close() each of `things` that is not None, ignoring `errors` (each one is tried)."""
    for thing in things:
        if thing is None:
            continue
        try:
            thing.close()
        except errors:
            pass


def remove_tree(path: str | os.PathLike | None) -> bool:
    """Remove a private directory and everything in it, best effort; True once it is gone."""
    if path is None:
        return True
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


class Closing:
    """`with` closes, and so does the garbage collector as a last resort (a test that
    dropped its object must not leave a QEMU behind); close() must be idempotent."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def kill_survivors(pids) -> None:
    """SIGKILL whichever of `pids` still live (after a polite stop had its chance)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
