"""The DSDT: one PCIe host bridge per segment, a motherboard device reserving ECAM, and \\_S5.

In ASL, for one segment 0 with buses 0-255 at 0xE0000000 (the default machine)::

    DefinitionBlock ("", "DSDT", 2, "PCIHOL", "PHOLDSDT", 1) {
        Scope (\\_SB) {
            Device (PCI0) {
                Name (_HID, EisaId ("PNP0A08"))  // PCI Express Root Bridge
                Name (_CID, EisaId ("PNP0A03"))  // PCI Bus
                Name (_SEG, Zero)
                Name (_BBN, Zero)
                Name (_UID, Zero)
                Name (_CRS, ResourceTemplate () {
                    WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)
                    WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                            0, 0x1000, 0xFFFF, 0, 0xF000)
                    DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                                 0, 0xC0000000, 0xDFFFFFFF, 0, 0x20000000)
                    QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                                 0, 0x4000000000, 0x7FFFFFFFFF, 0, 0x4000000000)
                })
                Method (_OSC, 4, NotSerialized) { ... }  // pci_osc.py: native PCIe features to the OS
            }
            Device (MBRD) {
                Name (_HID, EisaId ("PNP0C02"))  // PNP Motherboard Resources
                Name (_UID, Zero)
                Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000) })
            }
        }
        Name (\\_S5, Package (0x04) { 0x05, Zero, Zero, Zero })
    }

Why each piece (docs/linux-ecam.md §2-3):

- _HID PNP0A08 *and* _CID PNP0A03: the pci_root scan handler matches only "PNP0A03" (root_device_ids
  in drivers/acpi/pci_root.c); PNP0A08 makes acpi_pci_root_add() treat the bridge as PCI Express.
  acpi_pci_root_add() reads _SEG (segment, default 0), _BBN and the WordBusNumber of _CRS (the bus
  range), then pci_acpi_scan_root() scans the root bus through ECAM.
- _BBN is the first bus of the segment's range (ACPI 6.5 §6.5.5 "_BBN (Base Bus Number)"); _UID is
  the segment id, unique among PNP0A08 devices as §6.1.12 requires for one _HID.
- Host bridge names: PCI<s> for segment s < 0x10, PC<ss> below 0x100 (the letters PCI never collide
  with two hex digits), R<nnn> (position in the segment list, hex) above.
- The producer WordIO, DWordMemory and QWordMemory are the bridge's I/O, 32-bit and 64-bit BAR
  windows (pci_windows.py), so Linux can give every BAR an address. pcihole routes no port I/O to PCI
  devices: the I/O window only lets Linux assign I/O BARs without errors.
- _OSC (pci_osc.py, QEMU's method): Linux negotiates native hot-plug, PME, AER and the PCIe
  capability through it ("_OSC: OS now controls [...]"); without it the platform keeps them.
- Expander buses (expander_bridge.py) take their windows from the top of their segment's, and the
  main host bridge's _CRS lists what is left, as QEMU's PCI0 does around its pxb buses.
- MBRD, _HID PNP0C02, one Memory32Fixed per decoded ECAM window, exactly
  [ecam_base + start_bus MiB, + buses MiB): without conf1 Linux accepts MCFG only in the late pass,
  pci_mmcfg_late_init() -> pci_mmcfg_check_reserved() -> is_mmconf_reserved(is_acpi_reserved), which
  walks every PNP0C01/PNP0C02 device's _CRS (find_mboard_resource -> check_mcfg_resource) for a
  descriptor containing the window. pnp/system.c then reserves it ("system 00:00: [mem ...] has been
  reserved"). A window that does not fit Memory32Fixed (it ends above 4 GiB, which topology.py forbids
  but this module accepts) gets a consumer QWordMemory, which check_mcfg_resource also takes.
- \\_S5 (§7.4.2.6 "\\_S5 (Soft Off)"): SLP_TYP 5. acpi_sleep_init() registers acpi_power_off only when
  S5 is supported, which in hardware-reduced mode also needs the FADT's SLEEP_CONTROL/SLEEP_STATUS
  registers (fadt.py points both at machine/acpi_power.py's port).
- COMn (PNP0501, serial_port()): in a hardware-reduced machine Linux has no legacy PIC, so the
  8250 driver's SERIAL_PORT_DFNS port has no ISA IRQ 4; the DSDT names the port and its GSI.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcihole.pci.bridge_windows import WindowNeed

from . import aml
from .expander_bridge import ExpanderBus, expander_bridge, main_root_last_bus
from .mcfg import EcamSegment, decoded_window
from .pci_osc import osc_method
from .pci_windows import MmioWindow
from .resources import (
    dword_memory,
    interrupt,
    io_port,
    memory32_fixed,
    qword_memory,
    resource_template,
    word_bus_number,
    word_io,
)
from .sdt_header import build_sdt
from .window_plan import WindowPlan, plan_windows

DSDT_SIGNATURE = b"DSDT"
#: §5.2.11.1: the DSDT's revision "also sets the global integer width for the AML interpreter": 2 and
#: above means 64-bit integers; ACPICA (acpi_ut_set_integer_width) makes them 32-bit below 2.
DSDT_REVISION = 2

PCI_EXPRESS_ROOT_BRIDGE = "PNP0A08"
PCI_BUS = "PNP0A03"
MOTHERBOARD_RESOURCES = "PNP0C02"
SERIAL_PORT_16550 = "PNP0501"
SERIAL_PORT_REGISTERS = 8
MOTHERBOARD_DEVICE = "MBRD"  # cloud-hypervisor's name for the same device
SYSTEM_BUS = "\\_SB"
SOFT_OFF = "\\_S5"
SLP_TYP_S5 = 5
FOUR_GIB = 1 << 32


def host_bridge_name(segment_id: int, position: int) -> str:
    """The 4-character name of a segment's host bridge (see the module docstring)."""
    if segment_id < 0x10:
        return f"PCI{segment_id:X}"
    if segment_id < 0x100:
        return f"PC{segment_id:02X}"
    if position < 0x1000:
        return f"R{position:03X}"
    raise ValueError(
        f"segment {segment_id:#x} is number {position} of more than 4096: no host bridge name left"
    )


