"""The set of ACPI tables a machine gets, laid out as one blob at a guest-physical base address.

Layout (each table 16-byte aligned; pointers inside are absolute guest-physical addresses):

    base_gpa + 0x00  RSDP (36 bytes), 16-byte aligned so the legacy 0xE0000-0xFFFFF scan finds it
    next             XSDT: FACP, APIC, MCFG (the FADT first, as firmware conventionally lists it)
    next             FACP (FADT), pointing at the DSDT
    next             DSDT: \\_SB.PCI<n> host bridges, \\_SB.MBRD reserving the ECAM windows, \\_S5
    next             APIC (MADT): one local APIC per vCPU, one I/O APIC
    next             MCFG, one allocation per segment

That is what docs/linux-ecam.md §2-3 says Linux reads: with no conf1, Linux accepts the MCFG only in
pci_mmcfg_late_init() and only because MBRD's _CRS covers every ECAM window, and scans each root bus
through the DSDT's PNP0A08/PNP0A03 bridge (acpi_pci_root_add). The embedded scan guest reads only the
MCFG. Four segments take about 1.1 KiB, far below layout.ACPI_MAX (128 KiB).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from pcihole.memory.address import align_up
from pcihole.pci.bridge_windows import WindowNeed

from .dsdt import DSDT_SIGNATURE, build_dsdt
from .expander_bridge import ExpanderBus
from .fadt import ACPI_POWER_PORT, FADT_LENGTH, FADT_SIGNATURE, build_fadt
from .madt import MADT_SIGNATURE, build_madt
from .mcfg import MCFG_SIGNATURE, EcamSegment, build_mcfg, decoded_window
from .pci_windows import MmioWindow, allocate_windows
from .rsdp import RSDP_ALIGNMENT, RSDP_SIZE, build_rsdp
from .window_plan import PlacedWindow, plan_windows
from .xsdt import XSDT_SIGNATURE, build_xsdt, xsdt_size

TABLE_ALIGNMENT = 16
RSDP_NAME = "RSDP"


@dataclass(frozen=True)
class AcpiTables:
    """Built tables: `blob` goes into guest RAM at `base_gpa`; `tables` maps signature -> bytes."""

    base_gpa: int
    blob: bytes
    tables: dict[str, bytes]
    addresses: dict[str, int]  # signature -> guest-physical address
    pci_windows: tuple[MmioWindow | None, ...] = ()  # each segment's BAR window, as in the DSDT
    #: every guest-physical range the tables hand out: each segment's ECAM window (MCFG) and each
    #: root bridge's 32-bit and 64-bit windows (DSDT), in that order
    placed_windows: tuple[PlacedWindow, ...] = ()

    @property
    def rsdp_gpa(self) -> int:
        """Where the RSDP is: hvm_start_info.rsdp_paddr / boot_params.acpi_rsdp_addr."""
        return self.addresses[RSDP_NAME]


def build_tables(
    segments: Iterable[EcamSegment],
    base_gpa: int,
    *,
    cpus: int = 1,
    mmio_aperture: MmioWindow | None = None,
    expanders: Iterable[ExpanderBus] = (),
    power_port: int | None = ACPI_POWER_PORT,
    serial_ports: Iterable[tuple[int, int]] = (),
    needs: Sequence[WindowNeed] = (),
    native_hotplug: Sequence[bool] = (),
) -> AcpiTables:
    """RSDP, XSDT, FADT, DSDT, MADT and MCFG for these segments and `cpus` vCPUs, placed at base_gpa
    (16-byte aligned). The host bridges' BAR windows are carved out of `mmio_aperture` (default
    [0xC0000000, 0xFEC00000), see pci_windows.py). Each expander bus gets its own PNP0A08, each
    (base port, GSI) of `serial_ports` a PNP0501 16550. needs[i] and native_hotplug[i]: what
    segment i's main root bus needs and whether it has hot-pluggable slots (dsdt.build_dsdt())."""
    if base_gpa < 0 or base_gpa % RSDP_ALIGNMENT:
        raise ValueError(f"ACPI base {base_gpa:#x} must be a {RSDP_ALIGNMENT}-byte aligned address")
    segments = list(segments)
    expanders = tuple(expanders)
    windows = allocate_windows(segments, mmio_aperture)
    plan = plan_windows(segments, windows, expanders, needs)
    dsdt = build_dsdt(segments, windows, expanders, tuple(serial_ports), needs, native_hotplug, plan=plan)
    madt = build_madt(cpus)
    mcfg = build_mcfg(segments)
    xsdt_entries = 3  # FACP, APIC, MCFG; the DSDT is reached through the FADT only
    xsdt_gpa = base_gpa + align_up(RSDP_SIZE, TABLE_ALIGNMENT)
    fadt_gpa = xsdt_gpa + align_up(xsdt_size(xsdt_entries), TABLE_ALIGNMENT)
    dsdt_gpa = fadt_gpa + align_up(FADT_LENGTH, TABLE_ALIGNMENT)
    madt_gpa = dsdt_gpa + align_up(len(dsdt), TABLE_ALIGNMENT)
    mcfg_gpa = madt_gpa + align_up(len(madt), TABLE_ALIGNMENT)
    fadt = build_fadt(dsdt_gpa, power_port)
    xsdt = build_xsdt([fadt_gpa, madt_gpa, mcfg_gpa])
    rsdp = build_rsdp(xsdt_gpa)
    placed = {
        RSDP_NAME: (base_gpa, rsdp),
        XSDT_SIGNATURE.decode(): (xsdt_gpa, xsdt),
        FADT_SIGNATURE.decode(): (fadt_gpa, fadt),
        DSDT_SIGNATURE.decode(): (dsdt_gpa, dsdt),
        MADT_SIGNATURE.decode(): (madt_gpa, madt),
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
        pci_windows=tuple(windows),
        placed_windows=(
            *(
                PlacedWindow(f"segment {s.id}'s ECAM window", MmioWindow(*decoded_window(s)))
                for s in segments
            ),
            *plan.memory_windows(segments, expanders),
        ),
    )


def write_tables(tables: AcpiTables, out_dir: str | PathLike[str]) -> list[Path]:
    """Write each table as <SIGNATURE>.dat (RSDP.dat, XSDT.dat, FACP.dat, DSDT.dat, APIC.dat, MCFG.dat),
    the names and raw binaries acpixtract produces and `iasl -d` disassembles; returns the paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in tables.tables.items():
        path = directory / f"{name}.dat"
        path.write_bytes(data)
        written.append(path)
    return written
