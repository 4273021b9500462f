"""What each root bus needs of its host bridge's windows, sized as Linux's pbus_size_io/pbus_size_mem
size bridge windows; the expected numbers are worked out by hand from those rules."""

from pathlib import Path

import pytest

from pcihole.machine.machinefile import load
from pcihole.pci.bridge_windows import WindowNeed, has_hotplug_slots, root_bus_need
from pcihole.pci.topology import BarSpec, EndpointSpec, PciBridgeSpec, RootPortSpec, Segment, Topology
from tests.pci.pci_test_machines import ECAM_BASE, bdf, small_topology

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_a_root_port_with_an_nvme_drive():
    topo = Topology(
        segments=(Segment(0, ECAM_BASE, 0, 255),),
        root_ports=(RootPortSpec(bdf("0000:00:01.0"), secondary=1, subordinate=1),),
        endpoints=(
            EndpointSpec(bdf("0000:01:00.0"), 0x1B36, 0x10, 0x010802, bars=(BarSpec(0, "mem64", 0x4000),)),
        ),
    )
    # A hot-plug port: I/O 256 bytes of room -> one 4 KiB window; the 64-bit non-prefetchable BAR goes
    # in the non-prefetchable window: 16 KiB + 2 MiB of room, in 1 MiB units -> 3 MiB; the prefetchable
    # window is only the 2 MiB of room.
    assert root_bus_need(topo, 0, 0) == WindowNeed(io=4 * KiB, mem32=3 * MiB, mem64=2 * MiB)


def test_the_small_machine_counts_root_bus_bars_and_both_ports():
    # Root port 1 (NIC: 4 KiB mem32, 16 KiB mem64 pref): 4 KiB I/O, 1 + 2 -> 3 MiB, 16 KiB + 2 MiB -> 3 MiB.
    # Root port 2 (empty): 4 KiB, 2 MiB, 2 MiB. On the root bus: 00:1f.3's 32-byte I/O BAR.
    assert root_bus_need(small_topology(), 0, 0) == WindowNeed(
        io=8 * KiB + 0x20, mem32=5 * MiB, mem64=5 * MiB
    )


def test_a_conventional_bridge_gets_no_hotplug_room():
    topo = Topology(
        segments=(Segment(0, ECAM_BASE, 0, 255),),
        bridges=(PciBridgeSpec(bdf("0000:00:05.0"), secondary=2, subordinate=2),),
        endpoints=(
            EndpointSpec(bdf("0000:02:01.0"), 0x1AF4, 0x1005, 0xFF00, bars=(BarSpec(0, "io", 0x20),)),
            EndpointSpec(bdf("0000:02:1f.0"), 0x1AF4, 0x1003, 0x078000, bars=(BarSpec(0, "io", 0x40),)),
        ),
    )
    assert root_bus_need(topo, 0, 0) == WindowNeed(io=4 * KiB)
    assert not has_hotplug_slots(topo, 0, 0)


def test_the_gpu_servers_128_gib_bars():
    spec = load(EXAMPLES / "gpu-server.toml")
    need = root_bus_need(spec.topology, 0, 0)
    # A downstream port with a GPU: 128 GiB + 32 MiB + 2 MiB of room, aligned as calculate_mem_align()
    # aligns a 128 GiB and a 32 MiB BAR (to 64 GiB): 192 GiB. The upstream port: 4 x 192 = 768 GiB;
    # the root port: 768 GiB + 2 MiB -> 832 GiB (64 GiB units). Two switches: 1664 GiB; the NVMe
    # port's and the free slot's 2 MiB each.
    assert need.mem64 == 2 * 832 * GiB + 2 * 2 * MiB
    # I/O: 4 KiB per hot-plug port with nothing below, a switch 16 KiB + 4 KiB for its root port.
    assert need.io == 2 * 20 * KiB + 2 * 4 * KiB
    assert has_hotplug_slots(spec.topology, 0, 0)


def test_the_expander_example_splits_its_needs_between_the_root_buses():
    spec = load(EXAMPLES / "expander.toml")
    # Bus 0x80: root port 80:00.0 (NVMe, as above) and 80:01.0 -> switch -> downstream port -> NVMe:
    # 8 KiB of I/O (4 KiB for the downstream port, 4 KiB of room for the root port), 3 + 3 + 2 MiB of
    # memory, 2 + 2 + 2 MiB prefetchable.
    assert root_bus_need(spec.topology, 0, 0x80) == WindowNeed(io=12 * KiB, mem32=8 * MiB, mem64=6 * MiB)
    # Bus 0: root port 00:01.0 (virtio-net: 16 KiB mem64 pref) and the pci-bridge's two I/O BARs.
    assert root_bus_need(spec.topology, 0, 0) == WindowNeed(io=8 * KiB, mem32=2 * MiB, mem64=3 * MiB)
    assert has_hotplug_slots(spec.topology, 0, 0) and has_hotplug_slots(spec.topology, 0, 0x80)
    with pytest.raises(ValueError, match="not a root bus"):
        has_hotplug_slots(spec.topology, 0, 0x81)
