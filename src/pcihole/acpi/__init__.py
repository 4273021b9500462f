"""ACPI tables a machine's firmware would provide: RSDP, XSDT, MCFG (more later, see tables.py).

checksum.py    the byte-sum rule
sdt_header.py  the common 36-byte table header
rsdp.py        Root System Description Pointer (ACPI 2.0 form)
xsdt.py        Extended System Description Table
mcfg.py        PCI Express memory-mapped configuration (ECAM) allocations
tables.py      build_tables(segments, base_gpa) -> AcpiTables; write_tables(tables, out_dir)
"""

from .mcfg import EcamSegment, McfgAllocation
from .tables import AcpiTables, build_tables, write_tables

__all__ = ["AcpiTables", "EcamSegment", "McfgAllocation", "build_tables", "write_tables"]
