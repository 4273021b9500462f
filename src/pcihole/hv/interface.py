"""The hypervisor interface every backend implements, written down once.

The shape follows rust-vmm's kvm-ioctls: a `Hypervisor` (the /dev/kvm fd) creates `Vm`s, a `Vm`
creates `Vcpu`s, and each method is one KVM ioctl with the kernel's semantics: failures raise an
`OSError` subclass whose `.errno` is exactly what the kernel returns. The `kvm` backend issues the
real ioctls; the `model` backend (hv/model/) implements the same checks in Python, plus the
proposed ABI in `hv/proposed.py`.

Register state is exchanged as the uapi structs `kvm_regs` / `kvm_sregs` (hv/uapi.py) on both
backends: the model is a model of KVM, so it takes KVM's types.

What a backend may lack is asked with `check_extension`, as a VMM asks KVM, never with getattr:
`get_supported_cpuid` where KVM_CAP_EXT_CPUID is non-zero (both backends offer it; the model's
table is what its engine executes, hv/model/cpuid.py), the in-kernel irqchip (create_irqchip,
set_irq_line) and its LAPIC state (get_lapic / set_lapic) where KVM_CAP_IRQCHIP is, its PIT
where KVM_CAP_PIT2 is and its GSI routing (set_gsi_routing) where KVM_CAP_IRQ_ROUTING is (both
backends), KVM_SET_IDENTITY_MAP_ADDR where
KVM_CAP_SET_IDENTITY_MAP_ADDR is (kvm: VMX's real-mode identity map; the model has no use for it),
the MMIO fill device where KVM_CAP_MMIO_FILL is (hv/proposed.py; the model only). Without the
capability the method raises an OSError, as a kernel without the ioctl would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

#: Told of every ioctl a `Vm` issues, once it has returned or failed: (its name as <linux/kvm.h>
#: spells it, its argument: the uapi struct passed (kvm_userspace_memory_region, ...) or None,
#: the seconds spent in it). `pcihole bench` counts and times memory-layout changes with it.
IoctlObserver = Callable[[str, object, float], None]

if TYPE_CHECKING:
    import ctypes
    from collections.abc import Sequence

    from pcihole.hv.exits import CoalescedWrite, VcpuExit
    from pcihole.hv.uapi import kvm_fpu, kvm_irq_routing_entry, kvm_regs, kvm_sregs


@runtime_checkable
class Vcpu(Protocol):
    id: int

    def get_regs(self) -> kvm_regs: ...
    def set_regs(self, regs: kvm_regs) -> None: ...
    def get_sregs(self) -> kvm_sregs: ...
    def set_sregs(self, sregs: kvm_sregs) -> None: ...
    def set_cpuid2(self, cpuid: ctypes.Structure) -> None: ...

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of `indices` up to the first MSR the vCPU does not have (the
        kernel returns how many it read; the dict holds those)."""
        ...

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS in order; the first MSR refused raises OSError (EINVAL) naming it, after
        the ones before it were set."""
        ...

    def set_fpu(self, fpu: kvm_fpu) -> None: ...

    def run(self) -> VcpuExit:
        """KVM_RUN until the next exit to userspace, decoded (hv/exits.py)."""
        ...

    def kick(self) -> None:
        """Make the running (or the next) run() return Interrupted soon. Safe from another thread."""
        ...

    def complete_read(self, data: bytes) -> None:
        """Supply the bytes of the pending MmioRead / IoIn; the guest sees them on the next run()."""
        ...

    def drain_coalesced_mmio(self) -> list[CoalescedWrite]:
        """Consume every entry of the coalesced-MMIO ring (from `first` to `last`), oldest first."""
        ...

    def ring_indices(self) -> tuple[int, int]:
        """(first, last) of the coalesced-MMIO ring: entries are waiting while they differ. Safe from
        another thread (two aligned 32-bit loads)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Vm(Protocol):
    #: None, or called after each ioctl of this VM (see IoctlObserver).
    observer: IoctlObserver | None

    def check_extension(self, cap: int) -> int: ...

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION; raises OSError with the kernel's errno."""
        ...

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: ALIGN(npages, 64) / 8 bytes, bit i = page i of the slot."""
        ...

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None: ...
    def enable_cap(self, cap: int, *args: int) -> None: ...
    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None: ...
    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None: ...

    def register_mmio_fill(self, addr: int, size: int, fill: int = 0xFF, flags: int = 0) -> None:
        """The proposed MMIO fill device (where check_extension(KVM_CAP_MMIO_FILL) is non-zero):
        reads of [addr, addr + size) that no memslot maps return `fill` bytes without an exit."""
        ...

    def unregister_mmio_fill(self, addr: int, size: int) -> None: ...

    def set_identity_map_addr(self, addr: int = ...) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (where check_extension(KVM_CAP_SET_IDENTITY_MAP_ADDR) is
        non-zero), before any vCPU."""
        ...

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (where check_extension(KVM_CAP_IRQCHIP) is non-zero), before any vCPU:
        the 8259 pair, the IOAPIC at 0xfec00000, a LAPIC in every vCPU created afterwards (which
        then handles HLT in the kernel). EEXIST the second time, EINVAL after a vCPU."""
        ...

    def create_pit2(self, flags: int = ...) -> None:
        """KVM_CREATE_PIT2 (where check_extension(KVM_CAP_PIT2) is): the 8254 on ports 0x40-0x43
        driving GSI 0; ENOENT without the irqchip, EEXIST the second time."""
        ...

    def set_irq_line(self, gsi: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive GSI `gsi` (ENXIO without the irqchip)."""
        ...

    def set_gsi_routing(self, entries: Sequence[kvm_irq_routing_entry], flags: int = 0) -> None:
        """KVM_SET_GSI_ROUTING (where check_extension(KVM_CAP_IRQ_ROUTING) is non-zero; its value is
        KVM_MAX_IRQ_ROUTES): `entries` (hv/irq_routing.py) replace the whole routing, KVM's default
        included. EINVAL without the irqchip, for flags, for a GSI >= KVM_MAX_IRQ_ROUTES, for a pin
        out of range, for two routes of one GSI to the same chip."""
        ...

    def create_vcpu(self, vcpu_id: int) -> Vcpu: ...
    def close(self) -> None: ...


@runtime_checkable
class InterruptLines(Protocol):
    """The interrupt controller's input pins as a device sees them: drive GSI `gsi` high or low.

    Both backends' Vm is one once create_irqchip() has run: the in-kernel IOAPIC + 8259 pair
    behind KVM_IRQ_LINE (Vm.set_irq_line; the model's in hv/model/irqchip.py).
    Level semantics: an edge-triggered pin (ISA IRQs) fires on a 0 -> 1 change.
    """

    def set_irq_line(self, gsi: int, level: bool) -> None: ...


@runtime_checkable
class Hypervisor(Protocol):
    #: "kvm" or "model"
    name: str
    #: True where the backend implements the seed's KVM_MEM_PCI_HOLE ABI and the MMIO fill device
    #: (hv/proposed.py). Never true for a real kernel: there bit 2 of the flags is KVM_MEM_GUEST_MEMFD.
    implements_proposed_abi: bool

    def check_extension(self, cap: int) -> int: ...

    def get_supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID (where check_extension(KVM_CAP_EXT_CPUID) is non-zero): a
        kvm_cpuid2 with its entries (uapi.cpuid2_with), for Vcpu.set_cpuid2."""
        ...

    def create_vm(self) -> Vm: ...
    def close(self) -> None: ...
