"""A kernel under test: boot *that* kernel in QEMU and run the KVM cases against its KVM.

- kernel:     what ``--apx-kernel`` names (a bzImage with its modules, a directory from
              ``make install``/``modules_install``, a linux-image .deb, or ``debian``) as
              a ``KernelTree``: the image, its release and the modules the guest loads
              (the 9p transport, kvm and kvm_amd/kvm_intel), resolved from their modinfo.
- guest:      ``GuestHost``, a transport beside ``apx_tests.remote.ssh.RemoteHost``: it
              builds the initramfs (guests/kut/init.c and the modules), starts QEMU with
              the host's root shared read-only over 9p, and the remote agent
              (apx_tests.remote.agent) runs the cases inside; its JSON records come back
              on a second serial port.

The pytest side (``--apx-kernel``, one item per KVM case and kernel,
``kernel[<release>]-kvm-ymm-import``, reusing the remote items) is apx_tests.pytest.kut.

See docs/kernel-under-test.md.
"""
