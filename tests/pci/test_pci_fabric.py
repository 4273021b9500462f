"""Switches, PCI-PCI bridges and expander buses: what the topology checker refuses (one line each),
the registers each kind of bridge shows, hot-plug below a switch's downstream port, and Unsupported
Requests logged by the innermost bridge."""

from __future__ import annotations

import pytest

from pcihole.pci import registers as r
from pcihole.pci.capabilities import find_capability, find_extended_capability
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import (
    DownstreamPortSpec,
    EndpointSpec,
    ExpanderSpec,
    PciBridgeSpec,
    RootPortSpec,
    Segment,
    Topology,
    TopologyError,
    UpstreamPortSpec,
)
from tests.pci.pci_test_machines import ECAM_BASE, bdf, gpa

SEG = Segment(0, ECAM_BASE, 0, 255)


def ep(text: str, device: int = 0x1041) -> EndpointSpec:
    return EndpointSpec(bdf(text), 0x1AF4, device, 0x020000)


def rp(text: str, sec: int, sub: int | None = None) -> RootPortSpec:
    return RootPortSpec(bdf(text), sec, sec if sub is None else sub)


def up(text: str, sec: int, sub: int | None = None) -> UpstreamPortSpec:
    return UpstreamPortSpec(bdf(text), sec, sec if sub is None else sub)


def down(text: str, sec: int, sub: int | None = None) -> DownstreamPortSpec:
    return DownstreamPortSpec(bdf(text), sec, sec if sub is None else sub)


def pci_bridge(text: str, sec: int, sub: int | None = None) -> PciBridgeSpec:
    return PciBridgeSpec(bdf(text), sec, sec if sub is None else sub)


# Root port 00:01.0 [1-4] -> upstream port 01:00.0 [2-4] -> downstream ports 02:00.0 [3], 02:01.0 [4];
# NIC below the first; pci-bridge 00:05.0 [5] with a device in slot 7; expander 00:10.0 on bus 0x40
# with a root port [0x41] and a NIC below it.
FABRIC = Topology(
    (SEG,),
    root_ports=(rp("0000:00:01.0", 1, 4), rp("0000:40:00.0", 0x41)),
    endpoints=(ep("0000:03:00.0"), ep("0000:05:07.0", 0x1005), ep("0000:41:00.0", 0x1042)),
    bridges=(
        up("0000:01:00.0", 2, 4),
        down("0000:02:00.0", 3),
        down("0000:02:01.0", 4),
        pci_bridge("0000:00:05.0", 5),
    ),
    expanders=(ExpanderSpec(bdf("0000:00:10.0"), 0x40, 0x4F),),
)


def with_(**changes) -> Topology:
    fields = {
        "root_ports": FABRIC.root_ports,
        "endpoints": FABRIC.endpoints,
        "bridges": FABRIC.bridges,
        "expanders": FABRIC.expanders,
    }
    for key, extra in changes.items():
        fields[key] = (*fields[key], *extra)
    return Topology((SEG,), **fields)


