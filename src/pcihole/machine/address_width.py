"""A machine its vCPU can address: every guest-physical range pcihole places must end below
2**MAXPHYADDR, the physical address width the vCPU's CPUID reports (leaf 0x80000008 EAX[7:0]).

QEMU refuses such a machine before its vCPUs run (hw/i386/pc.c, pc_memory_init):

    maxusedaddr = pc_max_used_gpa(pcms, pci_hole64_size);
    maxphysaddr = ((hwaddr)1 << cpu->phys_bits) - 1;
    if (maxphysaddr < maxusedaddr) {
        error_report("Address space limit 0x%"PRIx64" < 0x%"PRIx64
                     " phys-bits too low (%u)", maxphysaddr, maxusedaddr, cpu->phys_bits);

and so does pcihole, naming the range: a guest cannot reach the rest. Linux clips every host bridge
window at the CPU's width (drivers/acpi/pci_root.c, acpi_pci_root_validate_resources: "host bridge
window %pR (ignored, not CPU addressable)", iomem_resource.end being 2**x86_phys_bits - 1), so the
BARs meant for it get no address; and a page table entry pointing at or above the width is a
reserved-bit page fault (SDM Vol. 3A 4.5.4).

The width is the backend's: on kvm the host's, as KVM_GET_SUPPORTED_CPUID reports it; on
the model 40, the width its engine's page walk enforces (hv/model/cpuid.py; Unicorn's compile-time
TCG_PHYS_ADDR_BITS). The ranges are RAM and what the ACPI tables hand out
(AcpiTables.placed_windows): ECAM windows, and every root bridge's 32-bit and 64-bit windows,
expander buses' included. `pcihole acpi` has no CPU and checks none of this.
"""

from __future__ import annotations

from collections.abc import Iterable

from pcihole.acpi import AcpiTables, MmioWindow
from pcihole.acpi.window_plan import PlacedWindow
from pcihole.hv.cpu_setup import physical_address_bits
from pcihole.hv.interface import Hypervisor


def placed_ranges(ram_bytes: int, acpi: AcpiTables) -> list[PlacedWindow]:
    """RAM (one range from 0, machine/layout.py) and every window of the ACPI tables."""
    return [PlacedWindow("RAM", MmioWindow(0, ram_bytes)), *acpi.placed_windows]


def beyond_width(ranges: Iterable[PlacedWindow], bits: int) -> PlacedWindow | None:
    """The range that ends highest above the last address of `bits` physical address bits
    (2**bits - 1, QEMU's maxphysaddr), or None when every range ends at or below it."""
    limit = (1 << bits) - 1
    beyond = [r for r in ranges if r.window.last > limit]
    return max(beyond, key=lambda r: r.window.last, default=None)


def address_width_problem(ram_bytes: int, acpi: AcpiTables, hv: Hypervisor) -> str | None:
    """What the backend's vCPU cannot address, as one sentence without the machine file's name;
    None when it can address everything."""
    bits = physical_address_bits(hv.get_supported_cpuid())
    r = beyond_width(placed_ranges(ram_bytes, acpi), bits)
    if r is None:
        return None
    return (
        f"{r.what} at {r.window.base:#x} ends at {r.window.last:#x}, "
        f"beyond the {hv.name} CPU's {bits} physical address bits"
    )
