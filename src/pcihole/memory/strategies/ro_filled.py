"""`ro-filled`: KVM_MEM_READONLY slots over sealed buffers as large as the holes, filled with the fill.

The status quo the seed wants to replace: no exits for reads, but every byte of hole costs a byte of
host memory once the buffer is touched (we touch it all when filling, so it is all resident: 256 MiB
for a 256-bus ECAM). Each buffer is *gpa-linear*: the slot for [a, b] inside the buffer's hole
uses `buffer + (a - hole start)`, so punching a page out of a hole re-uses the same buffer for the
two new slots instead of allocating new ones, and filling it back re-uses it again. A buffer is
freed when no slot in force points into it.

A buffer is a sealed memfd as large as its hole (host/memfd.py: filled with write(2), then
F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), mapped MAP_SHARED and PROT_READ: hole
contract 4, as for ro-alias. A private anonymous buffer mprotect()ed read-only is not sealed:
mprotect(PROT_WRITE) succeeds on it, and a write through /proc/self/mem (FOLL_FORCE) breaks COW and
changes what the guest reads. On the sealed memfd's mapping both fail (the kernel clears
VM_MAYWRITE on a read-only shared mapping of a write-sealed memfd, mm/memfd.c). The host memory is
the same: the memfd's pages, all resident once filled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pcihole.host.memfd import SealedFillMemfd
from pcihole.host.mman import MAP_SHARED, PROT_READ, HostMapping
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from pcihole.memory.address import GuestRange
from pcihole.memory.region import Hole, Mmio
from pcihole.memory.slot_planner import plan_plain_slots
from pcihole.memory.strategies.base import HoleLayout, HoleStrategy, SlotSpec, fill_runs


@dataclass
class FilledBuffer:
    range: GuestRange  # the guest range this buffer is linear over
    fill: int
    memfd: SealedFillMemfd
    mapping: HostMapping

    def close(self) -> None:
        self.mapping.close()
        self.memfd.close()

    def hva_of(self, rng: GuestRange) -> int | None:
        if self.range.covers(rng):
            return self.mapping.addr + rng.start.offset_from(self.range.start)
        return None


class RoFilledStrategy(HoleStrategy):
    name = "ro-filled"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.buffers: list[FilledBuffer] = []

    @classmethod
    def missing(cls, hypervisor, vm) -> str | None:  # type: ignore[no-untyped-def]
        if not vm.check_extension(KvmCap.KVM_CAP_READONLY_MEM):
            return "ro-filled needs KVM_CAP_READONLY_MEM, which this kernel lacks"
        return None

    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        slots = []
        for plan in plan_plain_slots(fill_runs(holes), free_slots=free_slots):
            hva = self._hva_for(plan.range, plan.fill)
            slots.append(SlotSpec(plan.range, int(KvmMemFlag.KVM_MEM_READONLY), hva))
        zones, zoneless = self.write_zones(holes)
        return HoleLayout(slots=tuple(slots), zones=zones, zoneless=zoneless)

    def _hva_for(self, rng: GuestRange, fill: int) -> int:
        for buf in self.buffers:
            if buf.fill == fill and (hva := buf.hva_of(rng)) is not None:
                return hva
        memfd = SealedFillMemfd(rng.size, fill, name=f"pcihole-ro-filled-{fill:02x}")
        try:
            mapping = HostMapping.reserve(rng.size, name=f"ro-filled {rng}")
            try:
                mapping.map_fixed(0, rng.size, PROT_READ, MAP_SHARED, memfd.fd)
                if self.tuning.prefault:
                    mapping.populate_read()  # as ro-alias does (HoleTuning): the floor is compared alike
            except BaseException:
                mapping.close()
                raise
        except BaseException:
            memfd.close()
            raise
        self.buffers.append(FilledBuffer(rng, fill, memfd, mapping))
        return mapping.addr

    def collect(self, live: Iterable[SlotSpec]) -> None:
        hvas = [s.hva for s in live]
        keep = []
        for buf in self.buffers:
            m = buf.mapping
            if any(m.addr <= h < m.addr + m.size for h in hvas):
                keep.append(buf)
            else:
                buf.close()
        self.buffers = keep

    def backing_bytes(self) -> int:
        # A memfd's allocated blocks (all of it: it was filled), as DESIGN's hole_backing_bytes says.
        return sum(b.memfd.allocated_bytes() for b in self.buffers)

    def host_mappings(self) -> int:
        return len(self.buffers)
