"""struct kvm_io_bus: the in-kernel device buses (KVM_MMIO_BUS, KVM_PIO_BUS), as virt/kvm/kvm_main.c.

Devices are kept in the kernel's order (kvm_io_bus_register_dev inserts before the first range that
compares greater), an access is matched by kvm_io_bus_get_first_dev (a bsearch, then a walk back to
the first equal range) and offered to each matching device in turn until one accepts it
(__kvm_io_bus_write / __kvm_io_bus_read). Registration does not check overlaps: two devices may
cover the same addresses, and the first in bus order that accepts an access handles it.

A change never edits the bus in place: as kvm_io_bus_register_dev / kvm_io_bus_unregister_dev build a
new struct kvm_io_bus and publish it with rcu_assign_pointer, register / unregister build a new tuple
and swap it in, and an access works on the tuple it read once. So a vCPU thread sees the bus whole,
before or after a change made by another thread (hot-plug), never a list being shortened under its
bsearch. Changes are serialized by a lock, as the kernel's by kvm->slots_lock.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
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


class PortRange:
    """One kvm_io_device of a chip with several (the 8259s' dev_master, dev_slave and dev_eclr, the
    PIT's dev and speaker_dev): it takes the accesses that start in [base, base + count) and hands
    them to the chip's read / write, and declines the others as the kernel's callbacks do after
    their range check (picdev_in_range, pit_in_range, "addr != KVM_SPEAKER_BASE_ADDRESS"), so the
    bus offers them to the next device or exits."""

    def __init__(
        self,
        base: int,
        count: int,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], bool],
    ) -> None:
        self.base = base
        self.count = count
        self._read = read
        self._write = write

    def read(self, addr: int, length: int) -> bytes | None:
        if not self.base <= addr < self.base + self.count:
            return None
        return self._read(addr, length)

    def write(self, addr: int, data: bytes) -> bool:
        if not self.base <= addr < self.base + self.count:
            return False
        return self._write(addr, data)


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
        self.ranges: tuple[IoRange, ...] = ()  # replaced, never modified (the module docstring)
        self._changes = threading.Lock()

    def __len__(self) -> int:
        return len(self.ranges)

    def register(self, addr: int, length: int, dev: IoDevice, ioctl: str, detail: str) -> None:
        """kvm_io_bus_register_dev: ENOSPC past NR_IOBUS_DEVS, no overlap check."""
        with self._changes:
            ranges = self.ranges
            if len(ranges) > NR_IOBUS_DEVS - 1:
                raise ModelKvmError(
                    errno.ENOSPC, ioctl, detail, f"{self.name} already has {NR_IOBUS_DEVS} devices"
                )
            new = IoRange(addr & U64, _as_c_int(length), dev)
            i = 0
            for i, r in enumerate(ranges):  # noqa: B007 - i is the insertion point after the loop
                if kvm_io_bus_cmp(r.addr, r.len, new.addr, new.len) > 0:
                    break
            else:
                i = len(ranges)
            self.ranges = (*ranges[:i], new, *ranges[i:])

    def unregister(self, dev: IoDevice) -> bool:
        """kvm_io_bus_unregister_dev: remove the range of `dev`; False if it is not on the bus."""
        with self._changes:
            ranges = self.ranges
            for i, r in enumerate(ranges):
                if r.dev is dev:
                    self.ranges = ranges[:i] + ranges[i + 1 :]
                    return True
        return False

    @staticmethod
    def _first_dev(ranges: tuple[IoRange, ...], addr: int, length: int) -> int:
        """kvm_io_bus_get_first_dev: lib/bsearch.c over the ranges, then back to the first match."""
        base, num = 0, len(ranges)
        found = -1
        while num > 0:
            pivot = base + (num >> 1)
            r = ranges[pivot]
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
            r = ranges[found - 1]
            if kvm_io_bus_cmp(addr, length, r.addr, r.len) != 0:
                break
            found -= 1
        return found

    def _matching(self, addr: int, length: int):
        ranges = self.ranges  # read once: the bus as it is now, whatever another thread changes
        idx = self._first_dev(ranges, addr, length)
        if idx < 0:
            return
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
