"""`ModelKvm`: the model's /dev/kvm (what `open_backend("model")` returns)."""

from __future__ import annotations

import ctypes
import errno

from pcihole.hv.model import capabilities
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.vm import ModelVm


class ModelKvm:
    """Creates ModelVms; answers KVM_CHECK_EXTENSION like the kernel for what the model implements."""

    name = "model"
    implements_proposed_abi = True

    def __init__(self) -> None:
        self.vms: list[ModelVm] = []

    def check_extension(self, cap: int) -> int:
        return capabilities.check_extension(cap)

    def get_supported_cpuid(self) -> ctypes.Structure:
        """Not offered (check_extension(KVM_CAP_EXT_CPUID) is 0): the model's vCPU runs Unicorn's
        CPUID, which the model does not describe."""
        raise ModelKvmError(errno.ENOTTY, "KVM_GET_SUPPORTED_CPUID", "", "the model has no CPUID table")

    def create_vm(self) -> ModelVm:
        vm = ModelVm()
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self.vms.clear()

    def __enter__(self) -> ModelKvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
