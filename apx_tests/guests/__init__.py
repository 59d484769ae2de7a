"""Guest payloads: small position-independent programs that load one register
bank, sync with the host through a mailbox, store the bank back and check it.

- protocol: the mailbox layout, stages, ports and status codes (the one sync
  protocol every backend speaks).
- build: assembling guests/payload/<bank>.S with llvm-mc >= 18 into flat,
  cached code; disassembly for tests and artifacts.

See docs/guests.md.
"""

from .build import (
    GuestBuildError,
    Instruction,
    Payload,
    available_banks,
    build_payload,
    decode,
    disassemble,
    find_llvm_mc,
    guests_dir,
    have_llvm_mc,
    listing,
)
from .protocol import BANK_LAYOUT, MAILBOX_SIZE, Mailbox, bank_bytes, initial_mailbox, read_mailbox

__all__ = [
    "BANK_LAYOUT",
    "GuestBuildError",
    "Instruction",
    "MAILBOX_SIZE",
    "Mailbox",
    "Payload",
    "available_banks",
    "bank_bytes",
    "build_payload",
    "decode",
    "disassemble",
    "find_llvm_mc",
    "guests_dir",
    "have_llvm_mc",
    "initial_mailbox",
    "listing",
    "read_mailbox",
]
