"""The Extended System Description Table (ACPI 6.5 §5.2.8): a header and 64-bit table addresses."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .sdt_header import SDT_HEADER_SIZE, build_sdt

XSDT_SIGNATURE = b"XSDT"
XSDT_REVISION = 1
XSDT_ENTRY_SIZE = 8


def xsdt_size(entries: int) -> int:
    return SDT_HEADER_SIZE + XSDT_ENTRY_SIZE * entries


def build_xsdt(table_gpas: Iterable[int]) -> bytes:
    gpas = list(table_gpas)
    return build_sdt(XSDT_SIGNATURE, XSDT_REVISION, struct.pack(f"<{len(gpas)}Q", *gpas))
