"""What the backend interface (hv/interface.py) promises both backends: capability-gated methods and
the ioctl observer, the same on the model and on /dev/kvm."""

from __future__ import annotations

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv.proposed import KVM_CAP_MMIO_FILL
from pcihole.hv.uapi import KvmCap, kvm_userspace_memory_region
from tests.backends import BACKENDS

GPA = 0x10_0000
SIZE = 0x2_0000


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_the_observer_sees_each_vm_ioctl_with_its_argument(hypervisor):
    seen: list[tuple[str, object, float]] = []
    ram = HostMapping.anonymous(SIZE)
    vm = hypervisor.create_vm()
    try:
        vm.observer = lambda name, arg, seconds: seen.append((name, arg, seconds))
        vm.set_user_memory_region(0, 0, GPA, SIZE, ram.addr)
        vm.register_coalesced_mmio(GPA + 2 * SIZE, 0x1000)
        vm.set_user_memory_region(0, 0, GPA, 0, ram.addr)
        with pytest.raises(OSError):  # a failing ioctl is told too
            vm.set_user_memory_region(0, 0, GPA, 0, ram.addr)
        vm.observer = None
        vm.unregister_coalesced_mmio(GPA + 2 * SIZE, 0x1000)
    finally:
        vm.close()
        ram.close()
    assert [name for name, _, _ in seen] == [
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_REGISTER_COALESCED_MMIO",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_USER_MEMORY_REGION",
    ]
    regions = [arg for name, arg, _ in seen if name == "KVM_SET_USER_MEMORY_REGION"]
    assert all(isinstance(r, kvm_userspace_memory_region) for r in regions)
    assert [(r.slot, r.guest_phys_addr, r.memory_size) for r in regions] == [
        (0, GPA, SIZE),
        (0, GPA, 0),
        (0, GPA, 0),
    ]
    assert all(seconds >= 0 for _, _, seconds in seen)


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_optional_methods_answer_only_where_the_capability_says_so(hypervisor):
    vm = hypervisor.create_vm()
    try:
        if hypervisor.check_extension(KvmCap.KVM_CAP_EXT_CPUID):
            assert hypervisor.get_supported_cpuid().nent > 0
        else:
            with pytest.raises(OSError):
                hypervisor.get_supported_cpuid()
        if vm.check_extension(KVM_CAP_MMIO_FILL):
            vm.register_mmio_fill(GPA, 0x1000)
            vm.unregister_mmio_fill(GPA, 0x1000)
        else:
            with pytest.raises(OSError):
                vm.register_mmio_fill(GPA, 0x1000)
    finally:
        vm.close()
    assert hypervisor.check_extension(KvmCap.KVM_CAP_EXT_CPUID) == 1  # both: the model's is cpuid.py
    assert bool(hypervisor.check_extension(KVM_CAP_MMIO_FILL)) == (hypervisor.name == "model")
