"""Guest-physical memory as a vCPU of the model sees it: the Unicorn regions built from the memslots.

Every guest access resolves as on KVM (memslot first, then the MMIO bus, then an exit):
- RAM slot: Unicorn maps the slot's own host pages (mem_map_ptr, zero-copy), so reads and writes
  never reach Python; a LOG_DIRTY slot adds a write hook that marks pages dirty.
- READONLY slot: the same host pages, then mem_protect(READ|EXEC). Unicorn marks such a region
  readonly, so a guest write calls the write-protect hook and the store itself is discarded
  (TLB_DISCARD_WRITE): the host pages are never written, even when they are PROT_READ.
- PCI_HOLE slot: read-only regions over the shared fill window (fill_window.py): reads are native.
- A slot whose host pages are not mapped (or not writable, for a RAM slot): KVM only finds out in
  KVM_RUN; so does the model, which maps the slot as MMIO whose callbacks fail the run with EFAULT.
- Everything else below PHYS_LIMIT: MMIO regions whose callbacks go to the MMIO bus, then exit.

When each region is mapped into Unicorn is mmu.py's business; how an access that leaves RAM is cut
into pieces and delivered (once, as KVM's emulator does) is emulator_read_write.py's: its read /
write hooks take the whole access before Unicorn splits it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import Enum

from pcihole.hv.model.memslots import Memslot, MemslotTable

# Unicorn's x86 CPU has 40 physical address bits (tested: a 2**40 MMIO map works).
PHYS_LIMIT = 1 << 40


class RegionKind(Enum):
    RAM = "ram"
    READONLY = "readonly"  # a READONLY slot: writes go down the MMIO write path
    RAM_HOST_READONLY = "ram, host pages read-only"  # writes fail KVM_RUN with EFAULT
    PCI_HOLE = "pci-hole"
    UNBACKED = "unbacked"  # no memslot: the MMIO bus, then an exit
    BAD_HVA = "bad hva"  # any access fails KVM_RUN with EFAULT


@dataclass(frozen=True)
class GuestRegion:
    start: int
    size: int
    kind: RegionKind
    slot: Memslot | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def memslot(self) -> Memslot:
        """The slot of a region made from one (every kind but UNBACKED)."""
        if self.slot is None:
            raise ValueError(f"{self.kind.value} region at {self.start:#x} has no memslot")
        return self.slot


class HostMaps:
    """/proc/self/maps as sorted intervals, to learn whether an HVA range is mapped (and writable)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.entries: list[tuple[int, int, bool, bool]] = []
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                self.starts.append(lo)
                self.entries.append((lo, hi, perms[0] == "r", perms[1] == "w"))

    def covers(self, addr: int, size: int, *, write: bool) -> bool:
        """True if [addr, addr+size) is mapped readable (and writable if `write`) without a hole."""
        end = addr + size
        i = bisect.bisect_right(self.starts, addr) - 1
        while addr < end:
            if i < 0 or i >= len(self.entries):
                return False
            lo, hi, r, w = self.entries[i]
            if not lo <= addr < hi or not r or (write and not w):
                return False
            addr = hi
            i += 1
        return True


def plan_regions(
    table: MemslotTable, phys_limit: int = PHYS_LIMIT, kinds: dict | None = None
) -> list[GuestRegion]:
    """The regions covering [0, phys_limit): one per slot (clipped), UNBACKED in between.

    `kinds` (Memslot -> RegionKind) caches what the host mappings made of each slot, so that a
    vCPU reads /proc/self/maps (ms with the 4096 mappings of an ro-alias hole) once per new slot,
    not at every change: the model, like KVM's MMU, looks at a slot's host pages when it first
    maps them, and a VMM that unmaps them under a live slot is not modelled.
    """
    kinds = {} if kinds is None else kinds
    host: HostMaps | None = None
    regions: list[GuestRegion] = []
    cursor = 0
    for slot in table:
        if slot.gpa >= phys_limit:
            break
        if slot.gpa > cursor:
            regions.append(GuestRegion(cursor, slot.gpa - cursor, RegionKind.UNBACKED))
        size = min(slot.size, phys_limit - slot.gpa)
        kind = kinds.get(slot)
        if kind is None:
            if slot.pci_hole:
                kind = RegionKind.PCI_HOLE
            else:
                host = host or HostMaps()
                if not host.covers(slot.userspace_addr, slot.size, write=False):
                    kind = RegionKind.BAD_HVA
                elif slot.readonly:
                    kind = RegionKind.READONLY
                elif not host.covers(slot.userspace_addr, slot.size, write=True):
                    kind = RegionKind.RAM_HOST_READONLY
                else:
                    kind = RegionKind.RAM
            kinds[slot] = kind
        regions.append(GuestRegion(slot.gpa, size, kind, slot))
        cursor = slot.gpa + size
    if cursor < phys_limit:
        regions.append(GuestRegion(cursor, phys_limit - cursor, RegionKind.UNBACKED))
    return regions
