"""The errors of the QEMU backend's processes: ``QemuError`` (QEMU did not do what was
asked) and ``QemuUnavailable`` (QEMU or the accelerator cannot be used here: a skip).
Both have one-line messages."""

from __future__ import annotations

from ..backend import BackendError


class QemuError(BackendError):
    """QEMU did not do what was asked; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class QemuUnavailable(QemuError, OSError):
    """QEMU (or the accelerator) cannot be used here at all; the plugin turns it into a skip."""
