"""What the guest reads in each kind of function: header fields, BAR sizing, capability lists."""

import pytest

from pcihole.pci import registers as r
from pcihole.pci.capabilities import find_capability, find_extended_capability
from pcihole.pci.host_bridge import HostBridge
from tests.pci.pci_test_machines import bdf, gpa, small_topology


def read(bridge: HostBridge, where: str, register: int, size: int) -> int:
    return bridge.mmio_read_int(gpa(where, register), size)


def write(bridge: HostBridge, where: str, register: int, size: int, value: int) -> None:
    bridge.mmio_write(gpa(where, register), value.to_bytes(size, "little"))


def test_identity_registers(bridge):
    assert read(bridge, "0000:01:00.0", 0x00, 4) == 0x1041_1AF4
    assert read(bridge, "0000:01:00.0", 0x08, 4) == 0x020000_01  # class 02:00:00, revision 1
    assert read(bridge, "0000:01:00.0", 0x2C, 4) == 0x1100_1AF4  # QEMU's subsystem ids
    assert read(bridge, "0000:00:00.0", 0x00, 4) == 0x0008_1B36
    assert read(bridge, "0000:00:00.0", 0x09, 3) == 0x060000
    assert read(bridge, "0000:00:01.0", 0x00, 4) == 0x000C_1B36
    assert read(bridge, "0000:00:01.0", 0x09, 3) == 0x060400


def test_header_types_and_multifunction_bit(bridge):
    assert read(bridge, "0000:00:00.0", r.PCI_HEADER_TYPE, 1) == 0x00
    assert read(bridge, "0000:00:01.0", r.PCI_HEADER_TYPE, 1) == 0x81  # type 1, fn 1 exists
    assert read(bridge, "0000:00:01.1", r.PCI_HEADER_TYPE, 1) == 0x01  # only fn 0 carries the bit
    assert read(bridge, "0000:00:1f.0", r.PCI_HEADER_TYPE, 1) == 0x80
    assert read(bridge, "0000:01:00.0", r.PCI_HEADER_TYPE, 1) == 0x00


def test_bridge_bus_numbers_are_programmed_and_writable(bridge):
    assert read(bridge, "0000:00:01.1", r.PCI_PRIMARY_BUS, 4) & 0xFFFFFF == 0x030200
    write(bridge, "0000:00:01.1", r.PCI_SUBORDINATE_BUS, 1, 7)
    assert read(bridge, "0000:00:01.1", r.PCI_SUBORDINATE_BUS, 1) == 7


def test_command_register_keeps_only_implemented_bits(bridge):
    write(bridge, "0000:01:00.0", r.PCI_COMMAND, 2, 0xFFFF)
    assert read(bridge, "0000:01:00.0", r.PCI_COMMAND, 2) == 0x0547


def size_bar(bridge, where, index):
    """Linux's __pci_read_base(): save, write all-ones, read back, restore."""
    offset = 0x10 + 4 * index
    saved = read(bridge, where, offset, 4)
    write(bridge, where, offset, 4, 0xFFFFFFFF)
    probed = read(bridge, where, offset, 4)
    write(bridge, where, offset, 4, saved)
    return saved, probed


def test_32_bit_memory_bar_sizing(bridge):
    saved, probed = size_bar(bridge, "0000:01:00.0", 1)
    assert saved == 0  # 32-bit, not prefetchable, unassigned
    assert probed == 0xFFFFF000  # ~(4 KiB - 1), type bits 0
    assert read(bridge, "0000:01:00.0", 0x14, 4) == saved  # restored


def test_64_bit_prefetchable_bar_sizing(bridge):
    low_saved, low = size_bar(bridge, "0000:01:00.0", 4)
    _, high = size_bar(bridge, "0000:01:00.0", 5)
    assert low_saved == 0x0C  # 64-bit (type 10b) and prefetchable
    assert low == (0xFFFFC000 | 0x0C)
    assert high == 0xFFFFFFFF
    size = (~((high << 32) | (low & ~0xF)) & 0xFFFFFFFFFFFFFFFF) + 1
    assert size == 0x4000


def test_io_bar_sizing(bridge):
    saved, probed = size_bar(bridge, "0000:00:1f.3", 4)
    assert saved == 0x1
    assert probed == (0xFFFFFFE0 | 0x1)


def test_absent_bars_read_zero_and_ignore_writes(bridge):
    for index in (0, 2, 3):
        assert size_bar(bridge, "0000:01:00.0", index) == (0, 0)


def test_bar_addresses_can_be_programmed(bridge):
    write(bridge, "0000:01:00.0", 0x14, 4, 0xFEB01234)
    assert read(bridge, "0000:01:00.0", 0x14, 4) == 0xFEB01000