def host_bridge(
    segment: EcamSegment,
    position: int,
    window: MmioWindow | None | Sequence[MmioWindow],
    last_bus: int | None = None,
    io_window: MmioWindow | None | Sequence[MmioWindow] = None,
    mem64_window: MmioWindow | None | Sequence[MmioWindow] = None,
    native_hotplug: bool = True,
) -> bytes:
    """`last_bus`: where the bridge's bus range ends when expander buses take the top of the segment.
    Each window is one range, none, or the ranges left once expanders have taken theirs (QEMU's PCI0
    _CRS lists the free ranges one descriptor each: crs_replace_with_free_ranges())."""
    descriptors = [word_bus_number(segment.start_bus, segment.end_bus if last_bus is None else last_bus)]
    descriptors += [word_io(w.base, w.last) for w in _ranges(io_window)]
    descriptors += [dword_memory(w.base, w.last) for w in _ranges(window)]
    descriptors += [qword_memory(w.base, w.last) for w in _ranges(mem64_window)]
    return aml.device(
        host_bridge_name(segment.id, position),
        [
            aml.name("_HID", aml.integer(aml.eisa_id(PCI_EXPRESS_ROOT_BRIDGE))),
            aml.name("_CID", aml.integer(aml.eisa_id(PCI_BUS))),
            aml.name("_SEG", aml.integer(segment.id)),
            aml.name("_BBN", aml.integer(segment.start_bus)),
            aml.name("_UID", aml.integer(segment.id)),
            aml.name("_CRS", resource_template(descriptors)),
            osc_method(native_hotplug),
        ],
    )


def _ranges(window: MmioWindow | None | Sequence[MmioWindow]) -> Sequence[MmioWindow]:
    if window is None:
        return ()
    if isinstance(window, MmioWindow):
        return (window,)
    return window


def ecam_reservation(segment: EcamSegment) -> bytes:
    """The descriptor covering exactly this segment's decoded ECAM window."""
    base, length = decoded_window(segment)
    if base + length <= FOUR_GIB:
        return memory32_fixed(base, length)
    return qword_memory(base, base + length - 1, producer=False)


