"""Processes as /proc shows them: the one reader behind every "nothing left running" check.

Pure standard library (no pytest): the tests, the test helpers (remote.testing) and any
cleanup code share it.  Every reader tolerates a process that exits while it is read (it
is then simply not there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"


@dataclass(frozen=True)
class Proc:
    """One process from /proc/<pid>/stat: its id, command name, state letter and parent."""

    pid: int
    comm: str
    state: str  # "R", "S", "D", "Z" (zombie: exited, not yet reaped), ...
    ppid: int


def stat(pid: int) -> Proc | None:
    """The process `pid`, or None if it does not exist (or vanished while read)."""
    try:
        with open(f"{PROC}/{pid}/stat") as fh:
            text = fh.read()
        # comm may hold spaces and parentheses: it runs from the first "(" to the last ")"
        comm = text[text.index("(") + 1:text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        return Proc(int(pid), comm, state, int(ppid))
    except (OSError, ValueError):
        return None


def pids() -> list[int]:
    """Every process id in /proc now."""
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def processes() -> list[Proc]:
    """Every process now (zombies included)."""
    return [p for p in map(stat, pids()) if p is not None]


def children(pid: int | None = None) -> list[Proc]:
    """The direct children of `pid` (default: this process), zombies included."""
    parent = os.getpid() if pid is None else pid
    return [p for p in processes() if p.ppid == parent]


def descendants(pid: int | None = None) -> list[Proc]:
    """Every descendant of `pid` (default: this process), zombies included: children
    first, then grandchildren, ... (one snapshot of /proc)."""
    table = processes()
    out, seen, frontier = [], set(), {os.getpid() if pid is None else pid}
    while frontier:
        found = [p for p in table if p.ppid in frontier and p.pid not in seen]
        seen |= {p.pid for p in found}
        out += found
        frontier = {p.pid for p in found}
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    proc = stat(pid)
    return proc is not None and proc.state != "Z"


def exists(pid: int) -> bool:
    """True while `pid` has a /proc entry (a zombie counts: it was never reaped)."""
    return os.path.exists(f"{PROC}/{pid}")


def root(pid: int) -> str | None:
    """The root directory of `pid` (where it is chrooted), None if unreadable."""
    try:
        return os.readlink(f"{PROC}/{pid}/root")
    except OSError:
        return None


def cmdline(pid: int) -> bytes | None:
    """The raw command line of `pid` (arguments separated by NUL), None if unreadable."""
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def cmdlines() -> list[tuple[int, bytes]]:
    """(pid, raw command line) of every process whose command line is readable now."""
    return [(pid, line) for pid in pids() if (line := cmdline(pid)) is not None]


def environ(pid: int) -> bytes | None:
    """The process's environment as the kernel holds it (NUL-separated), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return None


def has_env(pid: int, name: str, value: str) -> bool:
    """Whether the process was started with `name=value` in its environment (inherited by
    every descendant, even one re-parented after its parent died)."""
    env = environ(pid)
    return env is not None and f"{name}={value}".encode() in env.split(b"\0")