def pcie_type(bridge, where):
    fn = bridge.function(bdf(where))
    cap = find_capability(fn.config, r.PCI_CAP_ID_EXP)
    assert cap is not None
    flags = fn.config.read_int(cap + r.PCI_EXP_FLAGS, 2)
    assert flags & r.PCI_EXP_FLAGS_VERS == 2
    return (flags & r.PCI_EXP_FLAGS_TYPE) >> 4, flags


@pytest.mark.parametrize(
    "where,port_type",
    [
        ("0000:00:00.0", r.PCI_EXP_TYPE_RC_END),
        ("0000:00:1f.0", r.PCI_EXP_TYPE_RC_END),
        ("0000:00:01.0", r.PCI_EXP_TYPE_ROOT_PORT),
        ("0000:01:00.0", r.PCI_EXP_TYPE_ENDPOINT),
    ],
)
def test_every_function_has_a_pcie_capability_of_the_right_type(bridge, where, port_type):
    assert read(bridge, where, r.PCI_STATUS, 2) & r.PCI_STATUS_CAP_LIST
    assert pcie_type(bridge, where)[0] == port_type


def test_capability_list_is_walkable_through_ecam(bridge):
    pointer = read(bridge, "0000:00:01.0", r.PCI_CAPABILITY_LIST, 1)
    assert pointer >= 0x40 and pointer % 4 == 0
    assert read(bridge, "0000:00:01.0", pointer, 1) == r.PCI_CAP_ID_EXP
    assert read(bridge, "0000:00:01.0", pointer + 1, 1) == 0  # end of list


def test_root_ports_have_aer_at_0x100_and_endpoints_no_extended_capability(bridge):
    header = read(bridge, "0000:00:01.0", 0x100, 4)
    assert header & 0xFFFF == r.PCI_EXT_CAP_ID_ERR
    assert (header >> 16) & 0xF == 2
    assert header >> 20 == 0
    assert find_extended_capability(bridge.function(bdf("0000:00:01.0")).config, 1) == 0x100
    assert read(bridge, "0000:01:00.0", 0x100, 4) == 0


def test_aer_reset_values(bridge):
    assert read(bridge, "0000:00:01.0", 0x100 + r.PCI_ERR_UNCOR_STATUS, 4) == 0
    assert read(bridge, "0000:00:01.0", 0x100 + r.PCI_ERR_UNCOR_MASK, 4) == 0
    assert read(bridge, "0000:00:01.0", 0x100 + r.PCI_ERR_UNCOR_SEVER, 4) == 0x00462030
    assert read(bridge, "0000:00:01.0", 0x100 + r.PCI_ERR_COR_MASK, 4) == 0x00006000


def test_root_port_slot_reports_presence(bridge):
    _, flags = pcie_type(bridge, "0000:00:01.0")
    assert flags & r.PCI_EXP_FLAGS_SLOT
    occupied = bridge.function(bdf("0000:00:01.0"))
    empty = bridge.function(bdf("0000:00:01.1"))
    sltsta = occupied.config.read_int(occupied.pcie_cap + r.PCI_EXP_SLTSTA, 2)
    assert sltsta & r.PCI_EXP_SLTSTA_PDS
    assert not sltsta & r.PCI_EXP_SLTSTA_PDC  # present since power-on: no change event
    assert occupied.config.read_int(occupied.pcie_cap + r.PCI_EXP_LNKSTA, 2) & r.PCI_EXP_LNKSTA_DLLLA
    assert not empty.config.read_int(empty.pcie_cap + r.PCI_EXP_SLTSTA, 2) & r.PCI_EXP_SLTSTA_PDS
    sltcap = empty.config.read_int(empty.pcie_cap + r.PCI_EXP_SLTCAP, 4)
    assert sltcap & r.PCI_EXP_SLTCAP_HPC
    assert sltcap >> 19 == 2  # physical slot number defaults to the secondary bus


def test_devices_listing_matches_the_topology():
    bridge = HostBridge(small_topology())
    listing = {str(d.bdf): d for d in bridge.devices()}
    assert list(listing) == sorted(listing)
    assert set(listing) == {
        "0000:00:00.0",
        "0000:00:01.0",
        "0000:00:01.1",
        "0000:00:1f.0",
        "0000:00:1f.3",
        "0000:01:00.0",
    }
    nic = listing["0000:01:00.0"]
    assert nic.as_json() == {
        "bdf": "0000:01:00.0",
        "vendor": "0x1af4",
        "device": "0x1041",
        "class": "0x020000",
        "header_type": 0,
    }
    assert listing["0000:00:01.0"].header_type == 1 and listing["0000:00:01.0"].multifunction
