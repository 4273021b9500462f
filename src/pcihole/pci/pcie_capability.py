"""The PCI Express capability (ID 0x10, PCIe 6.0 §7.5.3) that makes a function a PCIe function.

Linux reads it in set_pcie_port_type() (drivers/pci/probe.c) to learn the Device/Port Type; a root
port without it is not treated as a PCIe port (no AER, no pciehp). Every function here gets a version 2
capability (0x3C bytes). The link is a Gen1 x1 link (2.5 GT/s): nothing in pcihole moves data, so the
numbers only need to be consistent (Link Capabilities, Link Status and Link Capabilities 2 agree).
"""

from __future__ import annotations

from .capabilities import add_capability
from .config_space import ConfigSpace
from .registers import (
    PCI_CAP_EXP_SIZEOF,
    PCI_CAP_ID_EXP,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_RBER,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL2,
    PCI_EXP_DEVCTL2_ENDPOINT_WRITABLE,
    PCI_EXP_DEVCTL2_PORT_WRITABLE,
    PCI_EXP_DEVCTL_WRITABLE,
    PCI_EXP_DEVSTA,
    PCI_EXP_DEVSTA_ERROR_BITS,
    PCI_EXP_FLAGS,
    PCI_EXP_FLAGS_SLOT,
    PCI_EXP_FLAGS_TYPE_SHIFT,
    PCI_EXP_LNKCAP,
    PCI_EXP_LNKCAP2,
    PCI_EXP_LNKCAP2_SLS_2_5GB,
    PCI_EXP_LNKCAP_DLLLARC,
    PCI_EXP_LNKCAP_MLW_X1,
    PCI_EXP_LNKCAP_PN_SHIFT,
    PCI_EXP_LNKCAP_SLS_2_5GB,
    PCI_EXP_LNKCTL,
    PCI_EXP_LNKCTL2,
    PCI_EXP_LNKCTL2_TLS_2_5GT,
    PCI_EXP_LNKCTL2_WRITABLE,
    PCI_EXP_LNKCTL_ENDPOINT_WRITABLE,
    PCI_EXP_LNKCTL_PORT_WRITABLE,
    PCI_EXP_LNKSTA,
    PCI_EXP_LNKSTA_BW_STATUS_BITS,
    PCI_EXP_LNKSTA_CLS_2_5GB,
    PCI_EXP_LNKSTA_DLLLA,
    PCI_EXP_LNKSTA_NLW_X1,
    PCI_EXP_LNKSTA_SLC,
    PCI_EXP_RTCTL,
    PCI_EXP_RTCTL_WRITABLE,
    PCI_EXP_RTSTA,
    PCI_EXP_RTSTA_PME,
    PCI_EXP_SLTCAP,
    PCI_EXP_SLTCAP_HPC,
    PCI_EXP_SLTCAP_HPS,
    PCI_EXP_SLTCAP_NCCS,
    PCI_EXP_SLTCAP_PSN_SHIFT,
    PCI_EXP_SLTCTL,
    PCI_EXP_SLTCTL_WRITABLE,
    PCI_EXP_SLTSTA,
    PCI_EXP_SLTSTA_DLLSC,
    PCI_EXP_SLTSTA_EVENT_BITS,
    PCI_EXP_SLTSTA_PDC,
    PCI_EXP_SLTSTA_PDS,
    PCI_EXP_TYPE_DOWNSTREAM,
    PCI_EXP_TYPE_ROOT_PORT,
)

PCIE_CAPABILITY_VERSION = 2
MAX_PHYSICAL_SLOT = (1 << 13) - 1  # Slot Capabilities bits 31:19


def _is_port(port_type: int) -> bool:
    return port_type in (PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_DOWNSTREAM)


