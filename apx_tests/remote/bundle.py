"""The zip shipped to a remote host (`python3 apx.pyz run-remote ...`).

Contents:
  __main__.py               runs apx_tests.remote.agent
  apx_tests/**.py           the package this process imported (no bytecode, no tests)
  guests/**                 the guest sources (only needed if a payload must be built there)
  payloads/<bank>.bin       the flat payloads built *here* (build cache), so the remote host
                            needs no llvm-mc; a bank that failed to build here has
                            payloads/<bank>.error instead, and the remote reports that error
                            exactly as a local run would.
  payloads/manifest.json    bank -> build digest, source digest and code sha256
                            (written by guests.build.write_prebuilt, as in a wheel's
                            apx_tests/_prebuilt)

Entries have a fixed timestamp, so the same tree gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import apx_tests

from ..guests.build import GuestBuildError, guests_dir, write_prebuilt

BUNDLE_NAME = "apx.pyz"
_EPOCH = (2020, 1, 1, 0, 0, 0)
MAIN = (
    "import os, sys\n"
    "from apx_tests.remote.agent import main\n"
    "sys.exit(main(sys.argv[1:], bundle=os.path.dirname(os.path.abspath(__file__))))\n"
)


@dataclass(frozen=True)
class Bundle:
    data: bytes
    payloads: dict[str, str]   # bank -> code sha256, for banks built here
    errors: dict[str, str]     # bank -> one-line build error

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, _EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_bundle(banks: list[str] | None = None) -> Bundle:
    """The bundle for this tree; payloads come from (and go to) the local build cache."""
    package = Path(apx_tests.__file__).resolve().parent
    buf = io.BytesIO()
    errors: dict[str, str] = {}
    with zipfile.ZipFile(buf, "w") as zf:
        _add(zf, "__main__.py", MAIN.encode())
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(package.parent)
            if "__pycache__" in rel.parts:
                continue
            _add(zf, rel.as_posix(), path.read_bytes())
        try:
            guests = guests_dir()
        except GuestBuildError as exc:
            guests = None
            errors["*"] = str(exc)
        if guests is not None:
            for path in sorted(p for p in guests.rglob("*") if p.is_file()):
                _add(zf, "guests/" + path.relative_to(guests).as_posix(), path.read_bytes())
        # The agent needs payloads only (KVM cases): no boot stub.
        payloads, failed = write_prebuilt(lambda name, data: _add(zf, f"payloads/{name}", data), banks)
        errors.update(failed)
    return Bundle(buf.getvalue(), payloads, errors)


def write_bundle(path: str | Path, banks: list[str] | None = None) -> Bundle:
    bundle = build_bundle(banks)
    Path(path).write_bytes(bundle.data)
    return bundle
