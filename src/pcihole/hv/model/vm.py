"""`ModelVm`: one VM of the model (the VM ioctls), with the model-only extras of the proposed ABI."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pcihole.hv import uapi
from pcihole.hv.model import capabilities, dirty_log, page_levels
from pcihole.hv.model.coalesced import CoalescedRing, CoalescedZones
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.i8254 import (
    KVM_PIT_BASE_ADDRESS,
    KVM_PIT_MEM_LENGTH,
    KVM_SPEAKER_BASE_ADDRESS,
    KVM_SPEAKER_LENGTH,
    Pit,
)
from pcihole.hv.model.i8259 import PIC_PORTS
from pcihole.hv.model.io_bus import IoBus
from pcihole.hv.model.ioapic import IOAPIC_MEM_LENGTH
from pcihole.hv.model.irq_routing import build_routing
from pcihole.hv.model.irqchip import KVM_USERSPACE_IRQ_SOURCE_ID, Irqchip
from pcihole.hv.model.lapic import LocalApic
from pcihole.hv.model.memslots import PAGE_SHIFT, MemslotChange, MemslotTable
from pcihole.hv.model.mmio_fill import MmioFillDevices
from pcihole.hv.model.tsc import DEFAULT_TSC_KHZ
from pcihole.hv.model.vcpu import ModelVcpu
from pcihole.hv.uapi import KVM_PIT_SPEAKER_DUMMY, KvmCap

if TYPE_CHECKING:
    from pcihole.hv.interface import IoctlObserver

# arch/x86/include/asm/kvm_host.h: KVM_MAX_VCPU_IDS (kvm_vm_ioctl_create_vcpu: id >= it -> EINVAL).
KVM_MAX_VCPU_IDS = 4096


class ModelVm:
    """The model's VM: memslots, dirty logs, KVM_MMIO_BUS / KVM_PIO_BUS devices, vCPUs."""

    def __init__(self) -> None:
        self.memslots = MemslotTable()
        # Held while a change is committed and while a vCPU snapshots the slots: KVM_SET_USER_MEMORY_
        # REGION may come from any thread, also while a vCPU runs (kvm->slots_lock / SRCU).
        self.memslots_lock = threading.RLock()
        self.mmio_bus = IoBus("KVM_MMIO_BUS")
        self.pio_bus = IoBus("KVM_PIO_BUS")
        self.coalesced_ring = CoalescedRing()
        self.coalesced_zones = CoalescedZones(self.coalesced_ring, self.mmio_bus, self.pio_bus)
        self.mmio_fill = MmioFillDevices(self.mmio_bus)
        self.vcpus: list[ModelVcpu] = []
        self.closed = False
        self.observer: IoctlObserver | None = None
        #: The frequency of every vCPU's guest TSC (KVM_SET_TSC_KHZ; tsc.py), fixed at creation.
        self.tsc_khz = DEFAULT_TSC_KHZ
        #: KVM_CREATE_IRQCHIP's PICs and IOAPIC, and KVM_CREATE_PIT2's PIT (irqchip.py); None before.
        self.irqchip: Irqchip | None = None

    @contextlib.contextmanager
    def _ioctl(self, ioctl: str, arg: object = None) -> Iterator[None]:
        """Around every VM ioctl of the model: EBADF once the VM is closed; the observer is told."""
        if self.closed:
            raise ModelKvmError(errno.EBADF, ioctl, "", "the VM is closed")
        observer = self.observer
        if observer is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            observer(ioctl, arg, time.perf_counter() - start)

    def check_extension(self, cap: int) -> int:
        return capabilities.check_extension(cap)

    def write_guest(self, gpa: int, data: bytes) -> bool:
        """kvm_write_guest, for what the model itself writes into the guest (the kvmclock pages):
        `data` at `gpa` through the memslot's host pages, dirty-logged. False, with nothing
        written, where [gpa, gpa + len) is not all in one writable RAM slot."""
        with self.memslots_lock:
            slot = self.memslots.find_gpa(gpa)
            if slot is None or slot.readonly or slot.pci_hole or gpa + len(data) - 1 > slot.last:
                return False
            ctypes.memmove(slot.userspace_addr + gpa - slot.gpa, data, len(data))
            for gfn in range(gpa >> PAGE_SHIFT, ((gpa + len(data) - 1) >> PAGE_SHIFT) + 1):
                dirty_log.mark_page_dirty(slot, gfn)
        return True

    def read_guest(self, gpa: int, size: int) -> bytes | None:
        """kvm_read_guest within one RAM slot, else None."""
        with self.memslots_lock:
            slot = self.memslots.find_gpa(gpa)
            if slot is None or slot.pci_hole or gpa + size - 1 > slot.last:
                return None
            return ctypes.string_at(slot.userspace_addr + gpa - slot.gpa, size)

    # --- memory slots ------------------------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION with the kernel's checks (change_memory_region says what changed)."""
        self.change_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)

    def change_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange | None:
        """Model only: KVM_SET_USER_MEMORY_REGION, returning what changed (None: a no-op).

        Synchronous, as in KVM: on return no vCPU uses the old slots any more, so the caller may
        unmap the host pages of a slot it deleted or moved (ModelVcpu.sync_memslots).
        """
        region = None
        if self.observer is not None:  # what the kvm backend would pass, for the observer
            region = uapi.kvm_userspace_memory_region(
                slot & 0xFFFFFFFF, flags & 0xFFFFFFFF, guest_phys_addr & (2**64 - 1),
                memory_size & (2**64 - 1), userspace_addr & (2**64 - 1),
            )  # fmt: skip
        with self._ioctl("KVM_SET_USER_MEMORY_REGION", region):
            with self.memslots_lock:
                change = self.memslots.set_user_memory_region(
                    slot, flags, guest_phys_addr, memory_size, userspace_addr
                )
                generation = self.memslots.generation
            if change is not None:
                # kvm_swap_active_memslots + the MMU zap: running vCPUs see the new slots at their
                # next access (the model: at the next instruction boundary, in their own thread), and
                # synchronize_srcu: wait until they have (outside memslots_lock, which they take).
                vcpus = list(self.vcpus)
                for vcpu in vcpus:
                    vcpu.memslots_changed()
                for vcpu in vcpus:
                    vcpu.sync_memslots(generation)
            return change

    def max_mapping_level(self, gfn: int) -> int:
        """Model only: the largest page (PG_LEVEL_4K/2M/1G = 1/2/3) the memslot allows for `gfn`."""
        return page_levels.max_mapping_level(self.memslots, gfn)

    # --- dirty log ---------------------------------------------------------------------------------

    def get_dirty_log(self, slot: int) -> bytes:
        with self._ioctl("KVM_GET_DIRTY_LOG"):
            return dirty_log.get_dirty_log(self.memslots, slot)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        with self._ioctl("KVM_CLEAR_DIRTY_LOG"):
            dirty_log.clear_dirty_log(self.memslots, slot, first_page, num_pages, bitmap)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP: the model implements KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 only (else EINVAL)."""
        with self._ioctl("KVM_ENABLE_CAP"):
            if int(cap) == KvmCap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
                dirty_log.enable_manual_dirty_log_protect(self.memslots, tuple(args))
                return
            raise ModelKvmError(
                errno.EINVAL, "KVM_ENABLE_CAP", f"cap={int(cap)}, args={list(args)}", "not implemented"
            )

    # --- in-kernel MMIO / PIO devices ---------------------------------------------------------------

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool | int = False) -> None:
        with self._ioctl("KVM_REGISTER_COALESCED_MMIO", self._zone(addr, size, pio)):
            self.coalesced_zones.register(addr, size, int(pio))

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool | int = False) -> None:
        with self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", self._zone(addr, size, pio)):
            self.coalesced_zones.unregister(addr, size, int(pio))

    def _zone(self, addr: int, size: int, pio: bool | int) -> uapi.kvm_coalesced_mmio_zone | None:
        if self.observer is None:
            return None
        return uapi.kvm_coalesced_mmio_zone(addr=addr & (2**64 - 1), size=size & 0xFFFFFFFF, pio=int(pio))

    def register_mmio_fill(self, addr: int, size: int, fill: int = 0xFF, flags: int = 0) -> None:
        """Model only (KVM_CAP_MMIO_FILL): reads of [addr, addr+size) no slot maps return `fill`."""
        with self._ioctl("KVM_REGISTER_MMIO_FILL"):
            self.mmio_fill.register(addr, size, fill, flags)

    def unregister_mmio_fill(self, addr: int, size: int) -> None:
        with self._ioctl("KVM_UNREGISTER_MMIO_FILL"):
            self.mmio_fill.unregister(addr, size)

    # --- the in-kernel irqchip (kvm_arch_vm_ioctl) --------------------------------------------------

    def set_identity_map_addr(self, addr: int = 0) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR is VMX's (the real-mode EPT identity map): the model has no use
        for it and does not offer it (check_extension(KVM_CAP_SET_IDENTITY_MAP_ADDR) is 0)."""
        with self._ioctl("KVM_SET_IDENTITY_MAP_ADDR"):
            raise ModelKvmError(
                errno.ENOTTY, "KVM_SET_IDENTITY_MAP_ADDR", f"{addr:#x}", "not offered by the model"
            )

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: EEXIST if there is one, EINVAL once a vCPU exists; the PICs on
        KVM_PIO_BUS (kvm_pic_init: master, slave, ELCR), the IOAPIC on KVM_MMIO_BUS
        (kvm_ioapic_init), the default routing; vCPUs created afterwards get a LAPIC."""
        with self._ioctl("KVM_CREATE_IRQCHIP"):
            if self.irqchip is not None:
                raise ModelKvmError(errno.EEXIST, "KVM_CREATE_IRQCHIP", "", "the VM has an irqchip")
            if self.vcpus:
                raise ModelKvmError(errno.EINVAL, "KVM_CREATE_IRQCHIP", "", "vCPUs were created before")
            chip = Irqchip()
            for dev in chip.pic.devices:
                self.pio_bus.register(dev.base, PIC_PORTS, dev, "KVM_CREATE_IRQCHIP", f"8259 {dev.base:#x}")
            ioapic = chip.ioapic
            self.mmio_bus.register(
                ioapic.base_address, IOAPIC_MEM_LENGTH, ioapic, "KVM_CREATE_IRQCHIP", "IOAPIC"
            )
            self.irqchip = chip

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: EEXIST if there is one, ENOENT without the irqchip's PIC; ports 0x40-0x43,
        and 0x61 with KVM_PIT_SPEAKER_DUMMY (kvm_create_pit)."""
        with self._ioctl("KVM_CREATE_PIT2"):
            chip = self.irqchip
            if chip is not None and chip.pit is not None:
                raise ModelKvmError(errno.EEXIST, "KVM_CREATE_PIT2", f"flags={flags:#x}", "the VM has a PIT")
            if chip is None:
                raise ModelKvmError(errno.ENOENT, "KVM_CREATE_PIT2", f"flags={flags:#x}", "no in-kernel PIC")
            pit = Pit(chip, flags)
            self.pio_bus.register(
                KVM_PIT_BASE_ADDRESS, KVM_PIT_MEM_LENGTH, pit.ports, "KVM_CREATE_PIT2", "PIT"
            )
            if pit.speaker is not None:
                self.pio_bus.register(
                    KVM_SPEAKER_BASE_ADDRESS, KVM_SPEAKER_LENGTH, pit.speaker, "KVM_CREATE_PIT2", "speaker"
                )
            chip.pit = pit

    def set_irq_line(self, gsi: int, level: bool) -> None:
        """KVM_IRQ_LINE (kvm_vm_ioctl_irq_line): ENXIO without an irqchip; a GSI with no route is
        accepted and does nothing."""
        with self._ioctl("KVM_IRQ_LINE"):
            chip = self.irqchip
            if chip is None:
                raise ModelKvmError(
                    errno.ENXIO, "KVM_IRQ_LINE", f"gsi={gsi}, level={int(level)}", "no irqchip"
                )
            chip.set_irq(KVM_USERSPACE_IRQ_SOURCE_ID, gsi & 0xFFFFFFFF, bool(level))

    def set_gsi_routing(self, entries: Sequence[uapi.kvm_irq_routing_entry], flags: int = 0) -> None:
        """KVM_SET_GSI_ROUTING: EINVAL without an irqchip (kvm_arch_can_set_irq_routing), then
        kvm_set_irq_routing's checks (irq_routing.py); the new table replaces the old one whole."""
        with self._ioctl("KVM_SET_GSI_ROUTING"):
            chip = self.irqchip
            if chip is None:
                raise ModelKvmError(
                    errno.EINVAL, "KVM_SET_GSI_ROUTING", f"nr={len(entries)}, flags={flags:#x}", "no irqchip"
                )
            chip.set_routing(build_routing(entries, flags))

    # --- vCPUs -------------------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> ModelVcpu:
        """kvm_vm_ioctl_create_vcpu: EINVAL for an id >= KVM_MAX_VCPU_IDS, EEXIST for a duplicate."""
        with self._ioctl("KVM_CREATE_VCPU"):
            if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS:
                raise ModelKvmError(
                    errno.EINVAL, "KVM_CREATE_VCPU", f"id={vcpu_id}", "id >= KVM_MAX_VCPU_IDS"
                )
            if any(v.id == vcpu_id for v in self.vcpus):
                raise ModelKvmError(
                    errno.EEXIST, "KVM_CREATE_VCPU", f"id={vcpu_id}", "a vCPU with this id exists"
                )
            vcpu = ModelVcpu(self, vcpu_id)
            chip = self.irqchip
            if chip is not None:
                # kvm_arch_vcpu_create -> kvm_create_lapic: an in-kernel LAPIC, HLT handled in-kernel
                lapic = LocalApic(chip, vcpu)
                with chip.locked():
                    chip.lapics.append(lapic)
                vcpu.attach_lapic(lapic)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        if self.irqchip is not None:
            self.irqchip.close()  # no timer fires into a vCPU being closed
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        self.closed = True

    def __enter__(self) -> ModelVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
