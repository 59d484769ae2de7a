"""KVM backend: typed ioctls on /dev/kvm and the embedded micro-VMM."""

from .system import CpuidEntry, Kvm, KvmError, KvmUnavailable, Vcpu, Vm

__all__ = ["CpuidEntry", "Kvm", "KvmError", "KvmUnavailable", "Vcpu", "Vm"]
