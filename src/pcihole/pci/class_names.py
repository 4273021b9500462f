"""Human names of PCI class codes, as lspci prints them (a subset of pci.ids' class list)."""

from __future__ import annotations

# (base class << 8 | subclass) -> name, from pci.ids "C" lines.
SUBCLASS_NAMES = {
    0x0000: "Non-VGA unclassified device",
    0x0100: "SCSI storage controller",
    0x0101: "IDE interface",
    0x0106: "SATA controller",
    0x0108: "Non-Volatile memory controller",
    0x0180: "Mass storage controller",
    0x0200: "Ethernet controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0380: "Display controller",
    0x0401: "Multimedia audio controller",
    0x0403: "Audio device",
    0x0500: "RAM memory",
    0x0600: "Host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0700: "Serial controller",
    0x0780: "Communication controller",
    0x0880: "System peripheral",
    0x0C03: "USB controller",
    0x0C05: "SMBus",
    0xFF00: "Unassigned class",
}
BASE_CLASS_NAMES = {
    0x00: "Unclassified device",
    0x01: "Mass storage controller",
    0x02: "Network controller",
    0x03: "Display controller",
    0x04: "Multimedia controller",
    0x05: "Memory controller",
    0x06: "Bridge",
    0x07: "Communication controller",
    0x08: "Generic system peripheral",
    0x0C: "Serial bus controller",
    0xFF: "Unassigned class",
}


def class_name(class_code: int) -> str:
    """The name of a 24-bit class code (base, subclass, programming interface)."""
    sub = class_code >> 8
    return SUBCLASS_NAMES.get(sub) or BASE_CLASS_NAMES.get(sub >> 8, "Device")
