"""Pure tests: every uapi struct's size and field offsets, and the ioctl numbers.

The expected numbers are the kernel's (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h on
x86-64), written out here independently of the ctypes declarations, as bindgen's layout tests do.
"""

from __future__ import annotations

import ctypes

import pytest

from pcihole.hv import uapi
from pcihole.hv.ioctls import KvmIoctl

LAYOUTS = {
    uapi.kvm_userspace_memory_region: (
        32,
        {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
    ),
    uapi.kvm_regs: (144, {"rax": 0, "rbx": 8, "rsp": 48, "r8": 64, "r15": 120, "rip": 128, "rflags": 136}),
    uapi.kvm_segment: (
        24,
        {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15, "dpl": 16, "db": 17,
         "s": 18, "l": 19, "g": 20, "avl": 21, "unusable": 22, "padding": 23},
    ),
    uapi.kvm_dtable: (16, {"base": 0, "limit": 8, "padding": 10}),
    uapi.kvm_sregs: (
        312,
        {"cs": 0, "ds": 24, "es": 48, "fs": 72, "gs": 96, "ss": 120, "tr": 144, "ldt": 168, "gdt": 192,
         "idt": 208, "cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256, "efer": 264,
         "apic_base": 272, "interrupt_bitmap": 280},
    ),
    uapi.kvm_coalesced_mmio_zone: (16, {"addr": 0, "size": 8, "pio": 12}),
    uapi.kvm_coalesced_mmio: (24, {"phys_addr": 0, "len": 8, "pio": 12, "data": 16}),
    uapi.kvm_coalesced_mmio_ring: (8, {"first": 0, "last": 4}),
    uapi.kvm_dirty_log: (16, {"slot": 0, "padding1": 4, "dirty_bitmap": 8}),
    uapi.kvm_clear_dirty_log: (24, {"slot": 0, "num_pages": 4, "first_page": 8, "dirty_bitmap": 16}),
    uapi.kvm_cpuid_entry2: (
        40,
        {"function": 0, "index": 4, "flags": 8, "eax": 12, "ebx": 16, "ecx": 20, "edx": 24, "padding": 28},
    ),
    uapi.kvm_cpuid2: (8, {"nent": 0, "padding": 4}),
    uapi.kvm_msr_entry: (16, {"index": 0, "reserved": 4, "data": 8}),
    uapi.kvm_msrs: (8, {"nmsrs": 0, "pad": 4}),
    uapi.kvm_interrupt: (4, {"irq": 0}),
    uapi.kvm_irq_level: (8, {"irq": 0, "level": 4}),
    uapi.kvm_irq_routing_irqchip: (8, {"irqchip": 0, "pin": 4}),
    uapi.kvm_irq_routing_msi: (16, {"address_lo": 0, "address_hi": 4, "data": 8, "devid": 12}),
    uapi.kvm_irq_routing_entry_u: (32, {"irqchip": 0, "msi": 0, "pad": 0}),
    uapi.kvm_irq_routing_entry: (48, {"gsi": 0, "type": 4, "flags": 8, "pad": 12, "u": 16}),
    uapi.kvm_irq_routing: (8, {"nr": 0, "flags": 4}),
    uapi.kvm_mp_state: (4, {"mp_state": 0}),
    uapi.kvm_pit_config: (64, {"flags": 0, "pad": 4}),
    uapi.kvm_lapic_state: (1024, {"regs": 0}),
    uapi.kvm_translation: (24, {"linear_address": 0, "physical_address": 8, "valid": 16, "writeable": 17,
                                "usermode": 18, "pad": 19}),
    uapi.kvm_fpu: (416, {"fpr": 0, "fcw": 128, "fsw": 130, "ftwx": 132, "last_opcode": 134, "last_ip": 136,
                         "last_dp": 144, "xmm": 152, "mxcsr": 408}),
    uapi.kvm_vcpu_events: (
        64,
        {"exception": 0, "interrupt": 8, "nmi": 12, "sipi_vector": 16, "flags": 20, "smi": 24,
         "triple_fault_pending": 28, "reserved": 29, "exception_has_payload": 55, "exception_payload": 56},
    ),
    uapi.kvm_enable_cap: (104, {"cap": 0, "flags": 4, "args": 8, "pad": 40}),
    uapi.kvm_run: (
        2352,
        {"request_interrupt_window": 0, "immediate_exit": 1, "exit_reason": 8,
         "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16, "apic_base": 24,
         "exit": 32, "kvm_valid_regs": 288, "kvm_dirty_regs": 296, "s": 304},
    ),
    uapi.kvm_run_exit: (256, {"hw": 0, "mmio": 0, "io": 0}),
    uapi.kvm_run_mmio: (24, {"phys_addr": 0, "data": 8, "len": 16, "is_write": 20}),
    uapi.kvm_run_io: (16, {"direction": 0, "size": 1, "port": 2, "count": 4, "data_offset": 8}),
    uapi.kvm_run_internal: (136, {"suberror": 0, "ndata": 4, "data": 8}),
    uapi.kvm_run_system_event: (136, {"type": 0, "ndata": 4, "data": 8}),
    uapi.kvm_run_fail_entry: (16, {"hardware_entry_failure_reason": 0, "cpu": 8}),
}  # fmt: skip


@pytest.mark.parametrize("struct", list(LAYOUTS), ids=lambda s: s.__name__)
def test_struct_size_and_offsets(struct):
    size, offsets = LAYOUTS[struct]
    assert ctypes.sizeof(struct) == size
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset, field


def test_flexible_arrays_follow_their_headers():
    assert ctypes.sizeof(uapi.cpuid2_with(3)) == 8 + 3 * 40
    assert uapi.cpuid2_with(3).entries.offset == 8
    assert ctypes.sizeof(uapi.msrs_with(2)) == 8 + 2 * 16
    assert ctypes.sizeof(uapi.irq_routing_with(3)) == 8 + 3 * 48
    assert uapi.irq_routing_with(3).entries.offset == 8
    assert ctypes.alignment(uapi.kvm_irq_routing_entry) == 8


def test_coalesced_ring_holds_170_entries_on_4k_pages():
    assert uapi.KVM_COALESCED_MMIO_MAX == 170


IOCTLS = {
    # Values as the kernel's _IO/_IOR/_IOW/_IOWR macros give them on x86-64.
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_REGISTER_COALESCED_MMIO": 0x4010AE67,
    "KVM_UNREGISTER_COALESCED_MMIO": 0x4010AE68,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_NMI": 0xAE9A,
    "KVM_INTERRUPT": 0x4004AE86,  # <linux/kvm.h>: _IOW(KVMIO, 0x86, struct kvm_interrupt)
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
}


@pytest.mark.parametrize("name", list(IOCTLS))
def test_ioctl_number(name):
    assert KvmIoctl[name] == IOCTLS[name]


def test_every_ioctl_is_pinned():
    assert {i.name for i in KvmIoctl} == set(IOCTLS)
