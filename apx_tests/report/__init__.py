"""Reports for kernel CI and labs: KTAP, the terminal summary, artifacts of failing cases.

The pure parts; the pytest side (options, hooks, JUnit properties) is
apx_tests.pytest.reporting.  docs/ci.md says how CI wires them in.

  records.py    TestRecord: one test's outcome as the reports see it (label, bank,
                backend, scenario, status, reason, diagnostic lines), built from
                plain values, so it works on pytest-xdist's controller too
  ktap.py       KTAP version 1 (the kernel's Documentation/dev-tools/ktap.rst): one
                subtest per bank, the cases inside; other tests grouped by module
  summary.py    the bank x backend x scenario table (P/F/S per cell, skip reasons
                listed once), the host line, the host's JUnit properties
  artifacts.py  RunRecorder: which observers a Run used, its images, and on failure
                the raw XSAVE images, the mailbox and `apx-tests decode --expect`
"""

from .records import TestRecord, counts, parse_case_label

__all__ = ["TestRecord", "counts", "parse_case_label"]
