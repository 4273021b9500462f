"""writes = "trap": a write to an absent function is logged as a root port logs an Unsupported Request."""

from pcihole.pci import registers as r
from tests.pci.pci_test_machines import bdf, gpa

PORT = "0000:00:01.0"  # secondary bus 1
WIDE_PORT = "0000:00:01.1"  # buses 2-3
AER = 0x100


def port_reg(bridge, port, offset, size):
    return bridge.mmio_read_int(gpa(port, offset), size)


def pcie_reg(bridge, port, offset, size):
    fn = bridge.function(bdf(port))
    return port_reg(bridge, port, fn.pcie_cap + offset, size)


def test_write_below_a_port_sets_secondary_status_and_aer(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(gpa("0000:01:03.0", 0x04), b"\x06\x00")  # device 3 on a link: nobody answers
    assert port_reg(b, PORT, r.PCI_SEC_STATUS, 2) & r.PCI_STATUS_REC_MASTER_ABORT
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == r.PCI_ERR_UNC_UNSUP
    devsta = pcie_reg(b, PORT, r.PCI_EXP_DEVSTA, 2)
    assert devsta & r.PCI_EXP_DEVSTA_URD
    assert devsta & r.PCI_EXP_DEVSTA_NFED and not devsta & r.PCI_EXP_DEVSTA_FED  # UR is non-fatal by default
    assert b.stats.unsupported_requests == 1
    # The other port saw nothing; the primary Status register is untouched.
    assert port_reg(b, WIDE_PORT, r.PCI_SEC_STATUS, 2) == 0
    assert port_reg(b, WIDE_PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == 0
    assert not port_reg(b, PORT, r.PCI_STATUS, 2) & r.PCI_STATUS_REC_MASTER_ABORT
    # And the write itself went nowhere.
    assert b.mmio_read(gpa("0000:01:03.0", 0x04), 2) == b"\xff\xff"


def test_first_error_pointer_and_header_log(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(gpa("0000:01:00.1", 0x106), b"\xab\xcd")  # word at 0x106: byte enables 1100b
    assert port_reg(b, PORT, AER + r.PCI_ERR_CAP, 4) & r.PCI_ERR_CAP_FEP_MASK == 20
    log = [port_reg(b, PORT, AER + r.PCI_ERR_HEADER_LOG + 4 * i, 4) for i in range(4)]
    # CfgWr0 (Fmt 010b, Type 00100b), Length 1 / requester 0000, tag 0, first BE 1100b /
    # bus 1, device 0, function 1, register 0x104 (DW aligned).
    assert log == [0x44000001, 0x0000000C, (1 << 24) | (0 << 19) | (1 << 16) | 0x104, 0]
    # A second error does not overwrite the first one's log while its status bit is set.
    b.mmio_write(gpa("0000:01:05.0", 0x10), b"\x00")
    assert port_reg(b, PORT, AER + r.PCI_ERR_HEADER_LOG + 8, 4) == log[2]


def test_bus_beyond_the_secondary_logs_a_type_1_request(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(gpa("0000:03:00.0", 0x3C), b"\x0b")
    assert port_reg(b, WIDE_PORT, r.PCI_SEC_STATUS, 2) & r.PCI_STATUS_REC_MASTER_ABORT
    assert port_reg(b, WIDE_PORT, AER + r.PCI_ERR_HEADER_LOG, 4) == 0x45000001  # CfgWr1


def test_guest_clears_the_bits_with_write_1_to_clear(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(gpa("0000:01:02.0", 0), b"\x00\x00\x00\x00")
    b.mmio_write(gpa(PORT, r.PCI_SEC_STATUS), (0x2000).to_bytes(2, "little"))
    assert port_reg(b, PORT, r.PCI_SEC_STATUS, 2) == 0
    b.mmio_write(gpa(PORT, AER + r.PCI_ERR_UNCOR_STATUS), (0).to_bytes(4, "little"))
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == r.PCI_ERR_UNC_UNSUP  # 0 written: kept
    b.mmio_write(gpa(PORT, AER + r.PCI_ERR_UNCOR_STATUS), r.PCI_ERR_UNC_UNSUP.to_bytes(4, "little"))
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == 0
    fn = b.function(bdf(PORT))
    b.mmio_write(gpa(PORT, fn.pcie_cap + r.PCI_EXP_DEVSTA), b"\x0f\x00")
    assert pcie_reg(b, PORT, r.PCI_EXP_DEVSTA, 2) & 0xF == 0
    # Cleared, the next error is logged again.
    b.mmio_write(gpa("0000:01:04.0", 0), b"\x00")
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == r.PCI_ERR_UNC_UNSUP


def test_masked_ur_sets_status_but_not_the_log(trapping_bridge):
    # PCIe 6.0 §7.8.4.3: a masked error is not recorded in the Header Log or First Error Pointer and
    # not reported; its status bit is still set (as QEMU's pcie_aer_inject_uncor_error() does).
    b = trapping_bridge
    b.mmio_write(gpa(PORT, AER + r.PCI_ERR_UNCOR_MASK), r.PCI_ERR_UNC_UNSUP.to_bytes(4, "little"))
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_MASK, 4) == r.PCI_ERR_UNC_UNSUP
    b.mmio_write(gpa("0000:01:01.0", 0), b"\x00")
    assert port_reg(b, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == r.PCI_ERR_UNC_UNSUP
    assert port_reg(b, PORT, AER + r.PCI_ERR_CAP, 4) & r.PCI_ERR_CAP_FEP_MASK == 0
    assert port_reg(b, PORT, AER + r.PCI_ERR_HEADER_LOG, 4) == 0
    assert port_reg(b, PORT, r.PCI_SEC_STATUS, 2) & r.PCI_STATUS_REC_MASTER_ABORT


def test_severity_register_decides_fatal(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(
        gpa(PORT, AER + r.PCI_ERR_UNCOR_SEVER), (0x00462030 | r.PCI_ERR_UNC_UNSUP).to_bytes(4, "little")
    )
    b.mmio_write(gpa("0000:01:01.0", 0), b"\x00")
    assert pcie_reg(b, PORT, r.PCI_EXP_DEVSTA, 2) & r.PCI_EXP_DEVSTA_FED


def dump_all(bridge):
    return {
        p: b"".join(bridge.mmio_read(p + off, 4) for off in range(0, 4096, 4)) for p in bridge.present_pages()
    }


def test_root_bus_and_unreached_bus_writes_are_counted_only(trapping_bridge):
    b = trapping_bridge
    before = dump_all(b)
    b.mmio_write(gpa("0000:00:07.0", 0x04), b"\x06\x00")  # root bus: the Root Complex completes it
    b.mmio_write(gpa("0000:09:00.0", 0x04), b"\x06\x00")  # a bus no port reaches
    assert b.stats.unsupported_requests == 2
    assert dump_all(b) == before  # no function's configuration space changed


def test_each_piece_of_a_write_is_one_request(trapping_bridge):
    b = trapping_bridge
    b.mmio_write(gpa("0000:01:02.0", 0x0), bytes(8))  # two dwords
    assert b.stats.unsupported_requests == 2
    b.mmio_write(gpa("0000:01:02.0", 0x11), bytes(4))  # 1 + 2 + 1 bytes
    assert b.stats.unsupported_requests == 5


def test_discard_policy_logs_nothing(bridge):
    bridge.mmio_write(gpa("0000:01:03.0", 0x04), b"\x06\x00")
    assert port_reg(bridge, PORT, r.PCI_SEC_STATUS, 2) == 0
    assert port_reg(bridge, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == 0


def test_absent_write_logs_even_if_the_page_is_present_now(bridge):
    # A write drained from the coalesced ring reached the hole, not the function.
    before = bridge.mmio_read(gpa("0000:01:00.0", 0x04), 2)
    bridge.absent_write(gpa("0000:01:00.0", 0x04), b"\x06\x00")
    assert bridge.mmio_read(gpa("0000:01:00.0", 0x04), 2) == before
    assert port_reg(bridge, PORT, AER + r.PCI_ERR_UNCOR_STATUS, 4) == r.PCI_ERR_UNC_UNSUP
    assert bridge.stats.absent_writes == 1 and bridge.stats.unsupported_requests == 1
