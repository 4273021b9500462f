"""Memslot ids: one allocator per VM, bounded by KVM_CAP_NR_MEMSLOTS.

KVM refuses `(u16)slot >= KVM_USER_MEM_SLOTS` with EINVAL (kvm_vm_ioctl_set_memory_region), and
KVM_CAP_NR_MEMSLOTS returns KVM_USER_MEM_SLOTS (32764 on x86). Every slot the VMM creates takes its
id from here, so the count can be checked before any ioctl instead of failing halfway through a map
change. Lowest free id first, as QEMU's kvm_get_free_slot does.
"""

from __future__ import annotations

import heapq


class SlotsExhausted(RuntimeError):
    """Every id below KVM_CAP_NR_MEMSLOTS is in use."""


class SlotAllocator:
    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"KVM_CAP_NR_MEMSLOTS must be positive, not {limit}")
        self.limit = limit
        self._next = 0  # ids >= _next have never been handed out
        self._freed: list[int] = []  # heap of returned ids below _next
        self._in_use: set[int] = set()

    def allocate(self) -> int:
        if self._freed:
            slot = heapq.heappop(self._freed)
        elif self._next < self.limit:
            slot = self._next
            self._next += 1
        else:
            raise SlotsExhausted(f"all {self.limit} memslots (KVM_CAP_NR_MEMSLOTS) are in use")
        self._in_use.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._in_use:
            raise ValueError(f"memslot {slot} is not allocated")
        self._in_use.remove(slot)
        heapq.heappush(self._freed, slot)

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)

    @property
    def free(self) -> int:
        return self.limit - len(self._in_use)

    def __len__(self) -> int:
        return len(self._in_use)


__all__ = ["SlotAllocator", "SlotsExhausted"]
