"""Capability lists: where a capability goes in configuration space and how it is linked.

Standard capabilities (PCIe 6.0 §7.5.1.1.11) form a singly linked list of dword-aligned structures
in [0x40, 0x100), starting at Capabilities Pointer (0x34), with Status bit 4 "Capabilities List" set.
Extended capabilities (§7.6) form a list starting at 0x100 whose u32 headers hold ID, version and
the next offset; an empty list reads 0 at 0x100. New capabilities are appended after the last one,
as QEMU's pci_add_capability()/pcie_add_capability() do.
"""

from __future__ import annotations

from pcihole.memory.address import align_up

from .config_space import ConfigSpace
from .registers import (
    PCI_CAP_LIST_ID,
    PCI_CAP_LIST_NEXT,
    PCI_CAP_START,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_EXT_CAP_START,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    pci_ext_cap_header,
)

#: Capabilities start on a DWORD boundary: the low two bits of a capability pointer are reserved
#: (PCI Local Bus 3.0, 6.7), and of an extended capability's Next Capability Offset too (PCIe 7.6.3).
CAPABILITY_ALIGN = 4


def add_capability(config: ConfigSpace, cap_id: int, size: int) -> int:
    """Append a standard capability of `size` bytes (header included); returns its offset."""
    offset = config.read_int(PCI_CAPABILITY_LIST, 1)
    if offset == 0:
        new = PCI_CAP_START
        link_at = PCI_CAPABILITY_LIST
    else:
        while True:
            nxt = config.read_int(offset + PCI_CAP_LIST_NEXT, 1)
            if nxt == 0:
                break
            offset = nxt
        # Configuration space does not record a capability's length; the model keeps it beside the bytes.
        new = align_up(offset + config.capability_sizes[offset], CAPABILITY_ALIGN)
        link_at = offset + PCI_CAP_LIST_NEXT
    if new + size > PCI_CFG_SPACE_SIZE:
        raise ValueError(f"capability {cap_id:#x} of {size} bytes does not fit below 0x100")
    config.init_int(new + PCI_CAP_LIST_ID, 1, cap_id)
    config.init_int(new + PCI_CAP_LIST_NEXT, 1, 0)
    config.init_int(link_at, 1, new)
    config.set_bits(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
    config.capability_sizes[new] = size
    return new


def add_extended_capability(config: ConfigSpace, cap_id: int, version: int, size: int) -> int:
    """Append an extended capability (first one at 0x100); returns its offset."""
    header = config.read_int(PCI_EXT_CAP_START, 4)
    if header == 0:
        new = PCI_EXT_CAP_START
        previous = None
    else:
        previous = PCI_EXT_CAP_START
        while (nxt := config.read_int(previous, 4) >> 20) != 0:
            previous = nxt
        new = align_up(previous + config.capability_sizes[previous], CAPABILITY_ALIGN)
    if new + size > len(config):
        raise ValueError(f"extended capability {cap_id:#x} of {size} bytes does not fit in the space")
    config.init_int(new, 4, pci_ext_cap_header(cap_id, version, 0))
    if previous is not None:
        old = config.read_int(previous, 4)
        config.init_int(previous, 4, (old & 0x000FFFFF) | (new << 20))
    config.capability_sizes[new] = size
    return new


def find_capability(config: ConfigSpace, cap_id: int) -> int | None:
    """Walk the standard list as Linux's pci_find_capability() does; None if absent."""
    if not config.read_int(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return None
    offset = config.read_int(PCI_CAPABILITY_LIST, 1) & ~3
    for _ in range(48):  # PCI_FIND_CAP_TTL: a loop in the list must not hang us
        if offset < PCI_CAP_START:
            return None
        if config.read_int(offset + PCI_CAP_LIST_ID, 1) == cap_id:
            return offset
        offset = config.read_int(offset + PCI_CAP_LIST_NEXT, 1) & ~3
    return None


def find_extended_capability(config: ConfigSpace, cap_id: int) -> int | None:
    """Walk the extended list as Linux's pci_find_ext_capability() does; None if absent."""
    offset = PCI_EXT_CAP_START
    for _ in range((len(config) - PCI_EXT_CAP_START) // 8):
        header = config.read_int(offset, 4)
        if header == 0:
            return None
        if header & 0xFFFF == cap_id:
            return offset
        offset = header >> 20
        if offset < PCI_EXT_CAP_START:
            return None
    return None