def test_the_fabric_is_valid():
    FABRIC.validate()


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        (
            with_(bridges=[down("0000:00:02.0", 6)]),
            "downstream port 0000:00:02.0: a downstream port must be on a switch's internal bus "
            "(the secondary bus of an upstream port), not on root bus 0",
        ),
        (
            Topology((SEG,), (rp("0000:00:01.0", 1, 2),), bridges=(down("0000:01:00.0", 2),)),
            "downstream port 0000:01:00.0: a downstream port must be on a switch's internal bus "
            "(the secondary bus of an upstream port), not on bus 1 below root port 0000:00:01.0",
        ),
        (
            with_(bridges=[up("0000:00:02.0", 6)]),
            "upstream port 0000:00:02.0: an upstream port must be below a root port or a downstream port "
            "(on its link), not on root bus 0",
        ),
        (
            with_(endpoints=[ep("0000:02:05.0")]),
            "endpoint 0000:02:05.0: only downstream ports sit on a switch's internal bus, "
            "and bus 2 below upstream port 0000:01:00.0 is one",
        ),
        (
            with_(bridges=[pci_bridge("0000:04:00.0", 6)]),
            "pci bridge 0000:04:00.0: a conventional PCI bridge (QEMU pci-bridge) cannot be on the PCIe link",
        ),
        (
            with_(root_ports=[rp("0000:05:01.0", 6)]),
            "root port 0000:05:01.0: a root port must be on the root bus 0 of segment 0 or an expander "
            "bridge's bus, not on bus 5 below pci bridge 0000:00:05.0",
        ),
        (
            with_(endpoints=[ep("0000:03:01.0")]),
            "endpoint 0000:03:01.0: device 1 below downstream port 0000:02:00.0: a PCIe link reaches only device 0",
        ),
        (
            with_(bridges=[down("0000:02:02.0", 4)]),
            "downstream port 0000:02:02.0: buses 4-4 overlap downstream port 0000:02:01.0's buses 4-4",
        ),
        (
            Topology((SEG,), (rp("0000:00:01.0", 1, 4),), bridges=(up("0000:01:00.0", 2, 5),)),
            "upstream port 0000:01:00.0: buses 2-5 are not inside root port 0000:00:01.0's buses 1-4",
        ),
        (
            Topology((SEG,), (rp("0000:00:01.0", 1, 4),), (ep("0000:03:00.0"),), (up("0000:01:00.0", 2, 4),)),
            "endpoint 0000:03:00.0: bus 3 is behind upstream port 0000:01:00.0 but only its secondary bus 2 "
            "holds devices",
        ),
        (
            with_(root_ports=[rp("0000:00:03.0", 0x40, 0x42)]),
            "root port 0000:00:03.0: buses 64-66 are not inside root bus 0's buses 0-63",
        ),
        (
            with_(expanders=[ExpanderSpec(bdf("0000:00:11.0"), 0x48, 0x50)]),
            "expander bridge 0000:00:11.0: buses 72-80 overlap expander bridge 0000:00:10.0's buses 64-79",
        ),
        (
            with_(expanders=[ExpanderSpec(bdf("0000:01:00.1"), 0x60, 0x6F)]),
            "expander bridge 0000:01:00.1: an expander bridge must be on the root bus 0 of segment 0",
        ),
        (
            with_(expanders=[ExpanderSpec(bdf("0000:00:11.0"), 0x90, 0x8F)]),
            "expander bridge 0000:00:11.0: needs root bus 0 < bus (144) <= last bus (143) <= 255",
        ),
        (
            Topology((SEG,), endpoints=(ep("0000:40:00.0"),)),
            "endpoint 0000:40:00.0: bus 64 is reached by no bridge",
        ),
        (
            with_(
                endpoints=[EndpointSpec(bdf("0000:00:06.0"), 0x8086, 0x244E, 0x060401), ep("0000:06:00.0")]
            ),
            "endpoint 0000:00:06.0: class 0x060401 is a bridge's, but an endpoint has a type 0 header and "
            "nothing below it",
        ),
    ],
)
def test_each_fabric_problem_has_its_own_one_line_error(topology, message):
    with pytest.raises(TopologyError) as raised:
        topology.validate()
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def port_type(bridge: HostBridge, text: str) -> int | None:
    fn = bridge.function(bdf(text))
    cap = find_capability(fn.config, r.PCI_CAP_ID_EXP)
    if cap is None:
        return None
    return (bridge.mmio_read_int(gpa(text, cap + r.PCI_EXP_FLAGS), 2) & r.PCI_EXP_FLAGS_TYPE) >> 4


