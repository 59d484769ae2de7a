"""Running the KVM scenarios on other machines, over SSH (and the pieces avocado reuses).

- hosts:         `user@host[:port]` specs (`--apx-host`).
  (Cases themselves, by id, are apx_tests.cases: the plugin, the agent and avocado share it.)
- bundle:        the zip shipped to a remote host: the apx_tests package, guests/ and the
                 payloads prebuilt here (the remote needs no LLVM).
- agent:         the remote entry point, `python3 apx.pyz run-remote --cases ... --json`.
- ssh:           one remote host: connect (paramiko, known_hosts checked), upload, run,
                 collect, clean up.
- labgrid:       labgrid places as hosts (`--apx-place`): the coordinator session (in a
                 helper process), PlaceSpec, PlaceHost (acquire before, release after).
- testing:       a throwaway OpenSSH server, and a labgrid coordinator + exporter, on
                 127.0.0.1, for tests.

The pytest side is apx_tests.pytest.remote (`--apx-host`, one item per remote case,
fleets) and apx_tests.pytest.labgrid (`--apx-place`: places join that fleet).

See docs/remote.md.
"""
