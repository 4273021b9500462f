"""MCFG: where each segment's ECAM is (PCI Firmware Specification 3.3 §4.1.2, Tables 4-2 and 4-3).

    header (36) | Reserved u64 | one 16-byte allocation per segment from offset 44:
        Base Address u64 (address of bus 0, even when Start Bus is not 0) | PCI Segment Group u16 |
        Start Bus u8 | End Bus u8 | Reserved u32

Linux's pci_parse_mcfg() (arch/x86/pci/mmconfig-shared.c) counts (length - 44) / 16 entries and drops
the whole table for one entry at or above 4 GiB (acpi_mcfg_check_entry(); topology.py keeps windows
below). The segment-0 entries' End Bus becomes pcibios_last_bus, which drives the peer-bus scan.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .sdt_header import build_sdt

MCFG_SIGNATURE = b"MCFG"
MCFG_REVISION = 1
MCFG_RESERVED = struct.Struct("<Q")
MCFG_ALLOCATION = struct.Struct("<QHBBI")  # 16 bytes
MCFG_ALLOCATIONS_OFFSET = 44
BUS_SHIFT = 20  # 1 MiB of ECAM per bus
MAX_BUS = 0xFF


class EcamSegment(Protocol):
    """What MCFG needs of a segment (pcihole.pci.topology.Segment has it)."""

    @property
    def id(self) -> int: ...
    @property
    def ecam_base(self) -> int: ...
    @property
    def start_bus(self) -> int: ...
    @property
    def end_bus(self) -> int: ...


@dataclass(frozen=True, slots=True)
class McfgAllocation:
    base_address: int  # of bus 0
    segment: int
    start_bus: int
    end_bus: int

    @classmethod
    def of(cls, segment: EcamSegment) -> McfgAllocation:
        return cls(segment.ecam_base, segment.id, segment.start_bus, segment.end_bus)


def decoded_window(segment: EcamSegment) -> tuple[int, int]:
    """(first byte, length) of the ECAM an allocation decodes: [Base + Start Bus MiB, + buses MiB),
    the range pci_mmconfig_alloc() gives cfg->res and is_mmconf_reserved() wants reserved."""
    if not 0 <= segment.start_bus <= segment.end_bus <= MAX_BUS:
        raise ValueError(
            f"segment {segment.id}: bus range {segment.start_bus}-{segment.end_bus} is not within 0-255"
        )
    return (
        segment.ecam_base + (segment.start_bus << BUS_SHIFT),
        (segment.end_bus - segment.start_bus + 1) << BUS_SHIFT,
    )


def build_mcfg(segments: Iterable[EcamSegment]) -> bytes:
    body = bytearray(MCFG_RESERVED.pack(0))
    for a in (McfgAllocation.of(s) for s in segments):
        body += MCFG_ALLOCATION.pack(a.base_address, a.segment, a.start_bus, a.end_bus, 0)
    return build_sdt(MCFG_SIGNATURE, MCFG_REVISION, bytes(body))