def add_pcie_capability(
    config: ConfigSpace,
    port_type: int,
    *,
    port_number: int = 0,
    physical_slot: int | None = None,
) -> int:
    """Add the PCIe capability with this Device/Port Type; returns its offset.

    `physical_slot` (root/downstream ports only) makes the port a hot-plug capable slot: Slot
    Implemented, Hot-Plug Capable and Hot-Plug Surprise (a device may come and go without the
    attention-button handshake, as QEMU's pcie-root-port advertises), and No Command Completed
    Support, so Linux's pciehp does not wait for command-completed interrupts we never send.
    """
    cap = add_capability(config, PCI_CAP_ID_EXP, PCI_CAP_EXP_SIZEOF)
    port = _is_port(port_type)
    flags = PCIE_CAPABILITY_VERSION | (port_type << PCI_EXP_FLAGS_TYPE_SHIFT)
    if physical_slot is not None:
        if not port:
            raise ValueError("only a root or downstream port can have a slot")
        if not 0 <= physical_slot <= MAX_PHYSICAL_SLOT:
            raise ValueError(f"physical slot {physical_slot} is outside 0..{MAX_PHYSICAL_SLOT}")
        flags |= PCI_EXP_FLAGS_SLOT
    config.init_int(cap + PCI_EXP_FLAGS, 2, flags)

    # Device: 128-byte max payload (encoding 0), role-based error reporting (§7.5.3.3).
    config.init_int(cap + PCI_EXP_DEVCAP, 4, PCI_EXP_DEVCAP_RBER)
    config.init_writable(cap + PCI_EXP_DEVCTL, 2, PCI_EXP_DEVCTL_WRITABLE)
    config.init_write_1_to_clear(cap + PCI_EXP_DEVSTA, 2, PCI_EXP_DEVSTA_ERROR_BITS)

    # Link: Gen1 x1. Ports report Data Link Layer Link Active (needed by pciehp for surprise removal).
    link_cap = PCI_EXP_LNKCAP_SLS_2_5GB | PCI_EXP_LNKCAP_MLW_X1 | (port_number << PCI_EXP_LNKCAP_PN_SHIFT)
    if port:
        link_cap |= PCI_EXP_LNKCAP_DLLLARC
    config.init_int(cap + PCI_EXP_LNKCAP, 4, link_cap)
    config.init_writable(
        cap + PCI_EXP_LNKCTL,
        2,
        PCI_EXP_LNKCTL_PORT_WRITABLE if port else PCI_EXP_LNKCTL_ENDPOINT_WRITABLE,
    )
    if port:
        # Link Status of a port tracks whether a device is attached; see set_slot_occupied().
        config.init_write_1_to_clear(cap + PCI_EXP_LNKSTA, 2, PCI_EXP_LNKSTA_BW_STATUS_BITS)
    else:
        config.init_int(
            cap + PCI_EXP_LNKSTA, 2, PCI_EXP_LNKSTA_CLS_2_5GB | PCI_EXP_LNKSTA_NLW_X1 | PCI_EXP_LNKSTA_SLC
        )

    if physical_slot is not None:
        config.init_int(
            cap + PCI_EXP_SLTCAP,
            4,
            PCI_EXP_SLTCAP_HPS
            | PCI_EXP_SLTCAP_HPC
            | PCI_EXP_SLTCAP_NCCS
            | (physical_slot << PCI_EXP_SLTCAP_PSN_SHIFT),
        )
        config.init_writable(cap + PCI_EXP_SLTCTL, 2, PCI_EXP_SLTCTL_WRITABLE)
        config.init_write_1_to_clear(cap + PCI_EXP_SLTSTA, 2, PCI_EXP_SLTSTA_EVENT_BITS)

    if port_type == PCI_EXP_TYPE_ROOT_PORT:
        config.init_writable(cap + PCI_EXP_RTCTL, 2, PCI_EXP_RTCTL_WRITABLE)
        config.init_write_1_to_clear(cap + PCI_EXP_RTSTA, 4, PCI_EXP_RTSTA_PME)

    config.init_writable(
        cap + PCI_EXP_DEVCTL2,
        2,
        PCI_EXP_DEVCTL2_PORT_WRITABLE if port else PCI_EXP_DEVCTL2_ENDPOINT_WRITABLE,
    )
    config.init_int(cap + PCI_EXP_LNKCAP2, 4, PCI_EXP_LNKCAP2_SLS_2_5GB)
    config.init_int(cap + PCI_EXP_LNKCTL2, 2, PCI_EXP_LNKCTL2_TLS_2_5GT)
    config.init_writable(cap + PCI_EXP_LNKCTL2, 2, PCI_EXP_LNKCTL2_WRITABLE)
    return cap


def set_link_up(config: ConfigSpace, cap: int, up: bool, *, report_change: bool) -> None:
    """A port's view of its link: a device attached (link trained, DLL active) or not.

    With `report_change`, the RW1C Presence Detect Changed and Data Link Layer State Changed bits
    are set too, as a hot-plug event does (PCIe 6.0 §7.5.3.11); at power-on they are not.
    """
    link_status = PCI_EXP_LNKSTA_CLS_2_5GB | PCI_EXP_LNKSTA_NLW_X1 | PCI_EXP_LNKSTA_SLC | PCI_EXP_LNKSTA_DLLLA
    if up:
        config.set_bits(cap + PCI_EXP_LNKSTA, 2, link_status)
    else:
        config.clear_bits(cap + PCI_EXP_LNKSTA, 2, link_status)
    if config.read_int(cap + PCI_EXP_FLAGS, 2) & PCI_EXP_FLAGS_SLOT:
        if up:
            config.set_bits(cap + PCI_EXP_SLTSTA, 2, PCI_EXP_SLTSTA_PDS)
        else:
            config.clear_bits(cap + PCI_EXP_SLTSTA, 2, PCI_EXP_SLTSTA_PDS)
        if report_change:
            config.set_bits(cap + PCI_EXP_SLTSTA, 2, PCI_EXP_SLTSTA_PDC | PCI_EXP_SLTSTA_DLLSC)
