"""The hypervisor interface every backend implements, written down once.

The shape follows rust-vmm's kvm-ioctls: a `Hypervisor` (the /dev/kvm fd) creates `Vm`s, a `Vm`
creates `Vcpu`s, and each method is one KVM ioctl with the kernel's semantics: failures raise an
`OSError` subclass whose `.errno` is exactly what the kernel returns. The `kvm` backend issues the
real ioctls; the `model` backend (hv/model/) implements the same checks in Python, plus the
proposed ABI in `hv/proposed.py`.

Register state is exchanged as the uapi structs `kvm_regs` / `kvm_sregs` (hv/uapi.py) on both
backends: the model is a model of KVM, so it takes KVM's types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pcihole.hv.exits import CoalescedWrite, VcpuExit
    from pcihole.hv.uapi import kvm_cpuid2, kvm_regs, kvm_sregs


@runtime_checkable
class Vcpu(Protocol):
    id: int

    def get_regs(self) -> kvm_regs: ...
    def set_regs(self, regs: kvm_regs) -> None: ...
    def get_sregs(self) -> kvm_sregs: ...
    def set_sregs(self, sregs: kvm_sregs) -> None: ...
    def set_cpuid2(self, cpuid: kvm_cpuid2) -> None: ...

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

    def close(self) -> None: ...


@runtime_checkable
class Vm(Protocol):
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
    def create_vcpu(self, vcpu_id: int) -> Vcpu: ...
    def close(self) -> None: ...


@runtime_checkable
class Hypervisor(Protocol):
    #: "kvm" or "model"
    name: str
    #: True where the backend implements the seed's KVM_MEM_PCI_HOLE ABI and the MMIO fill device
    #: (hv/proposed.py). Never true for a real kernel: there bit 2 of the flags is KVM_MEM_GUEST_MEMFD.
    implements_proposed_abi: bool

    def check_extension(self, cap: int) -> int: ...
    def create_vm(self) -> Vm: ...
    def close(self) -> None: ...
