"""`pytest -m apx -n N` (pytest-xdist): which items go to the same worker.

xdist's default (`--dist load`) hands items out one by one, so both workers would boot
the Linux guest's ready state (a TCG boot, ~3-4 s of one core each) and both would probe
every QEMU binary.  Under `--dist load` this plugin schedules by *scope* instead
(xdist's LoadScopeScheduling, with our own scope of a node id):

- every Linux-guest item: one scope, so one worker boots the ready guest once;
- the scenario items of one backend (`qemu10-tcg`, `qemu11-kvm`, `kvm`, ...): one scope
  each, so each QEMU binary is probed by one worker;
- anything else: its own scope (what `load` does).

Scopes are whole units of work: a scope runs on one worker, and scopes are handed out as
workers become free, in collection order (not xdist's default of "most items first",
which put the 14 Linux items, the longest unit by far, behind every backend's ~50 quick
ones: measured 1.04x over -n 0).  Under xdist the suite's conftest collects the Linux
items first, so one worker starts on them while the other takes the backends.  Outcomes
are those of `-n 0` (ci/bench --only xdist compares them item by item).  Any other
`--dist` the user names is left alone.
"""

from __future__ import annotations

import re

import pytest

LINUX_SCOPE = "apx-linux"
# A scenario item's id starts with its backend: [qemu10-tcg-ymm-export], [kvm-apx-import].
_BACKEND_ID = re.compile(r"\[((?:qemu\d*-(?:kvm|tcg))|kvm)-[a-z0-9_]+-[a-z0-9_]+\]$")


def scope_of(nodeid: str) -> str:
    """The unit of work `nodeid` belongs to (see the module docstring)."""
    path = nodeid.split("::", 1)[0]
    if path.endswith("suite/test_linux.py"):
        return LINUX_SCOPE
    m = _BACKEND_ID.search(nodeid)
    if m and path.endswith("suite/test_scenarios.py"):
        return f"apx-backend-{m.group(1)}"
    return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ApxScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

        def schedule(self) -> None:
            if hasattr(self.config.option, "loadscopereorder"):  # xdist >= 3.6: keep collection order
                self.config.option.loadscopereorder = False
            super().schedule()

    return ApxScopeScheduling(config, log)
