"""`mmio-bus`: an in-kernel MMIO-bus device answering reads with the fill (Sean Christopherson's
alternative in the review of KVM_MEM_PCI_HOLE v2), where the hypervisor advertises KVM_CAP_MMIO_FILL.

No memslot and no backing. Discard-writes are dropped in the kernel (flags 0); trap-writes exit
(KVM_MMIO_FILL_WRITES_EXIT). A device counts against NR_IOBUS_DEVS like a coalesced zone.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcihole.hv.proposed import KVM_CAP_MMIO_FILL, KVM_MMIO_FILL_WRITES_EXIT
from pcihole.memory.address import GuestRange
from pcihole.memory.region import Hole, Mmio
from pcihole.memory.strategies.base import (
    ZONE_BUDGET,
    ZONE_MAX_BYTES,
    FillSpec,
    HoleLayout,
    HoleStrategy,
    StrategyUnavailable,
)


class MmioBusStrategy(HoleStrategy):
    name = "mmio-bus"

    @classmethod
    def missing(cls, hypervisor, vm) -> str | None:  # type: ignore[no-untyped-def]
        if not hypervisor.implements_proposed_abi or not vm.check_extension(KVM_CAP_MMIO_FILL):
            return (
                f"mmio-bus needs KVM_CAP_MMIO_FILL (an in-kernel MMIO fill device), which the {hypervisor.name} "
                "backend lacks: use the model backend"
            )
        return None

    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        fills: list[FillSpec] = []
        for h in sorted(holes, key=lambda h: h.range):
            flags = KVM_MMIO_FILL_WRITES_EXIT if h.writes == "trap" else 0
            prev = fills[-1] if fills else None
            if prev and prev.fill == h.fill and prev.flags == flags and prev.range.end == h.range.start.value:
                fills[-1] = FillSpec(GuestRange(prev.range.start, h.range.last), h.fill, flags)
            else:
                fills.append(FillSpec(h.range, h.fill, flags))
        pieces = tuple(FillSpec(r, f.fill, f.flags) for f in fills for r in f.range.split(ZONE_MAX_BYTES))
        if len(pieces) > ZONE_BUDGET:
            raise StrategyUnavailable(
                f"mmio-bus: the holes need {len(pieces)} MMIO fill devices, more than the {ZONE_BUDGET} "
                "this VMM allows itself on KVM_MMIO_BUS (NR_IOBUS_DEVS = 1000)"
            )
        return HoleLayout(fills=pieces)
