"""<linux/kvm.h> and <asm/kvm.h> (x86-64), declared once as ctypes.

The kernel ABI, shared: the kvm backend passes these structs to /dev/kvm, the model backend takes the
same types and numbers (it is a model of KVM), and the memory layer names flags and capabilities with
them. So it lives beside hv/interface.py, not inside one backend.

Names are exactly the kernel's, so that a reader can grep the kernel for them. Sizes and offsets are
pinned by tests/hv/test_uapi.py the way bindgen's layout tests pin kvm-bindings. Logic stays out of
this file. Written against the uapi of Linux 6.x (kvm_run's system_event has `ndata`; the coalesced
ring entry's `pad` is the `pio` flag since 4.21).
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64
from enum import IntEnum, IntFlag

from pcihole.host.mman import PAGE_SIZE

KVM_API_VERSION = 12

# --- memslot flags (include/uapi/linux/kvm.h) ------------------------------------------------------


class KvmMemFlag(IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1
    # Since 6.8. The seed's KVM_MEM_PCI_HOLE used this bit; see hv/proposed.py.
    KVM_MEM_GUEST_MEMFD = 1 << 2


# --- capabilities (KVM_CHECK_EXTENSION) ------------------------------------------------------------


class KvmCap(IntEnum):
    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_COALESCED_MMIO = 15
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_PIT2 = 33
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_INTERNAL_ERROR_DATA = 40
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_MULTI_ADDRESS_SPACE = 118
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_COALESCED_PIO = 162
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
    KVM_CAP_STEAL_TIME = 187
    KVM_CAP_USER_MEMORY2 = 231
    KVM_CAP_GUEST_MEMFD = 234


# KVM_DIRTY_LOG_MANUAL_CAPS on x86 (PROTECT_ENABLE | INITIALLY_SET).
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# --- exit reasons ----------------------------------------------------------------------------------


class KvmExitReason(IntEnum):
    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_SYSTEM_EVENT = 24


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
# kvm_run.emulation_failure.flags: insn_size and insn_bytes are valid (Linux 5.14+).
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# kvm_pit_config.flags: no PC speaker port 0x61 in the kernel (Firecracker sets it).
KVM_PIT_SPEAKER_DUMMY = 1

# kvm_vcpu_events.flags: which optional parts KVM_SET_VCPU_EVENTS must take.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

KVM_APIC_REG_SIZE = 0x400

# --- structs ---------------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_interrupt(ctypes.Structure):
    """KVM_INTERRUPT's argument: the vector to inject (userspace irqchip only)."""

    _fields_ = [("irq", c_uint32)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    # union { __u32 pad; __u32 pio; }: pio = 1 puts the zone on KVM_PIO_BUS.
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("len", c_uint32), ("pio", c_uint32), ("data", c_uint8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    # Followed in the page by KVM_COALESCED_MMIO_MAX entries of kvm_coalesced_mmio.
    _fields_ = [("first", c_uint32), ("last", c_uint32)]


KVM_COALESCED_MMIO_MAX = (PAGE_SIZE - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(
    kvm_coalesced_mmio
)


class kvm_dirty_log(ctypes.Structure):
    # union { void __user *dirty_bitmap; __u64 padding2; }
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("dirty_bitmap", c_uint64),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    # Followed by `nent` kvm_cpuid_entry2; use cpuid2_with(n) for a sized type.
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


KVM_MAX_CPUID_ENTRIES = 256


def cpuid2_with(nent: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for `nent` entries (the flexible array made concrete)."""

    class kvm_cpuid2_n(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * nent)]

    return kvm_cpuid2_n


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    # Followed by `nmsrs` kvm_msr_entry; use msrs_with(n).
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def msrs_with(nmsrs: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for `nmsrs` entries."""

    class kvm_msrs_n(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * nmsrs)]

    return kvm_msrs_n


class kvm_irq_level(ctypes.Structure):
    # union { __u32 irq; __s32 status; }: the GSI in, the delivery status out (KVM_IRQ_LINE_STATUS).
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


# kvm_irq_routing_entry.type
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
# kvm_irq_routing_entry.u.irqchip.irqchip
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    # union { __u32 pad; __u32 devid; }: devid with KVM_MSI_VALID_DEVID in the entry's flags.
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32), ("devid", c_uint32)]


class kvm_irq_routing_entry_u(ctypes.Union):
    # The kernel's union also has s390 adapter, Hyper-V SINT and Xen event channel routes, all
    # inside pad[8]; the s390 adapter's __u64s give the union (and the entry) 8-byte alignment.
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", c_uint64 * 4),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing(ctypes.Structure):
    """KVM_SET_GSI_ROUTING's argument: `nr` entries follow (irq_routing_with)."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


def irq_routing_with(nr: int) -> type[ctypes.Structure]:
    """struct kvm_irq_routing with room for `nr` entries."""

    class kvm_irq_routing_n(ctypes.Structure):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * nr)]

    return kvm_irq_routing_n


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", c_uint8 * 128),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", c_uint8 * 256),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


# --- struct kvm_run and its exit union -------------------------------------------------------------


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),  # relative to the start of kvm_run
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(ctypes.Structure):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_char * SYNC_REGS_SIZE_BYTES),
    ]
