"""The small interface every backend offers, so scenarios never know which one runs.

A backend boots a guest running one bank's payload (built by apx_tests.guests) and hands out a Session:
    run_to(stage)     release the guest from where it waits and run to the next sync point
    export()          the vCPU's extended state as an XsaveImage (the backend's main observer)
    observers()       every way this backend can read the state: name -> callable -> registers
    import_image(img) write extended state into the vCPU
    snapshot()        a paused point that restore() can resume in a fresh VM
    restore(snap)     a new Session (fresh VM / fresh process) continuing from the snapshot
    write_area / read_area / mailbox()   the shared mailbox page
    finish()          release the last stage; the guest's final status
    close()
Backend-specific extras (raw ioctls for the KVM ABI checks) are declared in `features`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from . import profiles
from .guests import protocol
from .profiles import CpuProfile
from .xsave import Bank, Layout, XsaveImage


class BackendError(RuntimeError):
    """A backend could not do what was asked; str() is one line naming what and where."""


class ImportRejected(BackendError):
    """The VMM refused an import (e.g. KVM_SET_XSAVE returned EINVAL)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class Session(abc.ABC):
    backend: str  # e.g. "kvm", "qemu-tcg"
    bank: Bank
    layout: Layout
    features: frozenset[str] = frozenset()
    mailbox_gpa: int  # guest-physical address of the mailbox: the payload's %rdi

    def __init__(self) -> None:
        self.stage: int | None = None  # the sync point the guest waits at

    # --- guest control -------------------------------------------------------------
    @abc.abstractmethod
    def run_to(self, stage: int) -> None: ...

    @abc.abstractmethod
    def finish(self) -> int: ...

    def expect_restore(self) -> None:
        """A hint from the scenario, right after start(): this session will continue in a
        fresh VM (an import or a restore).  A backend may prepare that VM ahead (the QEMU
        backend starts its QEMU now); what the scenario reads does not change.  Default:
        nothing."""

    # --- state ---------------------------------------------------------------------
    @abc.abstractmethod
    def export(self) -> XsaveImage: ...

    def observers(self) -> dict[str, Callable[[], XsaveImage]]:
        """Observers that yield a whole XSAVE image (the default: export())."""
        return {"export": self.export}

    def gpr_views(self) -> dict[str, Callable[[], dict[str, bytes]]]:
        """Observers of the general-purpose registers (rax..r15, rip, rflags; r16..r31 where
        the observer knows APX): name -> callable -> {register: 8 bytes little-endian}."""
        return {}

    def views(self) -> dict[str, Callable[[], dict[str, bytes]]]:
        """Partial observers (a debugger, a monitor): register name -> raw little-endian
        bytes for what they can see, possibly under a narrower name (xmm3 of ymm3)."""
        return {}

    def debugger_offer(self) -> str:
        """What the debugger of the last debugger_write/view offered, for reasons
        ("gdbstub features org.gnu.gdb.i386.core"); empty when there is none."""
        return ""

    @abc.abstractmethod
    def import_image(self, image: XsaveImage) -> None: ...

    @abc.abstractmethod
    def snapshot(self): ...

    @abc.abstractmethod
    def restore(self, snapshot) -> "Session": ...

    # --- mailbox -------------------------------------------------------------------
    @abc.abstractmethod
    def write_area(self, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def read_area(self, offset: int, size: int) -> bytes: ...

    def mailbox(self) -> protocol.Mailbox:
        return protocol.read_mailbox(self.read_area(0, protocol.HEADER_SIZE))

    # --- lifetime ------------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend(abc.ABC):
    """Boots sessions for banks; knows which banks it can run and why not."""

    name: str
    # The machine its sessions run on (KvmHost, QemuHost): it holds the guest's XSAVE
    # layout, the CPU profile (--apx-cpu) and whether that profile can be had.
    host: Any

    @property
    def layout(self) -> Layout:
        return self.host.layout

    @property
    def profile(self) -> CpuProfile:
        return self.host.profile

    def unavailable_reason(self, bank: Bank) -> str | None:
        """None when `bank` can run on this backend under its CPU profile, else every
        missing piece in one line: why the profile cannot be provided at all, what it takes
        away from the bank, then what the host and VMM lack (host_unavailable).  The one
        answer to "can this bank run here, and if not, why": the case runner (so the
        plugin's skips), the remote agent and the probe ask the backend; none derives it."""
        reasons = (self.profile_unavailable(), profiles.exclusion(self.profile, bank.xcr0_mask),
                   self.host_unavailable(bank))
        return "; ".join(why for why in reasons if why) or None

    @abc.abstractmethod
    def host_unavailable(self, bank: Bank) -> str | None:
        """What this backend's host and VMM lack for `bank`, apart from what the CPU
        profile takes away (unavailable_reason adds that); None when nothing."""

    def profile_unavailable(self) -> str | None:
        """Why this backend cannot provide its CPU profile (--apx-cpu) at all, or None.
        Such a skip is one lab mode (--apx-require) turns into a failure: the lab asked
        for that kind of host."""
        return self.host.profile_unavailable()

    def run_closed(self) -> None:
        """A scenario Run closed all its sessions: what the backend kept for them goes too
        (the QEMU backend: standby QEMUs its snapshots still hold).  Default: nothing."""

    def idle(self) -> None:
        """No case of this backend follows soon: end what it keeps warm for the next one
        (the QEMU backend: a spare boot QEMU, QemuHost.spare_boots).  Default: nothing."""

    def init_readout_unjudgeable(self, bank: Bank) -> str | None:
        """Why this backend's vCPU cannot show whether `bank`'s init state was loaded
        (the guest's store would read the same either way), or None.  The init_state
        scenario then skips with this reason instead of judging."""
        return None

    def init_state_kept(self, bank: Bank) -> bool:
        """True when this backend's import ABI deliberately keeps `bank`'s register
        when its XSTATE_BV bit is clear (KVM and PKRU), so init_state expects the value
        the guest loaded, not the init value."""
        return False

    @abc.abstractmethod
    def start(self, bank: Bank, payload: bytes) -> Session:
        """Boot a guest running `payload` (the bank's flat CPL3 code) to just before stage 0."""
