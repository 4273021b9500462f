"""The ECAM windows on the MMIO bus: every answer, fallback included, carries the segment's fill byte.

Pure (the model backend's VM holds the memory map; no guest runs): made-up exits go through the
exit handler, the MMIO bus and the ECAM window, as a guest's would.
"""

from __future__ import annotations

import pytest

from pcihole.hv import exits, open_backend
from pcihole.machine.builder import punched_hole
from pcihole.machine.bus import Bus
from pcihole.machine.dispatch import ExitHandler
from pcihole.machine.ecam_window import EcamWindow, segment_hole
from pcihole.machine.stats import RunStats
from pcihole.memory import GuestMemory, MapView, MemoryMap
from pcihole.pci.bdf import Bdf
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import EndpointSpec, Segment, Topology

ECAM = 0xE0000000
FILL = 0x5A
PRESENT = Bdf(0, 0, 3, 0)
ABSENT_GPA = ECAM + (5 << 15)  # 00:05.0
PRESENT_GPA = ECAM + (3 << 15)  # 00:03.0, vendor 0x1af4


def exit_handler(view: MapView, bridge: HostBridge) -> tuple[ExitHandler, RunStats]:
    stats = RunStats()
    mmio = Bus("mmio")
    for seg in bridge.segments:
        mmio.insert(
            EcamWindow(view, bridge, stats), seg.window_base, seg.window_size, f"ECAM segment {seg.id}"
        )
    return ExitHandler(mmio, Bus("port"), stats), stats


@pytest.fixture
def bridge() -> HostBridge:
    topology = Topology(
        (Segment(0, ECAM, 0, 15, fill=FILL),),
        endpoints=(EndpointSpec(PRESENT, 0x1AF4, 0x1041, 0x020000),),
    )
    return HostBridge(topology)


def test_an_exit_the_map_does_not_cover_reads_the_segment_fill(bridge):
    # The map has no region here (as while the memory is torn down): the window falls back to the
    # host bridge, which answers with the segment's fill, not all-ones.
    handler, stats = exit_handler(MapView(), bridge)
    assert handler.handle(exits.MmioRead(ABSENT_GPA, 4)) == bytes([FILL]) * 4
    assert handler.handle(exits.MmioRead(PRESENT_GPA, 2)) == (0x1AF4).to_bytes(2, "little")
    assert stats.ecam_exits == 2


def test_hole_pages_and_punched_pages_answer_from_the_map_with_the_same_fill(bridge):
    hv = open_backend("model")
    vm = hv.create_vm()
    memory = GuestMemory(hv, vm, "exit")
    try:
        (segment,) = bridge.segments
        memory.update(MemoryMap(punched_hole(segment_hole(segment, bridge), bridge.present_pages(), bridge)))
        handler, stats = exit_handler(memory.view, bridge)
        assert handler.handle(exits.MmioRead(ABSENT_GPA, 4)) == bytes([FILL]) * 4
        assert memory.view.counters.hole_reads == 1
        assert handler.handle(exits.MmioRead(PRESENT_GPA, 4)) == bytes.fromhex("f41a4110")
        assert memory.view.counters.mmio_reads == 1
        # An absent function's page that the map still has punched (a hot-remove in progress): the
        # host bridge answers it, with the same fill.
        bridge.remove_function(PRESENT)
        assert handler.handle(exits.MmioRead(PRESENT_GPA, 4)) == bytes([FILL]) * 4
        assert stats.ecam_exits == 3
    finally:
        memory.close()
        vm.close()
        hv.close()
