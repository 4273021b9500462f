"""`ro-alias`: KVM_MEM_READONLY slots that all alias one small sealed memfd of fill bytes.

Per fill value: one `SealedFillMemfd` (host/memfd.py) of `alias_size` bytes (64 KiB, more only when
the map budget demands it, see memory/slot_planner.py), and one *arena*: a PROT_NONE reservation
tiled with MAP_SHARED|MAP_FIXED, PROT_READ mappings of that memfd, as large as the longest hole
run. Every hole slot of that fill uses the arena's start as its userspace_addr, so the slots of all
holes share it, and punching a page only replaces slots, never host mappings. The arena outlives
any slot that points into it (a slot over unmapped host memory would make KVM_RUN fail with
EFAULT), so arenas are replaced only by `collect()`, after the slots using them are gone.

Reads: served from the alias, no exit. Writes: the slot is read-only, so a write takes the RO-fault
path into the in-kernel MMIO bus: with writes="discard" a coalesced zone over the hole swallows it
into the ring (no exit while the ring has room, drained at every exit); with writes="trap" there is
no zone and each write exits as MmioWrite for the trap handler (docs/kvm-memslot-rules.md, "Read-only
slots and coalesced MMIO").

Mirrored pages (a present PCI function's config page, region.py MirrorPage) are covered by the hole
slots too (`remaps_mirrors`): the runs are cut around the holes *and* the mirrored pages punched
out of them, which is the same set before and after a page is punched or filled, so hot-plug
changes no slot. A slot whose run holds a mirrored page gets an arena of its own (the shared one
aliases the same host pages at every offset), and the page's place in it is the mirror's file page
(PageAlias, mapped by layout_change.py): hot-adding a function is one mmap(MAP_FIXED), and only the
coalesced zones of writes="discard" holes still change (trap holes have none). A run turns from
shared to own arena (one slot change) only when its first mirrored page arrives. Own arenas are not
shared between windows, so each costs its own mappings and host page tables (about 512 KiB per
fully probed 256 MiB window); where they would not fit in the mapping budget, the mirrored pages get
memslots of their own instead (and hot-plug changes slots, as with the other strategies).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pcihole.host.memfd import SealedFillMemfd
from pcihole.host.mman import MAP_SHARED, PROT_READ, HostMapping
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from pcihole.memory.accounting import process_mappings
from pcihole.memory.address import GuestRange
from pcihole.memory.region import Hole, Mmio
from pcihole.memory.slot_planner import AliasPlan, default_map_budget, plan_alias
from pcihole.memory.strategies.base import HoleLayout, HoleStrategy, PageAlias, SlotSpec, fill_runs

MAX_MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"


def max_map_count() -> int:
    with open(MAX_MAP_COUNT_FILE) as f:
        return int(f.read())


@dataclass
class Arena:
    fill: int
    alias_size: int
    memfd: SealedFillMemfd
    reservation: HostMapping
    #: The guest range of the one slot over it, for an arena with mirrored pages; None: shared.
    owner: GuestRange | None = None

    @property
    def addr(self) -> int:
        return self.reservation.addr

    @property
    def size(self) -> int:
        return self.reservation.size

    @property
    def mappings(self) -> int:
        return -(-self.size // self.alias_size)


class RoAliasStrategy(HoleStrategy):
    name = "ro-alias"
    remaps_mirrors = True

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.arenas: list[Arena] = []
        self.memfds: dict[tuple[int, int], SealedFillMemfd] = {}

    @classmethod
    def missing(cls, hypervisor, vm) -> str | None:  # type: ignore[no-untyped-def]
        if not vm.check_extension(KvmCap.KVM_CAP_READONLY_MEM):
            return "ro-alias needs KVM_CAP_READONLY_MEM, which this kernel lacks"
        return None

    def budget(self) -> int:
        """Host mappings the arenas may use in all (slot_planner.py explains the choice)."""
        if self.map_budget is None:
            # Fixed at the first layout (reading /proc/self/maps costs ~1 ms with thousands of
            # arena lines, too much for every punch); our own arenas are given back to the budget.
            self.map_budget = default_map_budget(max_map_count(), process_mappings() - self.host_mappings())
        return self.map_budget

    def _plan(self, runs: list[tuple[GuestRange, int]], free_slots: int) -> AliasPlan:
        granule = self.tuning.alias_granule
        if granule is None:
            return plan_alias(runs, free_slots=free_slots, map_budget=self.budget())
        return plan_alias(
            runs, free_slots=free_slots, map_budget=self.budget(), alias_min=granule, alias_max=granule
        )

    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        covered = [m for m in mirrored if m.mirror is not None and m.underlay is not None]
        if covered:
            runs = fill_runs([*holes, *(m.underlay for m in covered if m.underlay is not None)])
            plan = self._plan(runs, free_slots)
            if self._own_arena_mappings(plan, covered) <= self.budget():
                return self._layout(holes, plan, covered)
            # The own arenas would not fit in the mapping budget: the mirrored pages get slots of
            # their own (GuestMemory adds them), and hot-plug changes slots again.
        plan = self._plan(fill_runs(holes), free_slots)
        return self._layout(holes, plan, [])

    @staticmethod
    def _runs_with_pages(plan: AliasPlan, covered: Sequence[Mmio]) -> dict[GuestRange, list[Mmio]]:
        pages_in: dict[GuestRange, list[Mmio]] = {}
        starts = [p.range.start.value for p in plan.slots]
        for m in covered:
            i = bisect.bisect_right(starts, m.range.start.value) - 1
            pages_in.setdefault(plan.slots[i].range, []).append(m)
        return pages_in

    def _own_arena_mappings(self, plan: AliasPlan, covered: Sequence[Mmio]) -> int:
        """Mappings the layout would use: the shared arenas, each own arena's aliases, and two more
        per mirrored page (it splits an alias mapping in three)."""
        alias = {spec.fill: spec for spec in plan.aliases}
        own = self._runs_with_pages(plan, covered)
        own_maps = sum(-(-p.range.size // alias[p.fill].alias_size) for p in plan.slots if p.range in own)
        shared_fills = {p.fill for p in plan.slots if p.range not in own}
        return sum(alias[f].mappings for f in shared_fills) + own_maps + 2 * len(covered)

    def _layout(self, holes: Sequence[Hole], plan: AliasPlan, covered: Sequence[Mmio]) -> HoleLayout:
        shared = {spec.fill: spec for spec in plan.aliases}
        pages_in = self._runs_with_pages(plan, covered)
        flags = int(KvmMemFlag.KVM_MEM_READONLY)
        slots, pages = [], []
        for p in plan.slots:
            spec = shared[p.fill]
            own = pages_in.get(p.range)
            if not own:
                arena = self._arena(p.fill, spec.alias_size, spec.arena_size)
                slots.append(SlotSpec(p.range, flags, arena.addr))
                continue
            arena = self._arena(p.fill, spec.alias_size, p.range.size, owner=p.range)
            slots.append(SlotSpec(p.range, flags, arena.addr))
            for m in own:
                assert m.mirror is not None
                off = m.range.start.value - p.range.start.value
                pages.append(
                    PageAlias(m.range.start.value, arena.addr + off, m.mirror.fd, m.mirror.offset,
                              arena.memfd.fd, off % arena.alias_size)
                )  # fmt: skip
        zones, zoneless = self.write_zones(holes)
        return HoleLayout(slots=tuple(slots), zones=zones, zoneless=zoneless, pages=tuple(pages))

    def _arena(self, fill: int, alias_size: int, size: int, owner: GuestRange | None = None) -> Arena:
        # Re-use any shared arena of this fill that is large enough: its pages are all `fill`,
        # whatever its alias size, and keeping it keeps the slots that point at it unchanged. An
        # arena with mirrored pages belongs to its one slot's range.
        for a in self.arenas:
            if owner is None and a.owner is None and a.fill == fill and a.size >= size:
                return a
            if owner is not None and a.owner == owner and a.fill == fill:
                return a
        memfd = self.memfds.get((fill, alias_size))
        if memfd is None:
            memfd = self.memfds[(fill, alias_size)] = SealedFillMemfd(alias_size, fill)
        reservation = HostMapping.reserve(size, name=f"ro-alias arena fill={fill:#04x}")
        try:
            for offset in range(0, size, alias_size):
                length = min(alias_size, size - offset)
                reservation.map_fixed(offset, length, PROT_READ, MAP_SHARED, memfd.fd, 0)
            if self.tuning.prefault:
                reservation.populate_read()  # no host fault on the guest's first touch (HoleTuning)
        except BaseException:
            reservation.close()
            self._drop_unused_memfds()
            raise
        arena = Arena(fill, alias_size, memfd, reservation, owner)
        self.arenas.append(arena)
        return arena

    def collect(self, live: Iterable[SlotSpec]) -> None:
        hvas = {s.hva for s in live}
        keep = []
        for a in self.arenas:
            if a.addr in hvas:
                keep.append(a)
            else:
                a.reservation.close()
        self.arenas = keep
        self._drop_unused_memfds()

    def _drop_unused_memfds(self) -> None:
        used = {id(a.memfd) for a in self.arenas}
        for key, memfd in list(self.memfds.items()):
            if id(memfd) not in used:
                memfd.close()
                del self.memfds[key]

    def backing_bytes(self) -> int:
        # Distinct pages: the memfds' allocated blocks. Not Rss, which counts every mapping again.
        return sum(m.allocated_bytes() for m in self.memfds.values())

    def host_mappings(self) -> int:
        return sum(a.mappings for a in self.arenas)

    def memfd_fds(self) -> list[int]:
        return [m.fd for m in self.memfds.values()]


__all__ = ["Arena", "RoAliasStrategy", "max_map_count"]
