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


def build_mcfg(segments: Iterable[EcamSegment]) -> bytes:
    body = bytearray(MCFG_RESERVED.pack(0))
    for a in (McfgAllocation.of(s) for s in segments):
        body += MCFG_ALLOCATION.pack(a.base_address, a.segment, a.start_bus, a.end_bus, 0)
    return build_sdt(MCFG_SIGNATURE, MCFG_REVISION, bytes(body))
