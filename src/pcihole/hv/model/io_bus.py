"""struct kvm_io_bus: the in-kernel device buses (KVM_MMIO_BUS, KVM_PIO_BUS), as virt/kvm/kvm_main.c.

Devices are kept in the kernel's order (kvm_io_bus_register_dev inserts before the first range that
compares greater), an access is matched by kvm_io_bus_get_first_dev (a bsearch, then a walk back to
the first equal range) and offered to each matching device in turn until one accepts it
(__kvm_io_bus_write / __kvm_io_bus_read). Registration does not check overlaps: two devices may
cover the same addresses, and the first in bus order that accepts an access handles it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from pcihole.hv.model.errors import ModelKvmError

# include/linux/kvm_host.h
NR_IOBUS_DEVS = 1000
U64 = (1 << 64) - 1


class IoDevice(Protocol):
    """struct kvm_io_device_ops: return True where the kernel's callback returns 0 (handled)."""

    def write(self, addr: int, data: bytes) -> bool: ...
    def read(self, addr: int, length: int) -> bytes | None: ...


@dataclass(frozen=True, eq=False)
class IoRange:
    """struct kvm_io_range: `len` is a C int, so a u32 size >= 2**31 is negative here too."""

    addr: int
    len: int
    dev: IoDevice


def _as_c_int(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def kvm_io_bus_cmp(addr1: int, len1: int, addr2: int, len2: int) -> int:
    """kvm_io_bus_cmp: 0 when [addr1, +len1) lies inside range 2 (or hits it exactly if len2 == 0)."""
    if addr1 < addr2:
        return -1
    # "If r2->len == 0, match the exact address. If r2->len != 0, accept any overlapping write."
    if len2:
        addr1 = (addr1 + len1) & U64
        addr2 = (addr2 + len2) & U64
    if addr1 > addr2:
        return 1
    return 0


class IoBus:
    """One kvm_io_bus. `name` is for messages ("KVM_MMIO_BUS" / "KVM_PIO_BUS")."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ranges: list[IoRange] = []

    def __len__(self) -> int:
        return len(self.ranges)

    def register(self, addr: int, length: int, dev: IoDevice, ioctl: str, detail: str) -> None:
        """kvm_io_bus_register_dev: ENOSPC past NR_IOBUS_DEVS, no overlap check."""
        if len(self.ranges) > NR_IOBUS_DEVS - 1:
            raise ModelKvmError(
                errno.ENOSPC, ioctl, detail, f"{self.name} already has {NR_IOBUS_DEVS} devices"
            )
        new = IoRange(addr & U64, _as_c_int(length), dev)
        i = 0
        for i, r in enumerate(self.ranges):  # noqa: B007 - i is the insertion point after the loop
            if kvm_io_bus_cmp(r.addr, r.len, new.addr, new.len) > 0:
                break
        else:
            i = len(self.ranges)
        self.ranges.insert(i, new)

    def unregister(self, dev: IoDevice) -> bool:
        """kvm_io_bus_unregister_dev: remove the range of `dev`; False if it is not on the bus."""
        for i, r in enumerate(self.ranges):
            if r.dev is dev:
                del self.ranges[i]
                return True
        return False

    def _first_dev(self, addr: int, length: int) -> int:
        """kvm_io_bus_get_first_dev: lib/bsearch.c over the ranges, then back to the first match."""
        base, num = 0, len(self.ranges)
        found = -1
        while num > 0:
            pivot = base + (num >> 1)
            r = self.ranges[pivot]
            result = kvm_io_bus_cmp(addr, length, r.addr, r.len)
            if result == 0:
                found = pivot
                break
            if result > 0:
                base = pivot + 1
                num -= 1
            num >>= 1
        if found < 0:
            return -1
        while found > 0:
            r = self.ranges[found - 1]
            if kvm_io_bus_cmp(addr, length, r.addr, r.len) != 0:
                break
            found -= 1
        return found

    def _matching(self, addr: int, length: int):
        idx = self._first_dev(addr, length)
        if idx < 0:
            return
        ranges = self.ranges
        while idx < len(ranges) and kvm_io_bus_cmp(addr, length, ranges[idx].addr, ranges[idx].len) == 0:
            yield ranges[idx].dev
            idx += 1

    def write(self, addr: int, data: bytes) -> bool:
        """kvm_io_bus_write: True if some device took the write (no exit)."""
        if not self.ranges:
            return False
        return any(dev.write(addr, data) for dev in self._matching(addr, len(data)))

    def read(self, addr: int, length: int) -> bytes | None:
        """kvm_io_bus_read: the bytes of the first device that answers, or None (exit to userspace)."""
        if not self.ranges:
            return None
        for dev in self._matching(addr, length):
            value = dev.read(addr, length)
            if value is not None:
                return value
        return None
