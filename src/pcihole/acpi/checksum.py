"""The ACPI checksum: all bytes of a structure, checksum byte included, sum to zero modulo 256.

ACPI 6.5 §5.2.5.3 (RSDP: "the sum of all bytes ... including the checksum field, must equal zero")
and §5.2.6 (every System Description Table header); ACPICA checks it in acpi_ut_checksum().
"""

from __future__ import annotations


def checksum_byte(data: bytes) -> int:
    """The value that, stored in the checksum byte (currently 0 in `data`), makes the sum zero."""
    return -sum(data) & 0xFF


def is_valid(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


def with_checksum(data: bytes | bytearray, offset: int, length: int | None = None) -> bytes:
    """`data` with the checksum byte at `offset` set over `data[:length]` (all of it by default)."""
    out = bytearray(data)
    end = len(out) if length is None else length
    out[offset] = 0
    out[offset] = checksum_byte(bytes(out[:end]))
    return bytes(out)
