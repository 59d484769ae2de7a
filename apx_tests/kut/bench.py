"""ci/bench's kernel-under-test measurement (its one line there calls rows()).

Boots Debian's generic kernel (``--apx-kernel debian``) under QEMU as the plugin does and
runs every KVM case inside, ``--linux-boots`` times: QEMU start to the last case's record
against the 15 s goal, with the phases (prepare: initramfs and bundle here; boot: QEMU
start to the agent's hello; cases: the agent's own clock).  Every run is verified: a case
that fails inside, or a boot that does not come up, is the row's ERROR, not a time.
"""

from __future__ import annotations

GOAL_MS = 15000.0  # QEMU start to the last case's result (the goal for this machine)


def rows(bench, Row, Stats, Limit) -> list:
    """Row, Stats and Limit are ci/bench's classes (it is a script, not a module)."""
    from ..cases import case_ids
    from ..remote.bundle import build_bundle
    from ..remote.ssh import RemoteError
    from . import kernel as kmod
    from .guest import GuestHost, GuestOptions, KernelSpec

    row = Row("kernel-under-test debian (all KVM cases)", limits=[Limit("total", GOAL_MS, note="boot + every case")])
    phases: dict[str, list[float]] = {"total": [], "prepare": [], "boot": [], "cases": []}
    try:
        bundle = build_bundle()
        spec = KernelSpec(kmod.DEBIAN, None, kmod.expected_release(kmod.DEBIAN))
        ids = case_ids("kvm")
        for _ in range(bench.args.linux_boots):
            guest = GuestHost(spec, GuestOptions(), lambda: bundle)
            try:
                guest.start(ids)
                failed = [r for r in (guest.result(i) for i in ids) if r.outcome == "fail"]
                if failed:
                    row.error = f"{len(failed)} case(s) failed inside: {failed[0].lines[0] if failed[0].lines else failed[0].id}"
                    return [row]
                guest.wait_done()
                s = guest.seconds
                phases["total"].append(s["total"] * 1e3)
                phases["prepare"].append(s["prepare"] * 1e3)
                phases["boot"].append(s["boot"] * 1e3)
                phases["cases"].append(s["cases"] * 1e3)
            finally:
                guest.close()
    except (RemoteError, kmod.KernelError, KeyError) as exc:
        row.error = " ".join(str(exc).split())
        return [row]
    for name, values in phases.items():
        row.sides[name] = Stats(values)
    return [row]
