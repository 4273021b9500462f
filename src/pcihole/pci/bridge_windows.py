"""How much of each host bridge window a root bus needs for the BARs below it, sized as Linux sizes
bridge windows, so the firmware tables can give every root bus (main or expander) enough.

pcihole has no firmware that assigns BARs: Linux assigns them all (pci_assign_unassigned_root_bus_
resources), sizing each bridge's windows from what is below it (__pci_bus_size_bridges ->
pbus_size_io / pbus_size_mem in drivers/pci/setup-bus.c), then placing the top-level resources in
the root bus's windows, the host bridge's _CRS. A root bus whose windows are too small gets "no space
for" / "failed to assign" lines. This module follows those functions, rounding up where Linux's
details (realloc lists, add_align) would need its whole state:

- every bridge of pcihole has an I/O window, a non-prefetchable memory window and a 64-bit
  prefetchable one (type1_header.py), like QEMU's;
- 64-bit prefetchable BARs go in the prefetchable window, every other memory BAR (32-bit,
  prefetchable or not, and 64-bit non-prefetchable) in the non-prefetchable one (__pci_bus_size_
  bridges: "all non-prefetchable resources and any 32-bit prefetchable resources will go in the
  non-prefetchable window");
- a window is the sum of what is below it, aligned as calculate_mem_align() aligns it (at least
  1 MiB for memory, 4 KiB for I/O: window_alignment()), plus, for a hot-plug bridge (every root and
  downstream port: is_hotplug_bridge, set from Slot Capabilities HPC), the room Linux adds for
  devices to come: pci_hotplug_io_size 256 bytes, pci_hotplug_mmio_size and
  pci_hotplug_mmio_pref_size 2 MiB each (DEFAULT_HOTPLUG_*_SIZE). Linux adds that room "optionally"
  and prints "failed to assign" when it does not fit, so it is counted;
- on the root bus itself, a 64-bit BAR is placed above 4 GiB first (pci_bus_alloc_resource tries
  pci_high for IORESOURCE_MEM_64), so it counts toward the 64-bit window.

The result for a root bus is the sum of its top-level resources: placed in decreasing alignment
from an aligned base, as pbus_assign_resources_sorted() places them, they leave no gap, so a
naturally aligned block of the next power of two holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcihole.memory.address import align_up

from .topology import (
    BAR_IO,
    BAR_MEM64,
    BarSpec,
    BridgeSpec,
    DownstreamPortSpec,
    RootPortSpec,
    Topology,
)

MiB = 1 << 20
IO_WINDOW_ALIGN = 4 << 10  # PCI-to-PCI Bridge Architecture 1.2 §3.2.5.6: 4 KiB I/O window granularity
MEM_WINDOW_ALIGN = 1 * MiB  # §3.2.5.8: 1 MiB memory window granularity
HOTPLUG_IO_SIZE = 256  # Linux DEFAULT_HOTPLUG_IO_SIZE
HOTPLUG_MMIO_SIZE = 2 * MiB  # DEFAULT_HOTPLUG_MMIO_SIZE
HOTPLUG_MMIO_PREF_SIZE = 2 * MiB  # DEFAULT_HOTPLUG_MMIO_PREF_SIZE


@dataclass(frozen=True, slots=True)
class WindowNeed:
    """Bytes a root bus needs in its host bridge's I/O, 32-bit memory and 64-bit memory windows."""

    io: int = 0
    mem32: int = 0
    mem64: int = 0


@dataclass(frozen=True, slots=True)
class _Resource:
    size: int
    align: int


@dataclass(frozen=True, slots=True)
class _Windows:
    io: _Resource | None
    mem: _Resource | None
    pref: _Resource | None


