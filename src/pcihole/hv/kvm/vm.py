"""`Vm`: a KVM virtual machine file descriptor (VM ioctls)."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING

from pcihole.hv import uapi
from pcihole.hv.ioctls import KvmIoctl
from pcihole.hv.irq_routing import describe
from pcihole.hv.kvm.ioctl import KvmError, kvm_ioctl
from pcihole.hv.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pcihole.hv.interface import IoctlObserver
    from pcihole.hv.kvm.system import Kvm

# Where KVM may put the three pages of the real-mode TSS that VMX needs (kvmtool and Firecracker use
# the same address). Harmless elsewhere; keep guest MMIO off [0xfffbd000, 0xfffc0000).
KVM_TSS_ADDRESS = 0xFFFBD000
# The one page of the EPT identity map for real mode under VMX: the page below the TSS, which is
# where KVM puts it by default (VMX_EPT_IDENTITY_PAGETABLE_ADDR); QEMU sets it explicitly too
# (kvm_arch_init -> kvm_vm_set_identity_map_addr), before any vCPU exists (api.rst 4.40).
KVM_IDENTITY_MAP_ADDRESS = KVM_TSS_ADDRESS - uapi.PAGE_SIZE

_FORBIDDEN_FLAGS = uapi.KvmMemFlag.KVM_MEM_GUEST_MEMFD


class MemslotFlagRefused(KvmError):
    """pcihole refused a memslot flag before reaching the kernel (errno EINVAL, as the kernel would)."""


def memslot_detail(slot: int, flags: int, gpa: int, size: int, hva: int) -> str:
    last = f"{gpa + size - 1:#x}" if size else "-"
    return f"slot={slot}, flags={flags:#x}, gpa=[{gpa:#x}, {last}], size={size:#x}, hva={hva:#x}"


class Vm:
    """One KVM VM. Owns its fd and its vCPUs; close() closes them all."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        # Sizes of the slots we created: KVM_GET_DIRTY_LOG copies ALIGN(npages, 64) / 8 bytes to the
        # buffer we pass, and nothing tells userspace npages but its own bookkeeping.
        self._slot_sizes: dict[int, int] = {}
        self.observer: IoctlObserver | None = None
        try:
            kvm_ioctl(fd, KvmIoctl.KVM_SET_TSS_ADDR, KVM_TSS_ADDRESS, f"{KVM_TSS_ADDRESS:#x}")
        except KvmError:
            os.close(fd)
            raise

    def _ioctl(self, request: KvmIoctl, arg: int | ctypes.Structure = 0, detail: str = "") -> int:
        return kvm_ioctl(self.fd, request, arg, detail, observer=self.observer)

    def check_extension(self, cap: int) -> int:
        return self._ioctl(KvmIoctl.KVM_CHECK_EXTENSION, int(cap), f"cap={int(cap)}")

    # --- the in-kernel platform (what QEMU's kvm_arch_init + kvm_irqchip_create do) ----------------

    def set_identity_map_addr(self, addr: int = KVM_IDENTITY_MAP_ADDRESS) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR; only valid before the first vCPU is created."""
        value = (ctypes.c_uint64 * 1)(addr)  # the kernel reads a __u64 through the pointer
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_IDENTITY_MAP_ADDR, value, f"{addr:#x}", observer=self.observer)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: an IOAPIC at 0xfec00000, two 8259 PICs, and an in-kernel LAPIC in each
        vCPU created afterwards. GSIs 0-15 reach the PICs and the IOAPIC, 16-23 the IOAPIC (api.rst 4.24)."""
        self._ioctl(KvmIoctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = uapi.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: an in-kernel i8254 on ports 0x40-0x43, its output on GSI 0. Needs the irqchip."""
        config = uapi.kvm_pit_config(flags=flags)
        self._ioctl(KvmIoctl.KVM_CREATE_PIT2, config, f"flags={flags:#x}")

    def set_irq_line(self, gsi: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive GSI `gsi` to `level`. An edge-triggered IOAPIC pin fires on 0 -> 1."""
        req = uapi.kvm_irq_level(irq=gsi, level=int(level))
        self._ioctl(KvmIoctl.KVM_IRQ_LINE, req, f"gsi={gsi}, level={int(level)}")

    def set_gsi_routing(self, entries: Sequence[uapi.kvm_irq_routing_entry], flags: int = 0) -> None:
        """KVM_SET_GSI_ROUTING: `entries` replace the whole GSI routing (kvm_set_irq_routing). EINVAL
        without the irqchip, for flags, a GSI >= KVM_MAX_IRQ_ROUTES, a pin out of range, or two
        routes of one GSI to the same chip."""
        routing = uapi.irq_routing_with(len(entries))(nr=len(entries), flags=flags)
        for i, entry in enumerate(entries):
            routing.entries[i] = entry
        shown = ", ".join(describe(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        self._ioctl(KvmIoctl.KVM_SET_GSI_ROUTING, routing, f"nr={len(entries)}, flags={flags:#x}: {shown}")

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION. Errors carry the kernel's errno (kvm_set_memory_region)."""
        detail = memslot_detail(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        if flags & _FORBIDDEN_FLAGS:
            # Bit 2 is KVM_MEM_GUEST_MEMFD on a real kernel (6.8+) and the seed's KVM_MEM_PCI_HOLE in
            # the model. Never let a request meant for one reach the other.
            raise MemslotFlagRefused(
                errno.EINVAL,
                "KVM_SET_USER_MEMORY_REGION",
                f"{detail}; flag bit 2 is KVM_MEM_GUEST_MEMFD on a real kernel, not the proposed "
                "KVM_MEM_PCI_HOLE (use the model backend for that); refused before the ioctl",
            )
        region = uapi.kvm_userspace_memory_region(
            slot & 0xFFFFFFFF,
            flags & 0xFFFFFFFF,
            guest_phys_addr & (2**64 - 1),
            memory_size & (2**64 - 1),
            userspace_addr & (2**64 - 1),
        )
        self._ioctl(KvmIoctl.KVM_SET_USER_MEMORY_REGION, region, detail)
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)

    def _bitmap_bytes(self, slot: int) -> int:
        npages = self._slot_sizes.get(slot, 0) // uapi.PAGE_SIZE
        return max(8, (npages + 63) // 64 * 8)

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: bit i of the little-endian bitmap is page i of the slot."""
        bitmap = ctypes.create_string_buffer(self._bitmap_bytes(slot))
        log = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(KvmIoctl.KVM_GET_DIRTY_LOG, log, f"slot={slot}")
        return bitmap.raw

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: bit i of `bitmap` clears page first_page + i."""
        need = (num_pages + 63) // 64 * 8
        buf = ctypes.create_string_buffer(bytes(bitmap).ljust(need, b"\0"), max(need, len(bitmap), 8))
        log = uapi.kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=ctypes.addressof(buf)
        )
        self._ioctl(
            KvmIoctl.KVM_CLEAR_DIRTY_LOG,
            log,
            f"slot={slot}, first_page={first_page}, num_pages={num_pages}",
        )

    def enable_cap(self, cap: int, *args: int) -> None:
        req = uapi.kvm_enable_cap(cap=int(cap))
        for i, a in enumerate(args):
            req.args[i] = a
        self._ioctl(KvmIoctl.KVM_ENABLE_CAP, req, f"cap={int(cap)}, args={list(args)}")

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = uapi.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        self._ioctl(
            KvmIoctl.KVM_REGISTER_COALESCED_MMIO, zone, f"addr={addr:#x}, size={size:#x}, pio={int(pio)}"
        )

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = uapi.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        self._ioctl(
            KvmIoctl.KVM_UNREGISTER_COALESCED_MMIO, zone, f"addr={addr:#x}, size={size:#x}, pio={int(pio)}"
        )

    def register_mmio_fill(self, addr: int, size: int, fill: int = 0xFF, flags: int = 0) -> None:
        """No kernel has the MMIO fill device (check_extension(KVM_CAP_MMIO_FILL) is 0 here): refused
        before any ioctl, as an unknown ioctl would be (ENOTTY)."""
        self._refuse_mmio_fill("KVM_REGISTER_MMIO_FILL", addr, size)

    def unregister_mmio_fill(self, addr: int, size: int) -> None:
        self._refuse_mmio_fill("KVM_UNREGISTER_MMIO_FILL", addr, size)

    def _refuse_mmio_fill(self, ioctl: str, addr: int, size: int) -> None:
        raise KvmError(
            errno.ENOTTY,
            ioctl,
            f"addr={addr:#x}, size={size:#x}; the MMIO fill device is the proposed ABI's, in no real "
            "kernel: use the model backend",
        )

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = self._ioctl(KvmIoctl.KVM_CREATE_VCPU, vcpu_id, f"id={vcpu_id}")
        ring_page = self.check_extension(uapi.KvmCap.KVM_CAP_COALESCED_MMIO)
        try:
            vcpu = Vcpu(fd, vcpu_id, self.kvm.vcpu_mmap_size, ring_page)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
