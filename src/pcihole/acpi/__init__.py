"""ACPI tables a machine's firmware would provide, enough for Linux to use ECAM with no conf1.

checksum.py     the byte-sum rule
sdt_header.py   the common 36-byte table header
rsdp.py         Root System Description Pointer (ACPI 2.0 form)
xsdt.py         Extended System Description Table
fadt.py         Fixed ACPI Description Table ("FACP"), hardware-reduced, pointing at the DSDT
aml.py          a tiny AML encoder (names, integers, PkgLength, Name/Scope/Device/Package/Buffer)
resources.py    _CRS resource descriptors (bus number, memory windows, fixed memory, end tag)
pci_windows.py  the I/O, 32-bit and 64-bit windows each host bridge offers for BARs, and the
                expanders' blocks carved from them
window_plan.py  which of those windows each root bridge's _CRS produces (main host bridges and
                expander buses), and every guest-physical range the tables hand out
pci_osc.py      _OSC: the native PCIe features a host bridge hands the OS (QEMU's method)
expander_bridge.py  a PNP0A08 for each PCIe expander bus (QEMU pxb-pcie)
dsdt.py         Differentiated System Description Table: host bridges, ECAM reservation, \\_S5
madt.py         Multiple APIC Description Table ("APIC"): local APICs and the I/O APIC
mcfg.py         PCI Express memory-mapped configuration (ECAM) allocations
tables.py       build_tables(segments, base_gpa) -> AcpiTables; write_tables(tables, out_dir)
"""

from .expander_bridge import ExpanderBus
from .mcfg import EcamSegment, McfgAllocation
from .pci_windows import MmioWindow
from .tables import AcpiTables, build_tables, write_tables

__all__ = [
    "AcpiTables",
    "EcamSegment",
    "ExpanderBus",
    "McfgAllocation",
    "MmioWindow",
    "build_tables",
    "write_tables",
]
