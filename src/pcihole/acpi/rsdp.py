"""The Root System Description Pointer, ACPI 2.0+ form (ACPI 6.5 §5.2.5.3, Table 5.3): 36 bytes.

    0 "RSD PTR "  8 Checksum (bytes 0-19)  9 OEMID[6]  15 Revision = 2  16 RsdtAddress u32
    20 Length = 36  24 XsdtAddress u64  32 Extended Checksum (all 36 bytes)  33 Reserved[3]

Linux uses the XSDT when Revision > 1 and XsdtAddress != 0 (acpi_tb_parse_root_table(), see
docs/linux-ecam.md §3), so RsdtAddress is 0: there is no RSDT (Firecracker does the same).
The legacy scan of 0xE0000-0xFFFFF looks at 16-byte boundaries only, hence RSDP_ALIGNMENT.
"""

from __future__ import annotations

import struct

from .checksum import with_checksum
from .sdt_header import OEM_ID

RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIZE = RSDP.size  # 36
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0 and later
RSDP_V1_SIZE = 20  # the part the first checksum covers
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXTENDED_CHECKSUM_OFFSET = 32
RSDP_ALIGNMENT = 16


def build_rsdp(xsdt_gpa: int) -> bytes:
    raw = RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP_SIZE, xsdt_gpa, 0, b"\0\0\0")
    raw = with_checksum(raw, RSDP_CHECKSUM_OFFSET, RSDP_V1_SIZE)
    return with_checksum(raw, RSDP_EXTENDED_CHECKSUM_OFFSET)
