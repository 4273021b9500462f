"""cpu_setup.configure_vcpu (QEMU's / Firecracker's vCPU set-up) on both backends: the same calls,
the same MSR values read back, and a guest's CPUID shows the normalised table."""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits
from pcihole.hv.cpu_setup import BOOT_MSRS, CPUID_1_ECX_HYPERVISOR, MSR_IA32_TSC, configure_vcpu

from .system_guest import RESULTS, run_system_guest

CPUID_1 = f"""
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, {RESULTS}
    mov %ecx, {RESULTS + 4}
"""


def boot_msrs_read_back(hv) -> dict[int, int]:
    vm = hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        configure_vcpu(hv, vcpu, irqchip=False)
        got = vcpu.get_msrs(list(BOOT_MSRS))
        vcpu.close()
        return got
    finally:
        vm.close()


def test_configure_vcpu_on_the_model(model_hv):
    got = boot_msrs_read_back(model_hv)
    assert set(got) == set(BOOT_MSRS)  # every one of them implemented
    assert {k: v for k, v in got.items() if k != MSR_IA32_TSC} == {
        k: v for k, v in BOOT_MSRS.items() if k != MSR_IA32_TSC
    }
    run = run_system_guest(
        model_hv, CPUID_1, [], setup=lambda vcpu: configure_vcpu(model_hv, vcpu, irqchip=False)
    )
    assert run.exits == [exits.Hlt()]
    ebx, ecx = struct.unpack_from("<II", run.results)
    assert ebx >> 24 == 0 and (ebx >> 16) & 0xFF == 1  # APIC ID of vCPU 0, one logical processor
    assert ecx & CPUID_1_ECX_HYPERVISOR


@pytest.mark.kvm
def test_configure_vcpu_msrs_match_kvm(kvm_hv, model_hv):
    kvm, model = boot_msrs_read_back(kvm_hv), boot_msrs_read_back(model_hv)
    kvm.pop(MSR_IA32_TSC), model.pop(MSR_IA32_TSC)  # a running counter on both
    assert model == kvm