def motherboard_resources(segments: Sequence[EcamSegment]) -> bytes:
    return aml.device(
        MOTHERBOARD_DEVICE,
        [
            aml.name("_HID", aml.integer(aml.eisa_id(MOTHERBOARD_RESOURCES))),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", resource_template(ecam_reservation(s) for s in segments)),
        ],
    )


def serial_port(index: int, base: int, gsi: int) -> bytes:
    """Device (COMn) { _HID PNP0501 (16550A-compatible), _UID n, _CRS: its 8 ports and its edge
    interrupt }, as cloud-hypervisor's and QEMU's DSDTs describe COM1. In a hardware-reduced ACPI
    machine Linux has no legacy PIC (acpi_generic_reduced_hw_init: null_legacy_pic), so ISA IRQ 4
    has no Linux interrupt: the legacy 8250 port that assumes it fails request_irq, and every write
    to the opened tty gets EIO. Described here, 8250_pnp takes the port over with the interrupt
    acpi_register_gsi maps through the IOAPIC."""
    return aml.device(
        f"COM{index + 1}",
        [
            aml.name("_HID", aml.integer(aml.eisa_id(SERIAL_PORT_16550))),
            aml.name("_UID", aml.integer(index)),
            aml.name("_CRS", resource_template([io_port(base, SERIAL_PORT_REGISTERS), interrupt(gsi)])),
        ],
    )


def soft_off() -> bytes:
    """Name (\\_S5, Package () { SLP_TYP for PM1a, for PM1b, reserved, reserved }) (§7.4.2)."""
    return aml.name(SOFT_OFF, aml.package([aml.integer(SLP_TYP_S5), *[aml.integer(0)] * 3]))


def build_dsdt(
    segments: Sequence[EcamSegment],
    windows: Sequence[MmioWindow | None],
    expanders: Sequence[ExpanderBus] = (),
    serial_ports: Sequence[tuple[int, int]] = (),
    needs: Sequence[WindowNeed] = (),
    native_hotplug: Sequence[bool] = (),
    *,
    plan: WindowPlan | None = None,
) -> bytes:
    """The DSDT for these segments; windows[i] is segment i's BAR window (None: no memory window).
    Each expander bus gets its own PNP0A08 (expander_bridge.py) with windows for what it needs, cut
    from its segment's; each (base port, GSI) of `serial_ports` a PNP0501. needs[i]: what segment
    i's main root bus needs (its 64-bit window grows to hold it; default: nothing);
    native_hotplug[i]: whether that root bus has hot-pluggable slots (pci_osc.py; default: yes).
    `plan`: window_plan.plan_windows(segments, windows, expanders, needs), where the caller keeps it."""
    if len(windows) != len(segments):
        raise ValueError(f"{len(segments)} segments but {len(windows)} MMIO windows")
    ids = [s.id for s in segments]
    if len(set(ids)) != len(ids):
        # Two host bridges with one _SEG and _UID, and one name: ACPICA refuses the second (AE_ALREADY_EXISTS).
        raise ValueError(f"segment ids {sorted(ids)} are not unique")
    for s in segments:
        decoded_window(s)  # checks the bus range
    native_hotplug = [*native_hotplug, *[True] * (len(segments) - len(native_hotplug))]
    if plan is None:
        plan = plan_windows(segments, windows, expanders, needs)
    bridges = []
    for i, s in enumerate(segments):
        main = plan.main[i]
        last_bus = main_root_last_bus(s, expanders)
        bridges.append(host_bridge(s, i, main.mem32, last_bus, main.io, main.mem64, native_hotplug[i]))
    bridges += [expander_bridge(x, n, plan.expanders[n]) for n, x in enumerate(expanders)]
    serial = [serial_port(i, base, gsi) for i, (base, gsi) in enumerate(serial_ports)]
    body = aml.scope(SYSTEM_BUS, [*bridges, motherboard_resources(segments), *serial]) + soft_off()
    return build_sdt(DSDT_SIGNATURE, DSDT_REVISION, body)
