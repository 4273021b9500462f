"""PCIe expander buses in the DSDT: one PNP0A08 host bridge device per expander, as QEMU's
build_dsdt() (hw/i386/acpi-build.c) describes each pxb-pcie root bus.

An expander bridge opens another root bus in a segment. Linux scans a root bus only where a PNP0A03
device says it exists (acpi_pci_root_add() reads _SEG, _BBN and the WordBusNumber of _CRS), so
each expander gets, in \\_SB::

    Device (X080) {                              // X<segment><bus> (segment < 0x10), else Y<n>
        Name (_HID, EisaId ("PNP0A08"))
        Name (_CID, EisaId ("PNP0A03"))
        Name (_SEG, Zero)                        // its segment (QEMU leaves it out: segment 0)
        Name (_BBN, 0x80)                        // its root bus
        Name (_UID, 0x01000080)                  // see EXPANDER_UID_BASE
        Name (_CRS, ResourceTemplate () {
            WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0x80, 0x8F, 0, 0x10)
            WordIO (...)  DWordMemory (...)  QWordMemory (...)   // its windows, see below
        })
        Method (_OSC, 4, NotSerialized) { ... }  // pci_osc.py
    }

and the segment's main host bridge's bus range stops below its lowest expander bus (QEMU:
"root_bus_limit = bus_num - 1"), so that no two root bridges claim a bus: Linux would refuse the
second ("busn_res: can not insert ... conflicts with").

Each expander's _CRS also has the I/O, 32-bit and 64-bit memory windows for what is below it
(WordIO, DWordMemory, QWordMemory after the WordBusNumber, as QEMU's build_crs() writes them), cut
from its segment's windows (pci_windows.carve()); the main host bridge's _CRS leaves those ranges
out, as QEMU's PCI0 leaves out every pxb's. And it has the same _OSC as a main host bridge
(pci_osc.py; QEMU: build_q35_osc_method(true), "Expander bridges do not have ACPI PCI Hot-plug
enabled").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pcihole.pci.bridge_windows import WindowNeed

from . import aml
from .mcfg import EcamSegment
from .pci_osc import osc_method
from .pci_windows import MmioWindow
from .resources import dword_memory, qword_memory, resource_template, word_bus_number, word_io

PCI_EXPRESS_ROOT_BRIDGE = "PNP0A08"
PCI_BUS = "PNP0A03"
#: _UID must be unique among devices with one _HID (ACPI 6.5 §6.1.12): main host bridges use their
#: segment id (< 0x10000); expanders use this base | segment << 8 | bus, which no segment id reaches.
EXPANDER_UID_BASE = 1 << 24


@dataclass(frozen=True, slots=True)
class ExpanderBus:
    """An expander's root bus: buses [bus, last_bus] of a segment."""

    segment: int
    bus: int
    last_bus: int
    #: what the BARs below it need (pcihole.pci.bridge_windows): the size of its windows
    need: WindowNeed = WindowNeed()
    #: hot-pluggable slots below it: _OSC grants native PCIe hot-plug (pci_osc.py)
    native_hotplug: bool = True

    @property
    def uid(self) -> int:
        return EXPANDER_UID_BASE | self.segment << 8 | self.bus


def expander_name(expander: ExpanderBus, position: int) -> str:
    """X<segment><bus> for segments below 0x10 (X never starts a host bridge name), else Y<position>."""
    if expander.segment < 0x10:
        return f"X{expander.segment:X}{expander.bus:02X}"
    if position < 0x1000:
        return f"Y{position:03X}"
    raise ValueError(f"expander bus {expander.bus:#x} is number {position} of more than 4096: no name left")


@dataclass(frozen=True, slots=True)
class ExpanderWindows:
    """An expander's windows, carved from its segment's (None: that kind is not needed)."""

    io: MmioWindow | None = None
    mem32: MmioWindow | None = None
    mem64: MmioWindow | None = None


def expander_bridge(
    expander: ExpanderBus, position: int, windows: ExpanderWindows = ExpanderWindows()
) -> bytes:
    descriptors = [word_bus_number(expander.bus, expander.last_bus)]
    if windows.io is not None:
        descriptors.append(word_io(windows.io.base, windows.io.last))
    if windows.mem32 is not None:
        descriptors.append(dword_memory(windows.mem32.base, windows.mem32.last))
    if windows.mem64 is not None:
        descriptors.append(qword_memory(windows.mem64.base, windows.mem64.last))
    return aml.device(
        expander_name(expander, position),
        [
            aml.name("_HID", aml.integer(aml.eisa_id(PCI_EXPRESS_ROOT_BRIDGE))),
            aml.name("_CID", aml.integer(aml.eisa_id(PCI_BUS))),
            aml.name("_SEG", aml.integer(expander.segment)),
            aml.name("_BBN", aml.integer(expander.bus)),
            aml.name("_UID", aml.integer(expander.uid)),
            aml.name("_CRS", resource_template(descriptors)),
            osc_method(expander.native_hotplug),
        ],
    )


def main_root_last_bus(segment: EcamSegment, expanders: Sequence[ExpanderBus]) -> int:
    """The last bus of the segment's main root bridge: below its lowest expander bus, if any."""
    above = [x.bus for x in expanders if x.segment == segment.id and x.bus > segment.start_bus]
    return min([segment.end_bus, *(bus - 1 for bus in above)])
