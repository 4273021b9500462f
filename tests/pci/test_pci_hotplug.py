"""Hot-plug: the function table, the pages the memory map must punch out, and what the guest sees meanwhile."""

import threading

import pytest

from pcihole.pci import registers as r
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import EndpointSpec, RootPortSpec, TopologyError
from tests.pci.pci_test_machines import bdf, gpa, small_topology

NVME = EndpointSpec(bdf("0000:02:00.0"), 0x1B36, 0x0010, 0x010802)


def test_add_announces_the_page_and_the_function_appears(bridge):
    events = []
    bridge.add_listener(
        lambda page, present: events.append((page, present, bridge.function(bdf("0000:02:00.0"))))
    )
    assert bridge.mmio_read_int(gpa("0000:02:00.0"), 4) == 0xFFFFFFFF
    bridge.add_function(NVME)
    # Announced before it entered the table (the memory map punches the page first).
    assert events == [(gpa("0000:02:00.0"), True, None)]
    assert bridge.mmio_read_int(gpa("0000:02:00.0"), 4) == 0x00101B36
    assert gpa("0000:02:00.0") in bridge.present_pages()
    assert bdf("0000:02:00.0") in [d.bdf for d in bridge.devices()]


def test_remove_announces_after_the_function_is_gone(bridge):
    events = []
    bridge.add_listener(
        lambda page, present: events.append((page, present, bridge.function(bdf("0000:01:00.0"))))
    )
    bridge.remove_function(bdf("0000:01:00.0"))
    assert events == [(gpa("0000:01:00.0"), False, None)]
    assert bridge.mmio_read_int(gpa("0000:01:00.0"), 4) == 0xFFFFFFFF
    assert gpa("0000:01:00.0") not in bridge.present_pages()


def test_slot_presence_and_change_bits_follow_hotplug(bridge):
    port = bridge.function(bdf("0000:00:01.1"))
    sltsta = port.pcie_cap + r.PCI_EXP_SLTSTA
    assert port.config.read_int(sltsta, 2) == 0
    bridge.add_function(NVME)
    status = bridge.mmio_read_int(gpa("0000:00:01.1", sltsta), 2)
    assert status & r.PCI_EXP_SLTSTA_PDS and status & r.PCI_EXP_SLTSTA_PDC and status & r.PCI_EXP_SLTSTA_DLLSC
    bridge.mmio_write(
        gpa("0000:00:01.1", sltsta), (r.PCI_EXP_SLTSTA_PDC | r.PCI_EXP_SLTSTA_DLLSC).to_bytes(2, "little")
    )
    assert bridge.mmio_read_int(gpa("0000:00:01.1", sltsta), 2) == r.PCI_EXP_SLTSTA_PDS
    bridge.remove_function(NVME.bdf)
    status = bridge.mmio_read_int(gpa("0000:00:01.1", sltsta), 2)
    assert not status & r.PCI_EXP_SLTSTA_PDS and status & r.PCI_EXP_SLTSTA_PDC


def test_multifunction_bit_follows_the_other_functions(bridge):
    second = EndpointSpec(bdf("0000:01:00.1"), 0x1AF4, 0x1042, 0x010000)
    header = gpa("0000:01:00.0", r.PCI_HEADER_TYPE)
    assert bridge.mmio_read_int(header, 1) == 0x00
    bridge.add_function(second)
    assert bridge.mmio_read_int(header, 1) == 0x80
    bridge.remove_function(second.bdf)
    assert bridge.mmio_read_int(header, 1) == 0x00


@pytest.mark.parametrize(
    "spec,problem",
    [
        (EndpointSpec(bdf("0000:01:00.0"), 0x1AF4, 0x1041, 0x020000), "duplicate BDF"),
        (EndpointSpec(bdf("0000:05:00.0"), 0x1AF4, 0x1041, 0x020000), "reached by no bridge"),
        (EndpointSpec(bdf("0000:02:01.0"), 0x1AF4, 0x1041, 0x020000), "only device 0"),
        (EndpointSpec(bdf("0000:02:00.3"), 0x1AF4, 0x1041, 0x020000), "function 0"),
        (RootPortSpec(bdf("0000:00:03.0"), 3, 3), "overlap"),
    ],
)
def test_invalid_additions_change_nothing(bridge, spec, problem):
    pages = bridge.present_pages()
    events = []
    bridge.add_listener(lambda *e: events.append(e))
    with pytest.raises(TopologyError, match=problem):
        bridge.add_function(spec)
    assert bridge.present_pages() == pages and events == []


