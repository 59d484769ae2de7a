"""apx_tests: a pytest plugin for x86 extended state (APX R16-R31 and stand-in banks)."""

__version__ = "0.1.0"
