"""Everything pytest in one package: the apx_tests pytest plugin.

- plugin: the entry point (``pytest11: apx = apx_tests.pytest.plugin``): the marker, the
  ``apx`` option group, the ``apx_probe`` fixture; loads the modules below.
- options: the option values and ``apx_skip_or_fail`` (skip, or fail under --apx-require).
- items: the scenario cases as items (parametrization, deselection, ``apx_case``).
- reporting: JUnit properties, KTAP, artifacts, the terminal summary (docs/ci.md).
- faults: ``--apx-inject`` (docs/faults.md).
- remote, labgrid: ``--apx-host`` fleets and ``--apx-place`` (docs/remote.md).
- kut: ``--apx-kernel`` (docs/kernel-under-test.md).

No module of apx_tests outside this package imports it or pytest (tests/test_import_layers.py):
the remote agent and avocado run without pytest.  Inside, ``import pytest`` is the real
pytest (absolute imports); this package is always ``apx_tests.pytest``.
"""
