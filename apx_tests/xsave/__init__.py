"""apx_tests.xsave: XSAVE layouts, images, register banks and diffs.

Pure data: no I/O, no imports from the rest of apx_tests.  Everything else
(KVM, QEMU, gdb observers, guest payloads) builds on these names.
"""

from .banks import BANKS, REGISTERS, Bank, Register, Slot, bank, bank_of, narrower_names, register
from .diff import Difference, diff_images, diff_registers
from .errors import (
    ApxMpxConflict,
    CompactedInStandard,
    ImageTooShort,
    MalformedImage,
    MalformedLayout,
    ReservedHeaderBits,
    UnknownComponent,
    UnknownRegister,
    UnsupportedComponent,
    XsaveError,
)
from .image import XsaveImage, default_legacy
from .layout import (
    COMPONENT_NAMES,
    LEGACY_FIELDS,
    REFERENCE_CPUID,
    Component,
    Layout,
    component_name,
)

__all__ = [
    "BANKS", "REGISTERS", "Bank", "Register", "Slot", "bank", "bank_of", "narrower_names", "register",
    "Difference", "diff_images", "diff_registers",
    "XsaveError", "ImageTooShort", "ReservedHeaderBits", "CompactedInStandard", "UnsupportedComponent",
    "UnknownComponent", "UnknownRegister", "ApxMpxConflict", "MalformedImage", "MalformedLayout",
    "XsaveImage", "default_legacy",
    "COMPONENT_NAMES", "LEGACY_FIELDS", "REFERENCE_CPUID", "Component", "Layout", "component_name",
]
