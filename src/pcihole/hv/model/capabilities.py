"""What the model answers to KVM_CHECK_EXTENSION.

The values are the real kernel's (kvm_vm_ioctl_check_extension_generic in virt/kvm/kvm_main.c and
kvm_vm_ioctl_check_extension in arch/x86/kvm/x86.c), checked against this host's /dev/kvm (a 6.18
kernel; tests/model/test_vcpu.py::test_capabilities_match_the_kernel compares them), for every
capability the model implements.
Everything else answers 0, which is what the kernel answers for a capability it does not know.
"""

from __future__ import annotations

from pcihole.hv.model.irq_routing import KVM_MAX_IRQ_ROUTES
from pcihole.hv.proposed import KVM_CAP_MMIO_FILL, KVM_CAP_PCI_HOLE_MEM
from pcihole.hv.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KvmCap

# include/linux/kvm_host.h: KVM_MEM_SLOTS_NUM = SHRT_MAX, minus KVM_INTERNAL_MEM_SLOTS (3 on x86).
KVM_MEM_SLOTS_NUM = 32767
KVM_INTERNAL_MEM_SLOTS = 3
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS

# arch/x86/include/uapi/asm/kvm.h: the coalesced ring is page 2 of the vCPU mmap, and
# KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns that page offset.
KVM_COALESCED_MMIO_PAGE_OFFSET = 2

# arch/x86/include/asm/kvm_host.h: KVM_DIRTY_LOG_MANUAL_CAPS.
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# One memslot address space, like this host (KVM_CAP_MULTI_ADDRESS_SPACE = 0 there: the
# `#if KVM_MAX_NR_ADDRESS_SPACES > 1` case is compiled out, so the generic code answers 0).
KVM_ADDRESS_SPACE_NUM = 1

MODEL_CAPABILITIES: dict[int, int] = {
    # KVM_CREATE_IRQCHIP, KVM_IRQ_LINE and KVM_CREATE_PIT2 (irqchip.py). Not KVM_CAP_SET_IDENTITY_MAP_ADDR:
    # the real-mode identity map is VMX's, which the model's CPU is not.
    KvmCap.KVM_CAP_IRQCHIP: 1,
    KvmCap.KVM_CAP_PIT2: 1,
    # KVM_SET_GSI_ROUTING (irq_routing.py): kvm_vm_ioctl_check_extension_generic answers KVM_MAX_IRQ_ROUTES.
    KvmCap.KVM_CAP_IRQ_ROUTING: KVM_MAX_IRQ_ROUTES,
    KvmCap.KVM_CAP_USER_MEMORY: 1,
    KvmCap.KVM_CAP_HLT: 1,
    KvmCap.KVM_CAP_NR_MEMSLOTS: KVM_USER_MEM_SLOTS,
    KvmCap.KVM_CAP_COALESCED_MMIO: KVM_COALESCED_MMIO_PAGE_OFFSET,
    KvmCap.KVM_CAP_COALESCED_PIO: 1,
    # Changes to the memory behind a slot are seen by the guest at once: Unicorn maps the very
    # same host pages (mem_map_ptr), as KVM follows them through MMU notifiers.
    KvmCap.KVM_CAP_SYNC_MMU: 1,
    KvmCap.KVM_CAP_READONLY_MEM: 1,
    KvmCap.KVM_CAP_MULTI_ADDRESS_SPACE: 0,
    KvmCap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_DIRTY_LOG_MANUAL_CAPS,
    # KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 (cpuid.py).
    KvmCap.KVM_CAP_EXT_CPUID: 1,
    # The seed's ABI. On a real kernel 187 is KVM_CAP_STEAL_TIME, which also answers 1: a VMM must
    # not probe for PCI_HOLE with check_extension(187) on the kvm backend
    # (Hypervisor.implements_proposed_abi says which ABI a backend speaks).
    KVM_CAP_PCI_HOLE_MEM: 1,
    KVM_CAP_MMIO_FILL: 1,
}


def check_extension(cap: int) -> int:
    """kvm_vm_ioctl_check_extension_generic: the value, or 0 for what the model does not implement."""
    return MODEL_CAPABILITIES.get(int(cap), 0)
