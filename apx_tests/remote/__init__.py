"""Running the KVM scenarios on other machines, over SSH (and the pieces avocado reuses).

- hosts:         `user@host[:port]` specs (`--apx-host`).
- caserun:       run scenario cases by id without pytest (the remote agent and the avocado
                 tests use it; the pytest plugin's `apx_case` makes the same decisions).
- bundle:        the zip shipped to a remote host: the apx_tests package, guests/ and the
                 payloads prebuilt here (the remote needs no LLVM).
- agent:         the remote entry point, `python3 apx.pyz run-remote --cases ... --json`.
- ssh:           one remote host: connect (paramiko, known_hosts checked), upload, run,
                 collect, clean up.
- pytest_remote: the pytest side (`--apx-host`, one item per remote case, fleets).
- testing:       a throwaway OpenSSH server on 127.0.0.1, for tests.

See docs/remote.md.
"""