def test_invalid_removals_change_nothing(bridge):
    pages = bridge.present_pages()
    with pytest.raises(TopologyError, match="function 0"):
        bridge.remove_function(bdf("0000:00:1f.0"))  # 1f.3 still there
    with pytest.raises(TopologyError, match="function 0"):
        bridge.remove_function(bdf("0000:00:01.0"))  # 00:01.1 still there
    bridge.add_function(RootPortSpec(bdf("0000:00:03.0"), 4, 4))
    bridge.add_function(EndpointSpec(bdf("0000:04:00.0"), 0x1AF4, 0x1041, 0x020000))
    pages = bridge.present_pages()
    with pytest.raises(TopologyError, match="reached by no bridge"):
        bridge.remove_function(bdf("0000:00:03.0"))  # 04:00.0 below it
    with pytest.raises(TopologyError, match="no such"):
        bridge.remove_function(bdf("0000:00:00.0"))  # the host bridge is not removable
    assert bridge.present_pages() == pages


def test_a_failing_listener_undoes_the_step(bridge):
    told = []

    def recorder(page, present):
        told.append(present)

    def broken(page, present):
        raise RuntimeError("memslot update failed")

    bridge.add_listener(recorder)
    bridge.add_listener(broken)
    with pytest.raises(RuntimeError):
        bridge.add_function(NVME)
    assert told == [True, False]
    assert bridge.function(NVME.bdf) is None


def test_root_port_hotplug_then_device_below_it(bridge):
    port = RootPortSpec(bdf("0000:00:03.0"), 4, 4)
    bridge.add_function(port)
    bridge.add_function(EndpointSpec(bdf("0000:04:00.0"), 0x1AF4, 0x1041, 0x020000))
    assert bridge.mmio_read_int(gpa("0000:04:00.0"), 4) == 0x10411AF4


def test_concurrent_reads_see_the_function_or_all_ones():
    """A vCPU thread reading while a host thread hot-plugs: never zeros, never a torn value."""
    bridge = HostBridge(small_topology())
    address = gpa("0000:02:00.0")
    seen = set()
    stop = threading.Event()

    def vcpu():
        while not stop.is_set():
            seen.add(bridge.mmio_read_int(address, 8))

    thread = threading.Thread(target=vcpu)
    thread.start()
    try:
        for _ in range(200):
            bridge.add_function(NVME)
            bridge.remove_function(NVME.bdf)
    finally:
        stop.set()
        thread.join()
    absent = bridge.mmio_read_int(address, 8)
    bridge.add_function(NVME)
    present = bridge.mmio_read_int(address, 8)
    assert absent == 0xFFFFFFFFFFFFFFFF and present != absent
    assert seen <= {absent, present}
    assert absent in seen


class RecordingMirrorReader:
    """A MirrorReader (what the C run loop's table is) that records what it was told and what the
    mirror and the table held at each call."""

    def __init__(self, bridge: HostBridge, page: int) -> None:
        self.bridge, self.page, self.events = bridge, page, []
        self.changing = False

    def mirror_changing(self) -> None:
        assert not self.changing
        self.changing = True
        self.events.append("changing")

    def set_mirrored(self, gpa: int, mirrored: bool) -> None:
        # Only inside a change, and only while the function is in the table with its bytes in the
        # mirror page (page_present: in the table; the bridge's lock is held, so no mmio_read here).
        assert self.changing
        fn = self.bridge._functions.get(gpa)
        in_page = fn is not None and bytes(self.bridge._mirror.page(gpa)) == bytes(fn.config.data)
        self.events.append(("mirrored" if mirrored else "unmirrored", gpa, in_page))

    def mirror_changed(self) -> None:
        assert self.changing
        self.changing = False
        self.events.append("changed")


def test_a_mirror_reader_may_read_a_page_only_while_its_function_is_in_the_table_with_its_bytes(bridge):
    bridge.use_mirrors()
    try:
        nvme, port = gpa("0000:02:00.0"), gpa("0000:00:01.1")
        reader = RecordingMirrorReader(bridge, nvme)
        bridge.add_mirror_reader(reader)
        present = bridge.present_pages()
        assert reader.events == ["changing", *(("mirrored", p, True) for p in present), "changed"]
        reader.events.clear()
        port_status_before = bytes(bridge._mirror.page(port))
        bridge.add_function(NVME)
        # One change: the function's bytes copied into its page, its port's slot status, then the
        # page given to the reader, all between changing and changed.
        assert reader.events == ["changing", ("mirrored", nvme, True), "changed"]
        assert bytes(bridge._mirror.page(port)) != port_status_before
        reader.events.clear()
        bridge.remove_function(NVME.bdf)
        # Taken back while the function and its bytes are still there, before its page is blanked.
        assert reader.events == ["changing", ("unmirrored", nvme, True), "changed"]
        assert bytes(bridge._mirror.page(nvme)) == b"\xff" * 4096
        reader.events.clear()
    finally:
        bridge.close_mirrors()
    # Before the mirror is unmapped, no page is the reader's any more.
    assert reader.events == ["changing", *(("unmirrored", p, True) for p in present), "changed"]


def test_a_mirror_reader_needs_the_mirrors(bridge):
    with pytest.raises(ValueError, match="use_mirrors"):
        bridge.add_mirror_reader(RecordingMirrorReader(bridge, 0))
