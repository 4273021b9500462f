"""The guest-physical memory map as an immutable, validated value.

A `MemoryMap` is a sorted tuple of non-overlapping regions. It is never patched: every change
(`with_regions`, `punch`, `fill`, ...) returns a new map, which `GuestMemory.update()`
(memory/guest_memory.py) compares with the map in force, applies as memslot operations, and only
then swaps in. Lookups (`region_at`) bisect on the region starts, so the exit dispatch costs
O(log n) per access.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import replace

from pcihole.memory.address import GuestAddress, GuestRange, page_range
from pcihole.memory.region import Hole, MirrorPage, Mmio, MmioHandler, Region


class MemoryMapError(ValueError):
    """The regions do not form a valid map (overlap, nothing to punch, ...)."""


class OverlapError(MemoryMapError):
    def __init__(self, a: Region, b: Region) -> None:
        super().__init__(f"{a.describe()} overlaps {b.describe()}")
        self.regions = (a, b)


class MemoryMap:
    """Non-overlapping regions in address order. Gaps are allowed (nothing is there)."""

    __slots__ = ("_lasts", "_regions", "_starts")

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        ordered = sorted(regions, key=lambda r: r.range)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.range.overlaps(b.range):
                raise OverlapError(a, b)
        self._regions: tuple[Region, ...] = tuple(ordered)
        self._starts: list[int] = [r.range.start.value for r in ordered]
        self._lasts: list[int] = [r.range.last.value for r in ordered]

    # --- queries -------------------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryMap) and self._regions == other._regions

    def __hash__(self) -> int:
        return hash(self._regions)

    def region_at(self, addr: GuestAddress | int) -> Region | None:
        """The region containing addr, or None (bisect: the exit dispatch's lookup)."""
        a = int(addr)
        i = bisect.bisect_right(self._starts, a) - 1
        if i >= 0 and a <= self._regions[i].range.last.value:
            return self._regions[i]
        return None

    def region_holding(self, addr: int, size: int) -> Region | None:
        """The one region holding all of [addr, addr + size), or None (in no region, or across
        two): the exit path's lookup, on plain ints and the precomputed last bytes."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr + size - 1 <= self._lasts[i]:
            return self._regions[i]
        return None

    def regions_in(self, rng: GuestRange) -> list[Region]:
        """Every region that overlaps rng, in address order."""
        i = max(bisect.bisect_right(self._starts, rng.start.value) - 1, 0)
        out = []
        for r in self._regions[i:]:
            if r.range.start > rng.last:
                break
            if r.range.overlaps(rng):
                out.append(r)
        return out

    def holes(self) -> list[Hole]:
        return [r for r in self._regions if isinstance(r, Hole)]

    def hole_runs(self) -> list[list[Hole]]:
        """Maximal runs of address-adjacent holes with the same fill: one memslot can cover each run."""
        runs: list[list[Hole]] = []
        for h in self.holes():
            prev = runs[-1][-1] if runs else None
            if prev is not None and prev.fill == h.fill and prev.range.end == h.range.start.value:
                runs[-1].append(h)
            else:
                runs.append([h])
        return runs

    # --- changes (each returns a new map) ------------------------------------------------------------

    def with_regions(self, *added: Region) -> MemoryMap:
        return MemoryMap((*self._regions, *added))

    def without(self, *removed: Region) -> MemoryMap:
        missing = [r for r in removed if r not in self._regions]
        if missing:
            raise MemoryMapError(f"not in the map: {', '.join(r.describe() for r in missing)}")
        return MemoryMap(r for r in self._regions if r not in removed)

    def punch(
        self, rng: GuestRange, handler: MmioHandler, name: str = "", mirror: MirrorPage | None = None
    ) -> MemoryMap:
        """Carve rng out of the one hole that covers it; rng becomes an Mmio region answered by handler.

        Used for a present function's 4 KiB page. The Mmio region remembers the hole (`underlay`)
        so that fill() gives back exactly the same hole.
        """
        hole = self.region_at(rng.start)
        if not isinstance(hole, Hole) or not hole.range.covers(rng):
            found = hole.describe() if hole else "nothing"
            raise MemoryMapError(f"cannot punch {rng}: it is not inside one hole (found {found})")
        underlay = replace(hole, range=rng)
        pieces = [replace(hole, range=part) for part in hole.range.subtract(rng)]
        mmio = Mmio(rng, name or hole.name, handler=handler, mirror=mirror, underlay=underlay)
        return MemoryMap((*(r for r in self._regions if r is not hole), *pieces, mmio))

    def punch_page(
        self, addr: GuestAddress | int, handler: MmioHandler, name: str = "", mirror: MirrorPage | None = None
    ) -> MemoryMap:
        return self.punch(page_range(addr), handler, name, mirror)

    def fill(self, rng: GuestRange) -> MemoryMap:
        """Give a punched range back to its hole, merging it with the neighbouring pieces."""
        mmio = self.region_at(rng.start)
        if not isinstance(mmio, Mmio) or mmio.range != rng or mmio.underlay is None:
            found = mmio.describe() if mmio else "nothing"
            raise MemoryMapError(f"cannot fill {rng}: it is not a punched range (found {found})")
        hole = mmio.underlay
        merged = hole.range
        neighbours: list[Region] = []
        for r in (
            self.region_at(merged.start.value - 1) if merged.start.value else None,
            self.region_at(merged.end),
        ):
            if r is not None and hole.same_hole(r):
                neighbours.append(r)
                merged = GuestRange(min(merged.start, r.range.start), max(merged.last, r.range.last))
        drop = {id(mmio), *map(id, neighbours)}
        return MemoryMap((*(r for r in self._regions if id(r) not in drop), replace(hole, range=merged)))

    def fill_page(self, addr: GuestAddress | int) -> MemoryMap:
        return self.fill(page_range(addr))

    def punched(self) -> list[Mmio]:
        return [r for r in self._regions if isinstance(r, Mmio) and r.underlay is not None]

    def __repr__(self) -> str:
        body = ", ".join(r.describe() for r in self._regions)
        return f"MemoryMap({body})"


__all__ = ["MemoryMap", "MemoryMapError", "OverlapError"]
