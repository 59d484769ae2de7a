"""Errors raised while reading CPUID leaf 0xD tables and XSAVE buffers.

Every error is a ``ValueError`` (the input bytes or numbers are wrong, not the
program), and every message is ONE line that starts with where the data came
from (a file path, "KVM_GET_XSAVE2 vcpu0", "CPUID table intel-apx", ...), so a
failing test report can be read without a traceback.
"""

from __future__ import annotations


class XsaveError(ValueError):
    """Base class: something about an XSAVE layout or image is invalid."""

    def __init__(self, where: str, problem: str):
        self.where = where or "XSAVE image"
        self.problem = problem
        # Keep the message to one line even if a caller passes a multi-line detail.
        super().__init__(f"{self.where}: {problem}".replace("\n", " "))


class ImageTooShort(XsaveError):
    """The buffer ends before a component that its header says is present."""


class ReservedHeaderBits(XsaveError):
    """XSAVE header bytes 528..575 must be zero (XRSTOR faults otherwise)."""


class CompactedInStandard(XsaveError):
    """XCOMP_BV is non-zero in an image parsed as the standard format."""


class UnsupportedComponent(XsaveError):
    """XSTATE_BV/XCOMP_BV names a component the layout's XCR0 does not support."""


class UnknownComponent(XsaveError):
    """A component (or register) was asked for that the layout does not describe."""


class ApxMpxConflict(XsaveError):
    """APX (component 19) together with MPX (3/4): they share offsets 960..1087."""


class MalformedImage(XsaveError):
    """Any other inconsistency in an image (wrong component size, bad XCOMP_BV, ...)."""


class MalformedLayout(XsaveError):
    """CPUID leaf 0xD describes an impossible layout (zero size, overlap, ...)."""


class UnknownRegister(UnknownComponent):
    """A register name that no bank defines (e.g. "zmm32", "r15")."""
