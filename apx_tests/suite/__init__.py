"""The apx_tests suite: tests marked ``apx`` that run against this host's KVM and QEMU.

Shipped inside the package so that ``pytest -m apx`` (with testpaths pointing here)
runs the same checks on any machine the plugin is installed on. Scenario tests are
added here by the scenario engine; ``test_probe.py`` checks what the probe reports.
"""
