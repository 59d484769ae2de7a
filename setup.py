"""Build step for the wheel: guest sources and prebuilt guest code as package data.

guests/ at the top of the repository stays the one source of truth. build_py copies it
into the wheel as apx_tests/_guests and writes apx_tests/_prebuilt: every bank's payload
and the QEMU boot stub assembled here (llvm-mc >= 18), with manifest.json (name -> build
digest, source digest, code sha256). An installed plugin then finds its guests without a
checkout, and a host without LLVM still runs the payload cases (docs/guests.md).
Everything else is in pyproject.toml.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_guests(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's guests/ itself
        # This tree's builder, not whatever apx_tests the build environment has installed.
        sys.path.insert(0, str(ROOT))
        try:
            from apx_tests.guests import boot, build
        finally:
            sys.path.remove(str(ROOT))
        package = Path(self.build_lib) / "apx_tests"
        shipped, prebuilt = package / build.SHIPPED_GUESTS, package / build.PREBUILT
        for stale in (shipped, prebuilt):  # build/ may hold a previous build's copy
            shutil.rmtree(stale, ignore_errors=True)
        shutil.copytree(ROOT / "guests", shipped)
        prebuilt.mkdir(parents=True)
        # Assemble exactly the sources copied above, whatever $APX_GUESTS_DIR says (errors then
        # name guests/payload/<bank>.S, the file to fix).
        saved = os.environ.get("APX_GUESTS_DIR")
        os.environ["APX_GUESTS_DIR"] = str(ROOT / "guests")
        try:
            _, errors = build.write_prebuilt(lambda name, data: (prebuilt / name).write_bytes(data),
                                             extra=[boot.PREBUILT_STUB])
        finally:
            if saved is None:
                del os.environ["APX_GUESTS_DIR"]
            else:
                os.environ["APX_GUESTS_DIR"] = saved
        # Not fatal: the wheel still works where llvm-mc is installed, and the runtime error
        # for a missing payload quotes the .error file written here.
        for name, error in errors.items():
            print(f"warning: apx_tests wheel: no prebuilt {name}: {error}", file=sys.stderr)


setup(cmdclass={"build_py": build_py_with_guests})
