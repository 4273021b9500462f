"""`Kvm`: the /dev/kvm file descriptor (system ioctls)."""

from __future__ import annotations

import ctypes
import errno
import os

from pcihole.hv import uapi
from pcihole.hv.ioctls import KvmIoctl
from pcihole.hv.kvm.ioctl import KvmError, kvm_ioctl
from pcihole.hv.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"


class Kvm:
    """/dev/kvm. Creates `Vm`s; answers system-wide KVM_CHECK_EXTENSION."""

    name = "kvm"
    implements_proposed_abi = False

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = kvm_ioctl(self.fd, KvmIoctl.KVM_GET_API_VERSION)
            if version != uapi.KVM_API_VERSION:
                raise KvmError(errno.EINVAL, KvmIoctl.KVM_GET_API_VERSION, f"got {version}, need 12")
            self.vcpu_mmap_size = kvm_ioctl(self.fd, KvmIoctl.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return kvm_ioctl(self.fd, KvmIoctl.KVM_CHECK_EXTENSION, int(cap), f"cap={int(cap)}")

    def get_supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID, as a kvm_cpuid2 with `nent` filled entries."""
        cpuid = uapi.cpuid2_with(uapi.KVM_MAX_CPUID_ENTRIES)()
        cpuid.nent = uapi.KVM_MAX_CPUID_ENTRIES
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_SUPPORTED_CPUID, cpuid, f"nent={cpuid.nent}")
        return cpuid

    def create_vm(self) -> Vm:
        vm_fd = kvm_ioctl(self.fd, KvmIoctl.KVM_CREATE_VM, 0, "type=0")
        return Vm(vm_fd, self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
