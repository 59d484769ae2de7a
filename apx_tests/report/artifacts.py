"""What a scenario Run used and, when it fails, what it leaves for a human to look at.

A RunRecorder attaches to a Run (apx_tests.scenarios.engine) through the Run's own
hooks -- session_wrapper, tamper, on_exit -- and notes which observers the scenario
asked (for the JUnit property apx.observers).  When the Run ends with an exception (or
always, with keep=True) it saves into its directory, before the sessions close:

  mailbox.bin      the guest's mailbox (16 KiB: header, LOAD, EXPECT, STORE areas)
  exported.bin     the newest session's state now, raw XSAVE (KVM_GET_XSAVE2; for QEMU
                   the image built from a migration stream saved now)
  expected.bin     exported.bin with the bank's registers set to what the guest was told
                   to expect (EXPECT area once it reached the verify stage, else LOAD)
  imported.bin     the last image handed to import (after any self-test tamper)
  intended.bin     that image before the tamper, when the tamper changed it
  decode.txt       `apx-tests decode exported.bin --expect expected.bin` (names the
                   registers that differ); decode-imported.txt: imported vs intended
and asks each QEMU session to keep its logs and newest migration file there (Machine
copies the command line, stderr, debugcon log and kept files into it on close; the
gdb observer writes its MI transcript there).

Only the standard library and apx_tests: no pytest here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..guests import protocol
from ..xsave import XsaveImage, diff_images

MAILBOX, EXPORTED, EXPECTED = "mailbox.bin", "exported.bin", "expected.bin"
IMPORTED, INTENDED = "imported.bin", "intended.bin"
DECODE, DECODE_IMPORTED = "decode.txt", "decode-imported.txt"
REPORT = "report.txt"
CLI_SOURCES = ("kvm", "host")  # `apx-tests decode --cpuid` sources tried for an image's layout


def safe_name(text: str) -> str:
    """A directory name for a test id (`kvm-ymm-import` stays as it is)."""
    name = re.sub(r"[^A-Za-z0-9._@+=-]+", "_", text).strip("._") or "test"
    return name[:150]


class RecordingSession:
    """A Session as the scenario sees it, noting each observer the scenario calls.
    Everything else goes to the wrapped session unchanged."""

    def __init__(self, session, recorder: "RunRecorder"):
        self._inner = session
        self._recorder = recorder

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def inner(self):
        return self._inner

    def _main(self) -> str:
        return next(iter(self._inner.observers()), "export")

    def export(self) -> XsaveImage:
        image = self._inner.export()
        self._recorder.observed(self._main())
        return image

    def export_raw(self) -> bytes:
        data = self._inner.export_raw()
        self._recorder.observed(self._main())
        return data

    def observers(self):
        return {name: self._recorder.watch(name, fn) for name, fn in self._inner.observers().items()}

    def views(self):
        return {name: self._recorder.watch(name, fn) for name, fn in self._inner.views().items()}

    def gpr_views(self):
        return {name: self._recorder.watch(name, fn) for name, fn in self._inner.gpr_views().items()}

    def debugger_write(self, values):
        self._recorder.observed("debugger_write")
        return self._inner.debugger_write(values)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unwrap(session):
    return session.inner if isinstance(session, RecordingSession) else session


class RunRecorder:
    """Attach to one Run; `directory` None records observers only (no files)."""

    def __init__(self, directory: str | os.PathLike | None = None, *, keep: bool = False):
        self.directory = Path(directory) if directory is not None else None
        self.keep = keep
        self.observers: list[str] = []         # in the order first used
        self.notes: list[str] = []             # the Run's notes
        self.problems: list[str] = []          # what could not be saved, and why
        self.files: list[str] = []             # what was saved (names in directory)
        self.explanations: list[str] = []      # what expected.bin etc. hold
        self.intended: XsaveImage | None = None
        self.imported: XsaveImage | None = None
        self.failed = False

    # ---- attaching -----------------------------------------------------------------------
    def attach(self, run) -> None:
        """Chain onto the Run's hooks (keeping whatever was set before)."""
        wrapper = run.session_wrapper
        run.session_wrapper = lambda s: RecordingSession(wrapper(s) if wrapper else s, self)
        tamper = run.tamper

        def before_import(image: XsaveImage) -> None:
            self.intended = image.copy()
            self.imported = image  # the object import gets: it is saved after the tamper
            if tamper is not None:
                tamper(image)
        run.tamper = before_import
        on_exit = run.on_exit

        def finished(r, exc) -> None:
            try:
                self.finish(r, exc)
            finally:
                if on_exit is not None:
                    on_exit(r, exc)
        run.on_exit = finished

    def observed(self, name: str) -> None:
        if name not in self.observers:
            self.observers.append(name)

    def watch(self, name: str, fn: Callable):
        def observe(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.observed(name)
            return result
        return observe

    # ---- the end of the run --------------------------------------------------------------
    def finish(self, run, exc: BaseException | None) -> None:
        self.notes = list(run.notes)
        self.failed = exc is not None
        if self.directory is None or not (self.failed or self.keep):
            return
        try:
            self.save(run)
        except Exception as error:  # never hide the scenario's own outcome
            self.problems.append(f"saving the run's state: {type(error).__name__}: {error}")

    def save(self, run) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        bank = run.bank
        session, mailbox = None, None
        for candidate in reversed(run.sessions):  # the newest session that still answers
            try:
                mailbox = _unwrap(candidate).read_area(0, protocol.MAILBOX_SIZE)
            except Exception as error:
                self.problems.append(f"mailbox of {_describe(candidate)}: {type(error).__name__}: {error}")
                continue
            session = _unwrap(candidate)
            break
        exported = None
        if session is not None:
            self._write(MAILBOX, bytes(mailbox))
            try:
                exported = session.export()
            except Exception as error:
                self.problems.append(f"export at the failure: {type(error).__name__}: {error}")
        if exported is not None:
            self._write(EXPORTED, exported.to_bytes())
            self.explanations.append(f"{EXPORTED}: {_describe(session)} state after the failure "
                                     f"({exported.where}, layout from {exported.layout.where})")
            values, area = _expected_values(bank, bytes(mailbox))
            if values is not None:
                expected = exported.copy(where=EXPECTED)
                expected.write_registers(values)
                self._write(EXPECTED, expected.to_bytes())
                self.explanations.append(f"{EXPECTED}: {EXPORTED} with the {bank.name} registers from the "
                                         f"mailbox {area} area")
                self._write(DECODE, decode_text(d, EXPORTED, EXPECTED, exported.layout))
        if self.imported is not None:
            self._write(IMPORTED, self.imported.to_bytes())
            self.explanations.append(f"{IMPORTED}: the last image handed to import")
            if self.intended is not None and self.intended.to_bytes() != self.imported.to_bytes():
                self._write(INTENDED, self.intended.to_bytes())
                self.explanations.append(f"{INTENDED}: that image before the self-test tamper")
                self._write(DECODE_IMPORTED, decode_text(d, IMPORTED, INTENDED, self.imported.layout))
        for candidate in run.sessions:  # QEMU: logs and the newest migration file on close
            keep = getattr(_unwrap(candidate), "keep_artifacts", None)
            if keep is not None:
                try:
                    keep(str(d))
                except Exception as error:
                    self.problems.append(f"keep_artifacts: {type(error).__name__}: {error}")

    def _write(self, name: str, data: bytes | str) -> None:
        path = self.directory / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        self.files.append(name)

    def summary_lines(self) -> list[str]:
        lines = [f"observers: {', '.join(self.observers) or 'none'}"]
        lines += [f"note: {note}" for note in self.notes]
        lines += self.explanations
        lines += [f"could not save: {p}" for p in self.problems]
        return lines


def _describe(session) -> str:
    inner = _unwrap(session)
    return f"{getattr(inner, 'backend', '?')} {getattr(getattr(inner, 'bank', None), 'name', '?')}"


def _expected_values(bank, mailbox: bytes):
    """(register values, area name) the guest was told to expect, from its mailbox."""
    header = protocol.read_mailbox(mailbox)
    if not header.valid or header.stage not in protocol.STAGES:
        return None, None
    if header.stage >= protocol.STAGE_VERIFIED:
        offset, area = protocol.EXPECT_AREA, "EXPECT"
    elif header.stage >= protocol.STAGE_LOADED:
        offset, area = protocol.LOAD_AREA, "LOAD"
    else:
        return None, None
    return bank.unpack(mailbox[offset:offset + bank.size]), area


# ---- decoding -----------------------------------------------------------------------------

_cli_layouts: dict[str, object] = {}


def cli_source_for(layout, sources=CLI_SOURCES) -> str | None:
    """The `apx-tests decode --cpuid` source whose layout equals `layout`, if any."""
    from ..cli import _layout
    for source in sources:
        if source not in _cli_layouts:
            try:
                _cli_layouts[source] = _layout(source)
            except Exception:
                _cli_layouts[source] = None
        if _cli_layouts[source] == layout:
            return source
    return None


def decode_text(directory: Path, image: str, expect: str, layout) -> str:
    """`apx-tests decode IMAGE --expect EXPECT` run in `directory`, its command line first.
    When no --cpuid source of the command has the image's layout (QEMU TCG's guest
    CPU), the same decode runs in-process with that layout."""
    source = cli_source_for(layout)
    if source is not None:
        argv = ["decode", image, "--layout", "auto", "--cpuid", source, "--expect", expect]
        proc = subprocess.run([sys.executable, "-m", "apx_tests.cli", *argv], cwd=directory, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        return f"$ apx-tests {' '.join(argv)}\n{proc.stdout}{proc.stderr}(exit status {proc.returncode})\n"
    from ..cli import decode_lines
    data = (directory / image).read_bytes()
    want = XsaveImage(layout, (directory / expect).read_bytes(), compacted=None, where=expect)
    got = XsaveImage(layout, data, compacted=None, where=image)
    differences = diff_images(want, got)
    lines = [f"# no `apx-tests decode --cpuid` source ({', '.join(CLI_SOURCES)}) has this image's layout "
             f"({layout.where}): the same decode, in-process, with that layout",
             *decode_lines(got)]
    if differences:
        lines.append(f"{len(differences)} difference(s) from {expect} (want = {expect}, got = {image}):")
        lines += [f"  {d}" for d in differences]
    else:
        lines.append(f"no differences from {expect}")
    return "\n".join(lines) + "\n"


# ---- per-test folders -----------------------------------------------------------------------

def finalize(staging: Path, destination: Path | None) -> Path | None:
    """Move `staging` to `destination` (replacing an older folder of that name), or
    delete it when `destination` is None.  Returns where the files are now."""
    if destination is None:
        shutil.rmtree(staging, ignore_errors=True)
        return None
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        shutil.move(str(staging), str(destination))
    else:
        destination.mkdir()
    return destination
