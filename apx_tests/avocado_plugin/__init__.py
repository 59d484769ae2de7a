"""avocado support: `avocado run apx:` runs the scenario cases as avocado tests.

- resolver.py:  the `apx` resolver plugin (entry point avocado.plugins.resolver), turning
                `apx:[PATTERN[,PATTERN...]]` into avocado-instrumented runnables, one per case.
- scenarios.py: the avocado-instrumented Test class those runnables name; its test
                methods are made at import time from apx_tests.scenarios.SCENARIOS x banks
                and run each case through apx_tests.cases (no second copy of any
                scenario logic).

See docs/avocado.md.
"""
