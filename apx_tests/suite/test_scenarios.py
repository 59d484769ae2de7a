"""Every scenario on every bank through every selected backend (ids `kvm-ymm-import`).

The cases come from the plugin (pytest_generate_tests over apx_tests.scenarios.SCENARIOS,
the banks and --apx-backend); a bank this host cannot run skips with the backend's reason,
and the apx bank fails instead under --apx-require.
"""

import pytest

pytestmark = pytest.mark.apx


def test_scenario(apx_case):
    apx_case.execute()
