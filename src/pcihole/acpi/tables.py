"""The set of ACPI tables a machine gets, laid out as one blob at a guest-physical base address.

Layout (each table 16-byte aligned; pointers inside are absolute guest-physical addresses):

    base_gpa + 0x00  RSDP (36 bytes), 16-byte aligned so the legacy 0xE0000-0xFFFFF scan finds it
    next             XSDT, one entry per table below
    next             MCFG, one allocation per segment

Not there yet: FADT, DSDT and MADT. Linux needs a DSDT with a PNP0A08/PNP0A03 host bridge and a
PNP0C02 device whose _CRS covers every ECAM window before it accepts the MCFG without conf1
(research/linux-ecam-boot.md §1.2-1.3); the embedded guest reads the MCFG directly and needs none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from .mcfg import MCFG_SIGNATURE, EcamSegment, build_mcfg
from .rsdp import RSDP_ALIGNMENT, RSDP_SIZE, build_rsdp
from .xsdt import XSDT_SIGNATURE, build_xsdt, xsdt_size

TABLE_ALIGNMENT = 16
RSDP_NAME = "RSDP"


def _align(value: int, alignment: int = TABLE_ALIGNMENT) -> int:
    return (value + alignment - 1) & -alignment


@dataclass(frozen=True)
class AcpiTables:
    """Built tables: `blob` goes into guest RAM at `base_gpa`; `tables` maps signature -> bytes."""

    base_gpa: int
    blob: bytes
    tables: dict[str, bytes]
    addresses: dict[str, int]  # signature -> guest-physical address

    @property
    def rsdp_gpa(self) -> int:
        """Where the RSDP is: hvm_start_info.rsdp_paddr / boot_params.acpi_rsdp_addr."""
        return self.addresses[RSDP_NAME]


def build_tables(segments: Iterable[EcamSegment], base_gpa: int) -> AcpiTables:
    """RSDP, XSDT and MCFG for these segments, placed at base_gpa (16-byte aligned)."""
    if base_gpa < 0 or base_gpa % RSDP_ALIGNMENT:
        raise ValueError(f"ACPI base {base_gpa:#x} must be a {RSDP_ALIGNMENT}-byte aligned address")
    mcfg = build_mcfg(list(segments))
    xsdt_gpa = base_gpa + _align(RSDP_SIZE)
    mcfg_gpa = xsdt_gpa + _align(xsdt_size(1))
    xsdt = build_xsdt([mcfg_gpa])
    rsdp = build_rsdp(xsdt_gpa)
    placed = {
        RSDP_NAME: (base_gpa, rsdp),
        XSDT_SIGNATURE.decode(): (xsdt_gpa, xsdt),
        MCFG_SIGNATURE.decode(): (mcfg_gpa, mcfg),
    }
    end = max(gpa + len(data) for gpa, data in placed.values())
    if end > 1 << 64:
        raise ValueError(f"ACPI tables at {base_gpa:#x} would end beyond the 64-bit address space")
    blob = bytearray(end - base_gpa)
    for gpa, data in placed.values():
        blob[gpa - base_gpa : gpa - base_gpa + len(data)] = data
    return AcpiTables(
        base_gpa=base_gpa,
        blob=bytes(blob),
        tables={name: data for name, (_, data) in placed.items()},
        addresses={name: gpa for name, (gpa, _) in placed.items()},
    )


def write_tables(tables: AcpiTables, out_dir: str | PathLike[str]) -> list[Path]:
    """Write each table as <SIGNATURE>.dat (RSDP.dat, XSDT.dat, MCFG.dat), the raw binaries acpixtract
    produces and `iasl -d` disassembles; returns the paths written."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in tables.tables.items():
        path = directory / f"{name}.dat"
        path.write_bytes(data)
        written.append(path)
    return written
