"""One bus class for port I/O and MMIO (Firecracker's vstate/bus.rs, kvmtool's mmio.c).

Devices are inserted at [base, base + length) and see accesses relative to nothing: they get the
absolute address, since the ECAM host bridge decodes from it. Lookups bisect a sorted list.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class BusDevice(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...


class BusError(ValueError):
    pass


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, str, BusDevice]] = []  # (first, last, label, device)

    def insert(self, device: BusDevice, base: int, length: int, label: str) -> None:
        if length <= 0:
            raise BusError(f"{self.name} bus: {label} has length {length}")
        last = base + length - 1
        i = bisect.bisect_left(self._starts, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._entries):
                f, lst, other, _ = self._entries[j]
                if f <= last and base <= lst:
                    raise BusError(
                        f"{self.name} bus: {label} [{base:#x}, {last:#x}] overlaps {other} [{f:#x}, {lst:#x}]"
                    )
        self._starts.insert(i, base)
        self._entries.insert(i, (base, last, label, device))

    def find(self, addr: int, size: int = 1) -> BusDevice | None:
        """The device whose range holds all of [addr, addr + size), or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            first, last, _label, device = self._entries[i]
            if addr + size - 1 <= last:
                return device
        return None
