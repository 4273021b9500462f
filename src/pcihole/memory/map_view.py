"""The map in force, read-only: what answers the guest accesses that reach the VMM.

`MapInForce` is one immutable snapshot: the map, the kernel objects behind it, the host backing of
its RAM and ROM, and every coalesced zone ever registered. `GuestMemory` (guest_memory.py) builds a
new one for each change and swaps it in with one assignment; `MapView` answers from whichever is in
force when an access arrives, and never changes the layout. Between them, nothing is patched.

What reaches the view:
- MMIO exits (`read`, `write`): holes answer their fill and apply their write policy, Mmio regions
  go to their handler, RAM/ROM to their backing (only reachable while a slot is being replaced).
  An access spanning regions gets each byte from its own region (hole contract point 3).
- coalesced-ring entries (`coalesced`): a hole write that did not exit. An entry is judged by
  address against every zone ever registered, so a write coalesced while a page was hole is never
  delivered to the function punched there later.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pcihole.host.mman import HostMapping
from pcihole.hv.exits import CoalescedWrite
from pcihole.memory.accounting import ExitCounters
from pcihole.memory.address import GuestRange
from pcihole.memory.memory_map import MemoryMap
from pcihole.memory.region import Hole, Mmio, Ram, Region, Rom
from pcihole.memory.strategies.base import HoleLayout, SlotSpec

#: fill byte -> 8 of it (the largest access): a hole read's answer is a slice, not a new bytes
#: object built from the fill on every exit.
FILL_BYTES = tuple(bytes((b,)) * 8 for b in range(256))


@dataclass(frozen=True)
class ZoneHistory:
    """Every coalesced zone ever registered, merged and sorted (ring entries are judged by it)."""

    ranges: tuple[GuestRange, ...] = ()
    starts: tuple[int, ...] = ()

    def with_zones(self, zones: Iterable[GuestRange]) -> ZoneHistory:
        out: list[GuestRange] = []
        for r in sorted([*self.ranges, *zones]):
            if out and r.start.value <= out[-1].end:
                out[-1] = GuestRange(out[-1].start, max(out[-1].last, r.last))
            else:
                out.append(r)
        return ZoneHistory(tuple(out), tuple(r.start.value for r in out))

    def __contains__(self, addr: int) -> bool:
        i = bisect.bisect_right(self.starts, addr) - 1
        return i >= 0 and addr <= self.ranges[i].last.value


@dataclass(frozen=True)
class MapInForce:
    map: MemoryMap = field(default_factory=MemoryMap)
    #: What the kernel has: slot spec -> slot id.
    slots: Mapping[SlotSpec, int] = field(default_factory=dict)
    layout: HoleLayout = field(default_factory=HoleLayout)
    #: The host memory behind each RAM and ROM region of `map`.
    backings: Mapping[Region, HostMapping] = field(default_factory=dict)
    zones_ever: ZoneHistory = field(default_factory=ZoneHistory)

    def backing_at(self, addr: int, size: int) -> tuple[HostMapping, int]:
        """The backing holding [addr, addr + size) and the offset of addr in it."""
        r = self.map.region_at(addr)
        if not isinstance(r, Ram | Rom) or not r.range.contains(addr + size - 1):
            raise ValueError(f"[{addr:#x}, +{size:#x}) is not inside one RAM/ROM region")
        return self.backings[r], addr - r.range.start.value


class MapView:
    """Answers exits and ring entries from the map in force; counts what it answered."""

    def __init__(self) -> None:
        #: Replaced (never modified) by GuestMemory at each change.
        self.in_force = MapInForce()
        self.counters = ExitCounters()

    def read(self, addr: int, size: int) -> bytes | None:
        """The bytes a guest read that exited (KVM_EXIT_MMIO) sees; None if some byte is in no
        region (the caller decides)."""
        now = self.in_force  # one read of the reference: the whole answer comes from one map
        r = now.map.region_holding(addr, size)
        if r is not None:
            return self._read(now, r, addr, size)
        pieces = self._pieces(now, addr, size)
        if pieces is None:
            return None
        return b"".join(self._read(now, r, a, n) for r, a, n in pieces)

    def _read(self, now: MapInForce, r: Region, addr: int, size: int) -> bytes:
        if isinstance(r, Hole):
            self.counters.hole_reads += 1
            return FILL_BYTES[r.fill][:size] if size <= len(FILL_BYTES[0]) else bytes((r.fill,)) * size
        if isinstance(r, Mmio):
            self.counters.mmio_reads += 1
            assert r.handler is not None
            data = r.handler.read(addr - r.range.start.value, size)
            if len(data) != size:
                raise ValueError(f"{r.describe()}: handler returned {len(data)} bytes for a {size}-byte read")
            return data
        self.counters.memory_reads += 1
        return now.backings[r].read(addr - r.range.start.value, size)

    def write(self, addr: int, data: bytes) -> bool:
        """Handle a guest write that exited. False (and nothing written) if some byte is in no region."""
        now = self.in_force
        pieces = self._pieces(now, addr, len(data))
        if pieces is None:
            return False
        for r, a, n in pieces:
            self._write(now, r, a, data[a - addr : a - addr + n])
        return True

    def _pieces(self, now: MapInForce, addr: int, size: int) -> list[tuple[Region, int, int]] | None:
        """[addr, addr + size) cut where regions end: (region, address, length) for each piece;
        None (and counted) if some byte is in no region."""
        pieces = []
        pos, end = addr, addr + size
        while pos < end:
            r = now.map.region_at(pos)
            if r is None:
                self.counters.unclaimed += 1
                return None
            n = min(end, r.range.end) - pos
            pieces.append((r, pos, n))
            pos += n
        return pieces

    def _write(self, now: MapInForce, r: Region, addr: int, data: bytes) -> None:
        if isinstance(r, Hole):
            if r.writes == "trap":
                self._trap(r, addr, data)
            else:
                self.counters.hole_writes_discarded += 1
        elif isinstance(r, Mmio):
            self.counters.mmio_writes += 1
            assert r.handler is not None
            r.handler.write(addr - r.range.start.value, data)
        else:
            self.counters.memory_writes += 1
            if isinstance(r, Ram):
                now.backings[r].write(addr - r.range.start.value, data)
            # ROM: writes are dropped, as the hardware does.

    def _trap(self, hole: Hole, addr: int, data: bytes) -> None:
        self.counters.hole_writes_trapped += 1
        if hole.on_write is not None:
            hole.on_write(addr, data)

    def coalesced(self, writes: Iterable[CoalescedWrite]) -> list[CoalescedWrite]:
        """Take the drained ring entries that are hole writes; return the others, in order.

        An entry is a hole write if it lies in a zone ever registered (zones exist only over
        discard-holes). It is counted, and handed to the trap handler only if the hole there has
        since become writes="trap"; it is never delivered to a region punched there later.
        """
        now = self.in_force
        rest = []
        for w in writes:
            if w.pio or w.addr not in now.zones_ever:
                rest.append(w)
                continue
            r = now.map.region_at(w.addr)
            if isinstance(r, Hole) and r.writes == "trap":
                self._trap(r, w.addr, w.data)
            else:
                self.counters.hole_writes_coalesced += 1
        return rest


__all__ = ["MapInForce", "MapView", "ZoneHistory"]
