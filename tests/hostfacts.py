"""Independent sources of host facts for the framework's own tests."""

from __future__ import annotations


def read_cpuinfo() -> dict[str, str]:
    """The first CPU's block of /proc/cpuinfo: an independent source for CPUID facts."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields
