"""The 36-byte header every System Description Table starts with (ACPI 6.5 §5.2.6, Table 5.4).

    0 Signature[4]  4 Length u32  8 Revision u8  9 Checksum u8  10 OEMID[6]  16 OEM Table ID[8]
    24 OEM Revision u32  28 Creator ID[4]  32 Creator Revision u32

ACPICA's struct acpi_table_header (include/acpi/actbl.h) has the same layout.
"""

from __future__ import annotations

import struct

from .checksum import with_checksum

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_HEADER_SIZE = SDT_HEADER.size  # 36
CHECKSUM_OFFSET = 9

OEM_ID = b"PCIHOL"  # 6 bytes
OEM_TABLE_ID_PREFIX = b"PHOL"  # + the table's signature, 8 bytes: "PHOLMCFG", as Firecracker's "FCVMMCFG"
OEM_REVISION = 1
CREATOR_ID = b"PHOL"
CREATOR_REVISION = 1


def build_sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (with length and checksum) followed by `body`."""
    if len(signature) != 4:
        raise ValueError(f"an ACPI signature has 4 bytes, not {signature!r}")
    header = SDT_HEADER.pack(
        signature,
        SDT_HEADER_SIZE + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID_PREFIX + signature,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    return with_checksum(header + body, CHECKSUM_OFFSET)