def test_each_function_has_the_pcie_port_type_a_kernel_expects():
    b = HostBridge(FABRIC)
    assert port_type(b, "0000:00:01.0") == r.PCI_EXP_TYPE_ROOT_PORT
    assert port_type(b, "0000:01:00.0") == r.PCI_EXP_TYPE_UPSTREAM
    assert port_type(b, "0000:02:00.0") == r.PCI_EXP_TYPE_DOWNSTREAM
    assert port_type(b, "0000:03:00.0") == r.PCI_EXP_TYPE_ENDPOINT
    assert port_type(b, "0000:00:05.0") is None  # a conventional PCI-PCI bridge
    assert port_type(b, "0000:05:07.0") is None  # and a conventional device below it
    assert port_type(b, "0000:00:10.0") is None  # the expander's function: no capability, as QEMU's
    assert port_type(b, "0000:40:00.0") == r.PCI_EXP_TYPE_ROOT_PORT  # on the expander's root bus
    assert port_type(b, "0000:41:00.0") == r.PCI_EXP_TYPE_ENDPOINT
    # Slots (hot-plug) on root and downstream ports only; AER on every PCIe port.
    for text, slot in (("0000:00:01.0", True), ("0000:01:00.0", False), ("0000:02:01.0", True)):
        fn = b.function(bdf(text))
        flags = b.mmio_read_int(gpa(text, fn.pcie_cap + r.PCI_EXP_FLAGS), 2)
        assert bool(flags & r.PCI_EXP_FLAGS_SLOT) == slot, text
        assert find_extended_capability(fn.config, r.PCI_EXT_CAP_ID_ERR) == r.PCI_EXT_CAP_START
    # Identity and bus numbers as QEMU's devices have them.
    assert b.mmio_read_int(gpa("0000:01:00.0"), 4) == 0x8232104C
    assert b.mmio_read_int(gpa("0000:01:00.0", r.PCI_REVISION_ID), 1) == 2
    assert b.mmio_read_int(gpa("0000:02:00.0"), 4) == 0x8233104C
    assert b.mmio_read_int(gpa("0000:00:05.0"), 4) == 0x00011B36
    assert b.mmio_read_int(gpa("0000:00:10.0"), 4) == 0x000B1B36
    assert b.mmio_read_int(gpa("0000:00:10.0", r.PCI_CLASS_PROG), 4) >> 8 == 0x0600
    for text, pin in (("0000:00:01.0", 1), ("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:00:05.0", 0)):
        assert b.mmio_read_int(gpa(text, r.PCI_INTERRUPT_PIN), 1) == pin, text  # QEMU's: MSI-only ports
    assert b.mmio_read_int(gpa("0000:01:00.0", r.PCI_PRIMARY_BUS), 4) & 0xFFFFFF == 0x040201
    # The downstream port with a device has its link up; the empty one not.
    for text, up_ in (("0000:02:00.0", True), ("0000:02:01.0", False)):
        fn = b.function(bdf(text))
        sltsta = b.mmio_read_int(gpa(text, fn.pcie_cap + r.PCI_EXP_SLTSTA), 2)
        lnksta = b.mmio_read_int(gpa(text, fn.pcie_cap + r.PCI_EXP_LNKSTA), 2)
        assert bool(sltsta & r.PCI_EXP_SLTSTA_PDS) == up_ and bool(lnksta & r.PCI_EXP_LNKSTA_DLLLA) == up_


def test_pci_bridge_slot_id_and_windows():
    b = HostBridge(FABRIC)
    fn = b.function(bdf("0000:00:05.0"))
    cap = find_capability(fn.config, r.PCI_CAP_ID_SLOTID)
    assert cap is not None
    assert b.mmio_read_int(gpa("0000:00:05.0", cap + r.PCI_SID_ESR), 1) == r.PCI_SID_ESR_FIC  # 0 slots
    assert b.mmio_read_int(gpa("0000:00:05.0", cap + r.PCI_SID_CHASSIS_NR), 1) == 5
    # Windows: Linux's pci_read_bridge_windows() probes I/O and prefetchable decode by writing.
    b.mmio_write(gpa("0000:00:05.0", r.PCI_IO_BASE), b"\xff\xff")
    assert b.mmio_read(gpa("0000:00:05.0", r.PCI_IO_BASE), 2) == b"\xf0\xf0"
    b.mmio_write(gpa("0000:00:05.0", r.PCI_PREF_MEMORY_BASE), b"\xff\xff\xff\xff")
    assert b.mmio_read_int(gpa("0000:00:05.0", r.PCI_PREF_MEMORY_BASE), 4) == 0xFFF1FFF1  # 64-bit


