"""QEMU migration streams: the stream format (``stream``, ``records``) and the x86 vCPU
field mapping (``cpu_fields``).  See docs/migration.md."""
