"""Advanced Error Reporting (extended capability 0x0001, PCIe 6.0 §7.8.4) and the Unsupported Request
a root port logs when a configuration write below it reaches no function.

Why it matters here: the KVM_MEM_PCI_HOLE review pointed out that a hole which silently drops
writes hides what a real root port would record, since a configuration request to a device that is
not there completes with Unsupported Request (UR) and is logged by the port. With `writes = "trap"`
pcihole sees those writes and logs them the way hardware would, in registers the guest can read and
clear (RW1C), which Linux's AER driver (drivers/pci/pcie/aer.c) reads.

Error logging follows PCIe 6.0 §6.2.5, Figure 6-2 ("Flowchart Showing Sequence of Device Error
Signaling and Logging Operations"), in the order QEMU's pcie_aer_inject_uncor_error() applies it:
 1. Device Status: Unsupported Request Detected, plus Fatal or Non-Fatal Error Detected by severity.
 2. Uncorrectable Error Status: the UR bit is set even when the error is masked. §7.8.4.3: "A masked
    error ... is not recorded or reported in the Header Log, TLP Prefix Log, or First Error Pointer,
    and is not reported to the PCI Express Root Complex by this Function": the mask governs logging
    and signaling, not the status bit (QEMU sets UNCOR_STATUS in the masked branch as well).
 3. Unmasked and no earlier error still logged: First Error Pointer = 20 and the Header Log holds the
    request's TLP header.
Error Messages and interrupts are not modeled (no MSI/INTx delivery yet), so Root Error Status stays 0.
"""

from __future__ import annotations

from .capabilities import add_extended_capability
from .config_space import ConfigSpace
from .registers import (
    PCI_ERR_CAP,
    PCI_ERR_CAP_FEP_MASK,
    PCI_ERR_COR_IMPLEMENTED,
    PCI_ERR_COR_MASK,
    PCI_ERR_COR_MASK_DEFAULT,
    PCI_ERR_COR_STATUS,
    PCI_ERR_HEADER_LOG,
    PCI_ERR_ROOT_CMD_WRITABLE,
    PCI_ERR_ROOT_COMMAND,
    PCI_ERR_ROOT_STATUS,
    PCI_ERR_ROOT_STATUS_BITS,
    PCI_ERR_SIZEOF,
    PCI_ERR_UNC_IMPLEMENTED,
    PCI_ERR_UNC_SEVER_DEFAULT,
    PCI_ERR_UNC_UNSUP,
    PCI_ERR_UNCOR_MASK,
    PCI_ERR_UNCOR_SEVER,
    PCI_ERR_UNCOR_STATUS,
    PCI_EXP_DEVSTA,
    PCI_EXP_DEVSTA_FED,
    PCI_EXP_DEVSTA_NFED,
    PCI_EXP_DEVSTA_URD,
    PCI_EXT_CAP_ID_ERR,
)

AER_CAPABILITY_VERSION = 2
PCI_ERR_UNC_UNSUP_BIT = PCI_ERR_UNC_UNSUP.bit_length() - 1  # 20, the First Error Pointer value

# TLP header fields (PCIe 6.0 §2.2.1, §2.2.7): Fmt 010b = 3 DW header with data; Type 0010xb = configuration
# request, x = 0 for Type 0 (to the secondary bus itself), 1 for Type 1 (to a bus further down).
TLP_FMT_3DW_WITH_DATA = 0b010
TLP_TYPE_CFG0 = 0b00100
TLP_TYPE_CFG1 = 0b00101


