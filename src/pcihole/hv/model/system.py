"""`ModelKvm`: the model's /dev/kvm (what `open_backend("model")` returns)."""

from __future__ import annotations

import ctypes

from pcihole.hv.model import capabilities, cpuid
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
        """KVM_GET_SUPPORTED_CPUID: what the model's engine executes, plus KVM's paravirtual leaves
        (hv/model/cpuid.py says which features and why)."""
        return cpuid.supported_cpuid()

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
