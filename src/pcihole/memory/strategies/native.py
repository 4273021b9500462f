"""`native`: the seed's KVM_MEM_PCI_HOLE slots (userspace_addr 0; reads 0xff in the kernel, no backing).

Only where the hypervisor implements the proposed ABI (the model backend) and advertises
KVM_CAP_PCI_HOLE_MEM. Never on a real kernel: there flag bit 2 is KVM_MEM_GUEST_MEMFD and
capability 187 is KVM_CAP_STEAL_TIME (so check_extension(187) answering 1 means nothing).
Writes to a PCI_HOLE slot take the read-only fault path ([PATCH v2 2/3]), i.e. the in-kernel MMIO
bus first, so discard-holes get a coalesced zone as with ro-alias.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcihole.hv.proposed import KVM_CAP_PCI_HOLE_MEM, KVM_MEM_PCI_HOLE
from pcihole.memory.region import Hole, Mmio
from pcihole.memory.slot_planner import plan_plain_slots
from pcihole.memory.strategies.base import HoleLayout, HoleStrategy, SlotSpec, StrategyUnavailable, fill_runs

PCI_HOLE_FILL = 0xFF


class NativeStrategy(HoleStrategy):
    name = "native"

    @classmethod
    def missing(cls, hypervisor, vm) -> str | None:  # type: ignore[no-untyped-def]
        if not hypervisor.implements_proposed_abi:
            return (
                f"native needs KVM_CAP_PCI_HOLE_MEM, which the {hypervisor.name} backend lacks "
                "(KVM_MEM_PCI_HOLE was never merged; on a real kernel bit 2 is KVM_MEM_GUEST_MEMFD): "
                "use the model backend"
            )
        if not vm.check_extension(KVM_CAP_PCI_HOLE_MEM):
            return f"native needs KVM_CAP_PCI_HOLE_MEM, which this {hypervisor.name} hypervisor does not advertise"
        return None

    @classmethod
    def cannot_do(cls, holes: Sequence[Hole]) -> str | None:
        for h in holes:
            if h.fill != PCI_HOLE_FILL:
                return (
                    f"native cannot fill {h.describe()} with {h.fill:#04x}: KVM_MEM_PCI_HOLE reads always "
                    f"return {PCI_HOLE_FILL:#04x}"
                )
        return None

    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        if (reason := self.cannot_do(holes)) is not None:
            raise StrategyUnavailable(reason)
        slots = tuple(
            SlotSpec(p.range, KVM_MEM_PCI_HOLE, 0)
            for p in plan_plain_slots(fill_runs(holes), free_slots=free_slots)
        )
        zones, zoneless = self.write_zones(holes)
        return HoleLayout(slots=slots, zones=zones, zoneless=zoneless)
