"""`exit`: no memslot over the hole; every read exits and the VMM answers with the fill (what QEMU does).

Costs no host memory and one userspace exit per absent read. Discard-writes still go to a coalesced
zone where the backend has one, so they need no exit of their own (the ring is drained at the next
exit); trap-writes exit as MmioWrite.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcihole.memory.region import Hole, Mmio
from pcihole.memory.strategies.base import HoleLayout, HoleStrategy


class ExitStrategy(HoleStrategy):
    name = "exit"
    reads_exit = True
    maps_mirrors = False

    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        zones, zoneless = self.write_zones(holes)
        return HoleLayout(zones=zones, zoneless=zoneless)
