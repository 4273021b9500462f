"""Coalesced MMIO and PIO (virt/kvm/coalesced_mmio.c) and the ring page userspace drains.

A zone is a write-only device on KVM_MMIO_BUS (or KVM_PIO_BUS when pio = 1). A write that lies
wholly inside a zone is appended to the VM's one ring page instead of exiting, unless the ring is
full; one entry is always left free, so a full ring holds KVM_COALESCED_MMIO_MAX - 1 writes and the
next write exits as usual. Reads are never coalesced (the device has no .read).
"""

from __future__ import annotations

import errno
import struct

from pcihole.host.mman import PAGE_SIZE
from pcihole.hv.exits import CoalescedWrite
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.io_bus import U64, IoBus
from pcihole.hv.uapi import KVM_COALESCED_MMIO_MAX

# struct kvm_coalesced_mmio_ring {u32 first, last; struct kvm_coalesced_mmio coalesced_mmio[]}
# struct kvm_coalesced_mmio {u64 phys_addr; u32 len; u32 pio; u8 data[8]}
_HEADER = struct.Struct("<II")
_ENTRY = struct.Struct("<QII8s")


class CoalescedRing:
    """The ring page (kvm->coalesced_mmio_ring), byte for byte in the kernel's layout."""

    def __init__(self) -> None:
        self.page = bytearray(PAGE_SIZE)

    @property
    def first(self) -> int:
        return _HEADER.unpack_from(self.page, 0)[0]

    @property
    def last(self) -> int:
        return _HEADER.unpack_from(self.page, 0)[1]

    def indices(self) -> tuple[int, int]:
        return _HEADER.unpack_from(self.page, 0)

    def set_indices(self, first: int, last: int) -> None:
        """Userspace's view: it may write `first` (and, like coalesced_io_test, `last`) at will."""
        _HEADER.pack_into(self.page, 0, first & 0xFFFFFFFF, last & 0xFFFFFFFF)

    def push(self, addr: int, data: bytes, pio: int) -> bool:
        """coalesced_mmio_write after the range check: False (-EOPNOTSUPP) when the ring is full."""
        first, insert = _HEADER.unpack_from(self.page, 0)
        if insert >= KVM_COALESCED_MMIO_MAX or (insert + 1) % KVM_COALESCED_MMIO_MAX == first:
            return False
        offset = _HEADER.size + insert * _ENTRY.size
        # memcpy(data, val, len): bytes past `len` keep whatever the entry held before.
        old = _ENTRY.unpack_from(self.page, offset)[3]
        _ENTRY.pack_into(self.page, offset, addr, len(data), pio, data + old[len(data) :])
        struct.pack_into("<I", self.page, 4, (insert + 1) % KVM_COALESCED_MMIO_MAX)
        return True

    def drain(self) -> list[CoalescedWrite]:
        """What a VMM does with the ring: consume entries from `first` up to `last`."""
        first, last = _HEADER.unpack_from(self.page, 0)
        out: list[CoalescedWrite] = []
        while first != last and first < KVM_COALESCED_MMIO_MAX:
            addr, length, pio, data = _ENTRY.unpack_from(self.page, _HEADER.size + first * _ENTRY.size)
            out.append(CoalescedWrite(addr, data[:length], bool(pio)))
            first = (first + 1) % KVM_COALESCED_MMIO_MAX
        struct.pack_into("<I", self.page, 0, first)
        return out


class CoalescedZone:
    """struct kvm_coalesced_mmio_dev: one registered zone."""

    def __init__(self, ring: CoalescedRing, addr: int, size: int, pio: int) -> None:
        self.ring = ring
        self.addr = addr
        self.size = size
        self.pio = pio

    def in_range(self, addr: int, length: int) -> bool:
        """coalesced_mmio_in_range: [addr, addr+len) fully inside the zone (len is a C int)."""
        if length < 0 or length >= 1 << 31:
            return False
        if addr + length > U64:
            return False
        return self.addr <= addr and addr + length <= self.addr + self.size

    def write(self, addr: int, data: bytes) -> bool:
        if not self.in_range(addr, len(data)):
            return False
        return self.ring.push(addr, data, self.pio)

    def read(self, addr: int, length: int) -> bytes | None:
        return None  # coalesced_mmio_ops has no .read

    def __repr__(self) -> str:
        return f"<CoalescedZone {'pio' if self.pio else 'mmio'} [{self.addr:#x}, +{self.size:#x})>"


class CoalescedZones:
    """kvm->coalesced_zones: register / unregister with the kernel's rules."""

    def __init__(self, ring: CoalescedRing, mmio_bus: IoBus, pio_bus: IoBus) -> None:
        self.ring = ring
        self.buses = {0: mmio_bus, 1: pio_bus}
        self.zones: list[CoalescedZone] = []

    @staticmethod
    def _detail(addr: int, size: int, pio: int) -> str:
        return f"addr={addr:#x}, size={size:#x}, pio={pio}"

    def register(self, addr: int, size: int, pio: int) -> None:
        """kvm_vm_ioctl_register_coalesced_mmio."""
        addr &= U64
        size &= 0xFFFFFFFF  # struct kvm_coalesced_mmio_zone: __u32 size
        pio &= 0xFFFFFFFF
        detail = self._detail(addr, size, pio)
        if pio not in (0, 1):
            raise ModelKvmError(errno.EINVAL, "KVM_REGISTER_COALESCED_MMIO", detail, "pio must be 0 or 1")
        zone = CoalescedZone(self.ring, addr, size, pio)
        self.buses[pio].register(addr, size, zone, "KVM_REGISTER_COALESCED_MMIO", detail)
        self.zones.append(zone)

    def unregister(self, addr: int, size: int, pio: int) -> None:
        """kvm_vm_ioctl_unregister_coalesced_mmio: drop every zone of this kind that contains the range.

        EINVAL for a `pio` other than 0 or 1, checked first as register does; otherwise 0, even when
        nothing matched.
        """
        addr &= U64
        size &= 0xFFFFFFFF
        pio &= 0xFFFFFFFF
        if pio not in (0, 1):
            detail = self._detail(addr, size, pio)
            raise ModelKvmError(errno.EINVAL, "KVM_UNREGISTER_COALESCED_MMIO", detail, "pio must be 0 or 1")
        for zone in list(self.zones):
            if zone.pio == pio and zone.in_range(addr, size):
                self.buses[pio].unregister(zone)
                self.zones.remove(zone)
