"""ECAM address decode: an offset into a segment's window <-> (bus, device, function, register).

PCIe 6.0 §7.2.2, Table 7-1 "Enhanced Configuration Address Mapping":
    A[27:20] bus, A[19:15] device, A[14:12] function, A[11:2] register, A[1:0] byte enables.
Linux builds the same address in PCI_MMCFG_BUS_OFFSET(bus) | (devfn << 12) | reg
(arch/x86/pci/mmconfig_64.c pci_dev_base(); include/linux/pci-ecam.h).

Offsets here are relative to the address of bus 0 of the segment (the MCFG "base address" and the
_CBA value are both bus-0 relative), so a segment whose bus range starts at 16 still decodes bus 16
at offset 16 << 20.
"""

from __future__ import annotations

from typing import NamedTuple

REGISTER_BITS = 12
FUNCTION_BITS = 3
DEVICE_BITS = 5
BUS_BITS = 8

FUNCTION_SHIFT = REGISTER_BITS  # 12
DEVICE_SHIFT = FUNCTION_SHIFT + FUNCTION_BITS  # 15
BUS_SHIFT = DEVICE_SHIFT + DEVICE_BITS  # 20

REGISTER_MASK = (1 << REGISTER_BITS) - 1  # 0xfff
FUNCTION_MASK = (1 << FUNCTION_BITS) - 1  # 0x7
DEVICE_MASK = (1 << DEVICE_BITS) - 1  # 0x1f
BUS_MASK = (1 << BUS_BITS) - 1  # 0xff

CONFIG_SPACE_SIZE = 1 << FUNCTION_SHIFT  # 4 KiB per function: one host page
BUS_WINDOW_SIZE = 1 << BUS_SHIFT  # 1 MiB per bus
SEGMENT_WINDOW_SIZE = BUS_WINDOW_SIZE << BUS_BITS  # 256 MiB for buses 0-255
MAX_BUS = BUS_MASK
MAX_DEVICE = DEVICE_MASK
MAX_FUNCTION = FUNCTION_MASK


class EcamAddress(NamedTuple):
    """One decoded ECAM offset."""

    bus: int
    device: int
    function: int
    register: int

    @property
    def devfn(self) -> int:
        """Device and function packed as Linux's devfn (PCI_DEVFN): device << 3 | function."""
        return (self.device << FUNCTION_BITS) | self.function


def decode(offset: int) -> EcamAddress:
    """Split an offset from the bus-0 address of a segment into its ECAM fields."""
    if not 0 <= offset < SEGMENT_WINDOW_SIZE:
        raise ValueError(f"ECAM offset {offset:#x} is outside a segment's 256 MiB window")
    return EcamAddress(
        bus=(offset >> BUS_SHIFT) & BUS_MASK,
        device=(offset >> DEVICE_SHIFT) & DEVICE_MASK,
        function=(offset >> FUNCTION_SHIFT) & FUNCTION_MASK,
        register=offset & REGISTER_MASK,
    )


def encode(bus: int, device: int, function: int, register: int = 0) -> int:
    """The offset (from the segment's bus-0 address) of `register` of bus:device.function."""
    for name, value, mask in (
        ("bus", bus, BUS_MASK),
        ("device", device, DEVICE_MASK),
        ("function", function, FUNCTION_MASK),
        ("register", register, REGISTER_MASK),
    ):
        if not 0 <= value <= mask:
            raise ValueError(f"ECAM {name} {value} is outside 0..{mask}")
    return (bus << BUS_SHIFT) | (device << DEVICE_SHIFT) | (function << FUNCTION_SHIFT) | register


def function_page_offset(bus: int, device: int, function: int) -> int:
    """The offset of the 4 KiB page holding bus:device.function's configuration space."""
    return encode(bus, device, function, 0)