def test_hotplug_below_a_downstream_port_like_below_a_root_port():
    b = HostBridge(FABRIC)
    pages = []
    b.add_listener(lambda page, present: pages.append((page, present)))
    port = b.function(bdf("0000:02:01.0"))
    sltsta = gpa("0000:02:01.0", port.pcie_cap + r.PCI_EXP_SLTSTA)
    assert b.mmio_read_int(gpa("0000:04:00.0"), 4) == 0xFFFFFFFF
    b.add_function(ep("0000:04:00.0", 0x1043))
    assert pages == [(gpa("0000:04:00.0"), True)]
    assert b.mmio_read_int(gpa("0000:04:00.0"), 4) == 0x10431AF4
    status = b.mmio_read_int(sltsta, 2)
    assert status & r.PCI_EXP_SLTSTA_PDS and status & r.PCI_EXP_SLTSTA_PDC and status & r.PCI_EXP_SLTSTA_DLLSC
    b.mmio_write(sltsta, (r.PCI_EXP_SLTSTA_PDC | r.PCI_EXP_SLTSTA_DLLSC).to_bytes(2, "little"))
    with pytest.raises(TopologyError, match="only device 0"):
        b.add_function(ep("0000:04:01.0"))
    b.remove_function(bdf("0000:04:00.0"))
    assert pages[-1] == (gpa("0000:04:00.0"), False)
    status = b.mmio_read_int(sltsta, 2)
    assert not status & r.PCI_EXP_SLTSTA_PDS and status & r.PCI_EXP_SLTSTA_PDC
    assert b.mmio_read_int(gpa("0000:04:00.0"), 4) == 0xFFFFFFFF
    # A switch port is checked as at boot: it must fit in its switch's bus range.
    with pytest.raises(TopologyError, match="not inside upstream port 0000:01:00.0's buses 2-4"):
        b.add_function(down("0000:02:02.0", 6))
    with pytest.raises(TopologyError, match="no bridge below it has secondary bus 3"):
        b.remove_function(bdf("0000:02:00.0"))  # 03:00.0 below it


def test_unsupported_requests_below_a_switch_are_logged_by_the_innermost_bridge():
    trap = Segment(0, ECAM_BASE, 0, 255, writes="trap")
    b = HostBridge(Topology((trap,), FABRIC.root_ports, FABRIC.endpoints, FABRIC.bridges, FABRIC.expanders))
    b.mmio_write(gpa("0000:04:00.0", 0x04), b"\x06\x00")  # the empty downstream port's link
    dsp = b.function(bdf("0000:02:01.0"))
    assert b.mmio_read_int(gpa("0000:02:01.0", r.PCI_SEC_STATUS), 2) & r.PCI_STATUS_REC_MASTER_ABORT
    assert b.mmio_read_int(gpa("0000:02:01.0", 0x100 + r.PCI_ERR_UNCOR_STATUS), 4) == r.PCI_ERR_UNC_UNSUP
    assert b.mmio_read_int(gpa("0000:02:01.0", 0x100 + r.PCI_ERR_HEADER_LOG), 4) == 0x44000001  # CfgWr0
    assert b.mmio_read_int(gpa("0000:02:01.0", dsp.pcie_cap + r.PCI_EXP_DEVSTA), 2) & r.PCI_EXP_DEVSTA_URD
    for other in ("0000:00:01.0", "0000:01:00.0", "0000:02:00.0"):  # the ports above saw nothing
        assert b.mmio_read_int(gpa(other, r.PCI_SEC_STATUS), 2) == 0, other
    b.mmio_write(gpa("0000:05:03.0", 0x04), b"\x06\x00")  # below the PCI-PCI bridge: no AER there
    assert b.mmio_read_int(gpa("0000:00:05.0", r.PCI_SEC_STATUS), 2) & r.PCI_STATUS_REC_MASTER_ABORT
    assert b.stats.unsupported_requests == 2