def _mem_align(resources: list[_Resource]) -> int:
    """calculate_mem_align(): the alignment Linux gives a memory window holding these resources."""
    if not resources:
        return 0
    aligns: dict[int, int] = {}
    for r in resources:
        order = max(0, r.align.bit_length() - 1 - 20)  # __ffs(align) - 20, orders below 1 MiB as 0
        aligns[order] = aligns.get(order, 0) + r.align
    align = min_align = 0
    for order in range(max(aligns) + 1):
        align1 = 1 << (order + 20)
        if not align:
            min_align = align1
        elif align_up(align + min_align, min_align) < align1:
            min_align = align1 >> 1
        align += aligns.get(order, 0)
    return min_align


def _io_window(children: list[_Resource], hotplug: bool) -> _Resource | None:
    total = sum(r.size for r in children) + (HOTPLUG_IO_SIZE if hotplug else 0)
    if not total:
        return None
    return _Resource(align_up(total, IO_WINDOW_ALIGN), IO_WINDOW_ALIGN)


def _mem_window(children: list[_Resource], add: int) -> _Resource | None:
    total = sum(r.size for r in children) + add
    if not total:
        return None
    align = max(_mem_align(children), MEM_WINDOW_ALIGN)
    return _Resource(align_up(total, align), align)


def _bar(bar: BarSpec) -> _Resource:
    return _Resource(bar.size, bar.size)


class _Sizer:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def bus_resources(
        self, segment: int, bus: int
    ) -> tuple[list[_Resource], list[_Resource], list[_Resource]]:
        """(I/O, non-prefetchable memory, 64-bit prefetchable memory) resources of the functions on
        `bus`: their BARs and their bridges' windows. On a root bus, "64-bit prefetchable" holds
        every 64-bit BAR (see the module docstring)."""
        io: list[_Resource] = []
        mem: list[_Resource] = []
        pref: list[_Resource] = []
        root = self.topology.root_bus_range(segment, bus) is not None
        for e in self.topology.endpoints:
            if (e.bdf.segment, e.bdf.bus) != (segment, bus):
                continue
            for b in e.bars:
                if b.kind == BAR_IO:
                    io.append(_bar(b))
                elif b.kind == BAR_MEM64 and (b.prefetchable or root):
                    pref.append(_bar(b))
                else:
                    mem.append(_bar(b))
        for bridge in self.topology.all_bridges():
            if (bridge.bdf.segment, bridge.bdf.bus) != (segment, bus):
                continue
            w = self.windows(bridge)
            io += [w.io] if w.io else []
            mem += [w.mem] if w.mem else []
            pref += [w.pref] if w.pref else []
        return io, mem, pref

    def windows(self, bridge: BridgeSpec) -> _Windows:
        """pbus_size_io / pbus_size_mem for the bridge's three windows."""
        hotplug = isinstance(bridge, RootPortSpec | DownstreamPortSpec)
        io, mem, pref = self.bus_resources(bridge.bdf.segment, bridge.secondary)
        return _Windows(
            _io_window(io, hotplug),
            _mem_window(mem, HOTPLUG_MMIO_SIZE if hotplug else 0),
            _mem_window(pref, HOTPLUG_MMIO_PREF_SIZE if hotplug else 0),
        )


def root_bus_need(topology: Topology, segment: int, bus: int) -> WindowNeed:
    """What the root bus `bus` of `segment` (its main root bus or an expander's) needs."""
    io, mem, pref = _Sizer(topology).bus_resources(segment, bus)
    return WindowNeed(
        io=sum(r.size for r in io), mem32=sum(r.size for r in mem), mem64=sum(r.size for r in pref)
    )


def has_hotplug_slots(topology: Topology, segment: int, bus: int) -> bool:
    """Whether a hot-pluggable slot (a root or downstream port) sits anywhere below the root bus
    `bus` of `segment`: its host bridge's _OSC then grants native PCIe hot-plug."""
    first_last = topology.root_bus_range(segment, bus)
    if first_last is None:
        raise ValueError(f"bus {bus:#x} is not a root bus of segment {segment}")
    first, last = first_last
    return any(
        isinstance(b, RootPortSpec | DownstreamPortSpec)
        and b.bdf.segment == segment
        and first <= b.bdf.bus <= last
        for b in topology.all_bridges()
    )