def add_aer_capability(config: ConfigSpace, *, root_port: bool) -> int:
    """Append AER with its reset values and masks; returns its offset (0x100 when it is the first)."""
    aer = add_extended_capability(config, PCI_EXT_CAP_ID_ERR, AER_CAPABILITY_VERSION, PCI_ERR_SIZEOF)
    config.init_write_1_to_clear(aer + PCI_ERR_UNCOR_STATUS, 4, PCI_ERR_UNC_IMPLEMENTED)
    config.init_writable(aer + PCI_ERR_UNCOR_MASK, 4, PCI_ERR_UNC_IMPLEMENTED)
    config.init_int(aer + PCI_ERR_UNCOR_SEVER, 4, PCI_ERR_UNC_SEVER_DEFAULT)
    config.init_writable(aer + PCI_ERR_UNCOR_SEVER, 4, PCI_ERR_UNC_IMPLEMENTED)
    config.init_write_1_to_clear(aer + PCI_ERR_COR_STATUS, 4, PCI_ERR_COR_IMPLEMENTED)
    config.init_int(aer + PCI_ERR_COR_MASK, 4, PCI_ERR_COR_MASK_DEFAULT)
    config.init_writable(aer + PCI_ERR_COR_MASK, 4, PCI_ERR_COR_IMPLEMENTED)
    if root_port:
        config.init_writable(aer + PCI_ERR_ROOT_COMMAND, 4, PCI_ERR_ROOT_CMD_WRITABLE)
        config.init_write_1_to_clear(aer + PCI_ERR_ROOT_STATUS, 4, PCI_ERR_ROOT_STATUS_BITS)
    return aer


def config_write_tlp_header(
    *, type1: bool, requester_id: int, bus: int, device: int, function: int, register: int, byte_enables: int
) -> tuple[int, int, int]:
    """The three header DWs of a one-DW configuration write (CfgWr0/CfgWr1), as the Header Log holds them.

    §7.8.4.8: byte 0 of the header is in the most significant byte of the first Header Log DW, so a
    32-bit read of the log returns e.g. 0x44000001 for CfgWr0, as Linux's aer_print_error() prints it.
    """
    tlp_type = TLP_TYPE_CFG1 if type1 else TLP_TYPE_CFG0
    dw0 = (TLP_FMT_3DW_WITH_DATA << 29) | (tlp_type << 24) | 1  # Length = 1 DW
    dw1 = (requester_id << 16) | (byte_enables & 0xF)  # tag 0, Last DW BE 0 (single DW), First DW BE
    dw2 = (bus << 24) | (device << 19) | (function << 16) | (register & 0xFFC)
    return dw0, dw1, dw2


def record_unsupported_request(
    config: ConfigSpace, *, pcie_cap: int, aer_cap: int, tlp_header: tuple[int, int, int]
) -> None:
    """Log an Unsupported Request detected by this function (see the module docstring for the order)."""
    status_before = config.read_int(aer_cap + PCI_ERR_UNCOR_STATUS, 4)
    fatal = bool(config.read_int(aer_cap + PCI_ERR_UNCOR_SEVER, 4) & PCI_ERR_UNC_UNSUP)
    config.set_bits(
        pcie_cap + PCI_EXP_DEVSTA,
        2,
        PCI_EXP_DEVSTA_URD | (PCI_EXP_DEVSTA_FED if fatal else PCI_EXP_DEVSTA_NFED),
    )
    config.set_bits(aer_cap + PCI_ERR_UNCOR_STATUS, 4, PCI_ERR_UNC_UNSUP)
    if config.read_int(aer_cap + PCI_ERR_UNCOR_MASK, 4) & PCI_ERR_UNC_UNSUP:
        return
    # The First Error Pointer is valid while the status bit it points at is still set (§7.8.4.7);
    # only then does an earlier error keep its header in the log.
    error_cap = config.read_int(aer_cap + PCI_ERR_CAP, 4)
    first_error = error_cap & PCI_ERR_CAP_FEP_MASK
    if status_before & (1 << first_error):
        return
    config.init_int(aer_cap + PCI_ERR_CAP, 4, (error_cap & ~PCI_ERR_CAP_FEP_MASK) | PCI_ERR_UNC_UNSUP_BIT)
    for i, dw in enumerate((*tlp_header, 0)):
        config.init_int(aer_cap + PCI_ERR_HEADER_LOG + 4 * i, 4, dw)
