"""The 32-bit MMIO window each host bridge offers for BARs (its producer DWordMemory in _CRS).

Linux turns a host bridge's producer memory descriptors into root bus windows (acpi_pci_root_create ->
pci_acpi_root_prepare_resources, IORESOURCE_WINDOW from acpi_decode_space in drivers/acpi/resource.c)
and assigns unassigned BARs from them (pci_assign_unassigned_root_bus_resources). Windows are not needed
to enumerate, only to give BARs addresses. A window that overlaps another host bridge's window or RAM
is dropped ("ignoring host bridge window ... (conflicts with ...)", pci_acpi_root_add_resources), so:

- the windows share an aperture, by default [3 GiB, 0xFEC00000): the traditional PC "PCI hole" below
  the IOAPIC (0xFEC00000), the local APIC (0xFEE00000) and KVM's TSS / identity map pages
  (0xFFFBC000-0xFFFBFFFF: the default KVM_SET_IDENTITY_MAP_ADDR page, Documentation/virt/kvm/api.rst,
  and the KVM_SET_TSS_ADDR pages VMMs put after it); QEMU microvm's MMIO32 window starts at
  0xC0000000 too. pcihole's RAM is one range from address 0, so the default is right for machines
  with at most 3 GiB of RAM (the default machine has 64 MiB); nothing here knows the RAM size, so a
  caller with more RAM passes an `aperture` that starts above it (machine/builder.py knows ram_end).
- every decoded ECAM window is cut out of it;
- each segment, in the order given, gets one naturally aligned power-of-two block, the largest size at
  which every segment gets one (at least 1 MiB, the granularity of a PCI-to-PCI bridge memory window,
  PCI-to-PCI Bridge Architecture 1.2 §3.2.5.8). One segment at 0xE0000000 gets 0xC0000000-0xDFFFFFFF.
- when not even 1 MiB is free for every segment, the segments that get none have no memory window:
  Linux still enumerates them but cannot place their BARs ("no space for").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pcihole.memory.address import align_up

from .mcfg import EcamSegment, decoded_window

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_APERTURE_BASE = 3 * GiB
DEFAULT_APERTURE_END = 0xFEC00000  # exclusive: the IOAPIC (madt.py) starts here
MIN_WINDOW = 1 * MiB
MAX_WINDOW = 2 * GiB  # a DWordMemory length is 32 bits; no 32-bit aperture holds more


@dataclass(frozen=True, slots=True)
class MmioWindow:
    base: int
    size: int

    @property
    def last(self) -> int:
        """Inclusive last byte."""
        return self.base + self.size - 1


def free_gaps(aperture: MmioWindow, segments: Iterable[EcamSegment]) -> list[MmioWindow]:
    """The parts of `aperture` outside every segment's decoded ECAM window, in address order."""
    gaps = [aperture]
    for segment in segments:
        first, length = decoded_window(segment)
        last = first + length - 1
        next_gaps = []
        for g in gaps:
            if last < g.base or first > g.last:
                next_gaps.append(g)
                continue
            if g.base < first:
                next_gaps.append(MmioWindow(g.base, first - g.base))
            if last < g.last:
                next_gaps.append(MmioWindow(last + 1, g.last - last))
        gaps = next_gaps
    return sorted(gaps, key=lambda g: g.base)


def _blocks(gaps: Sequence[MmioWindow], size: int) -> list[MmioWindow]:
    """Every naturally aligned block of `size` bytes inside the gaps, in address order."""
    out = []
    for g in gaps:
        at = align_up(g.base, size)
        while at + size - 1 <= g.last:
            out.append(MmioWindow(at, size))
            at += size
    return out


def allocate_windows(
    segments: Sequence[EcamSegment], aperture: MmioWindow | None = None
) -> list[MmioWindow | None]:
    """One window per segment (None where none is left), following the rules in the module docstring."""
    if aperture is None:
        aperture = MmioWindow(DEFAULT_APERTURE_BASE, DEFAULT_APERTURE_END - DEFAULT_APERTURE_BASE)
    if aperture.size <= 0 or aperture.base < 0 or aperture.last >= 1 << 32:
        raise ValueError(f"MMIO aperture [{aperture.base:#x}, {aperture.last:#x}] is not a range below 4 GiB")
    if not segments:
        return []
    gaps = free_gaps(aperture, segments)
    size = MAX_WINDOW
    while size >= MIN_WINDOW:
        blocks = _blocks(gaps, size)
        if len(blocks) >= len(segments):
            return list(blocks[: len(segments)])
        size //= 2
    smallest: list[MmioWindow | None] = list(_blocks(gaps, MIN_WINDOW))
    return smallest + [None] * (len(segments) - len(smallest))


# --- I/O and 64-bit memory windows ------------------------------------------------------------------
#
# So that Linux can assign every kind of BAR (pci_assign_unassigned_root_bus_resources) without
# "no space for" / "failed to assign" errors, each host bridge also produces:
# - an I/O window: the PC's PCI I/O space [0x1000, 0xFFFF] (below 0x1000 are the ISA ports: COM1,
#   the PIC, the PIT, ...; QEMU's q35 starts at 0x0d00) split evenly in 4 KiB units, the granularity
#   of a PCI-to-PCI bridge I/O window (PCI-to-PCI Bridge Architecture 1.2 §3.2.5.6). More than 15
#   segments: the rest get none. pcihole routes no port I/O to PCI devices: the window only lets
#   Linux give I/O BARs an address.
# - a 64-bit memory window for 64-bit prefetchable BARs, above every RAM pcihole gives a guest:
#   [256 GiB, 512 GiB) split into naturally aligned power-of-two blocks (QEMU puts its pci-hole64
#   above RAM too), within the model CPU's 40 physical address bits unless a segment needs more.

IO_WINDOWS_BASE = 0x1000
IO_WINDOWS_END = 0x10000  # exclusive
IO_WINDOW_GRANULE = 0x1000
MEM64_APERTURE_BASE = 256 * GiB
MEM64_APERTURE_SIZE = 256 * GiB
#: Where 64-bit windows must end: 52 bits, the most physical address bits an x86 CPU can have (SDM
#: Vol. 3A 4.1.4, MAXPHYADDR "at most 52"). Whether a machine's vCPU reaches them is the machine's
#: check (machine/address_width.py): the tables alone have no CPU.
MEM64_LIMIT = 1 << 52


def allocate_io_windows(count: int) -> list[MmioWindow | None]:
    """[0x1000, 0xFFFF] split evenly in 4 KiB units among `count` host bridges."""
    if count <= 0:
        return []
    units = (IO_WINDOWS_END - IO_WINDOWS_BASE) // IO_WINDOW_GRANULE
    per = units // count
    if per == 0:
        return [
            MmioWindow(IO_WINDOWS_BASE + i * IO_WINDOW_GRANULE, IO_WINDOW_GRANULE) for i in range(units)
        ] + [None] * (count - units)
    size = per * IO_WINDOW_GRANULE
    return [MmioWindow(IO_WINDOWS_BASE + i * size, size) for i in range(count)]


def allocate_mem64_windows(count: int, needs: Sequence[int] = ()) -> list[MmioWindow | None]:
    """[256 GiB, 512 GiB) in `count` equal, naturally aligned power-of-two blocks of at least 1 MiB.

    `needs[i]`: bytes segment i's root buses need above 4 GiB (pcihole.pci.bridge_windows). A
    segment that needs more than its share gets a naturally aligned block of the next power of two,
    placed with the others from 256 GiB up in decreasing size (a GPU server's 128 GiB BARs need
    terabytes: Linux clips a window only at the CPU's physical address width, x86_phys_bits)."""
    if count <= 0:
        return []
    size = MEM64_APERTURE_SIZE
    while size * count > MEM64_APERTURE_SIZE and size > MIN_WINDOW:
        size //= 2
    sizes = [max(size, power_of_two_at_least(n)) for n in [*needs, *[0] * (count - len(needs))][:count]]
    if all(s == size for s in sizes):
        fits = min(count, MEM64_APERTURE_SIZE // size)
        return [MmioWindow(MEM64_APERTURE_BASE + i * size, size) for i in range(fits)] + [None] * (
            count - fits
        )
    out: list[MmioWindow | None] = [None] * count
    cursor = MEM64_APERTURE_BASE
    for i in sorted(range(count), key=lambda i: -sizes[i]):
        cursor = align_up(cursor, sizes[i])
        out[i] = MmioWindow(cursor, sizes[i])
        cursor += sizes[i]
    if cursor > MEM64_LIMIT:
        raise ValueError(
            f"the 64-bit BAR windows would end at {cursor:#x}, beyond the {MEM64_LIMIT.bit_length() - 1} "
            "physical address bits an x86 CPU can have"
        )
    return out


def power_of_two_at_least(n: int, minimum: int = MIN_WINDOW) -> int:
    """The smallest power of two >= n and >= minimum."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


# --- expander buses' windows, carved from their segment's ------------------------------------------
#
# QEMU's build_dsdt() gives each pxb root bus, in its _CRS, the ranges its devices use (build_crs():
# the BARs and bridge windows firmware assigned below it, collected in crs_range_set), and PCI0 the
# rest of the PCI hole (crs_replace_with_free_ranges()), so no range belongs to two root bridges
# (Linux would drop the second: "host bridge window ... conflicts"). pcihole has no firmware to
# assign BARs first, so each expander gets a block as large as what is below it needs
# (pcihole.pci.bridge_windows), cut from the top of its segment's window, and the segment's main host
# bridge keeps the rest.


@dataclass(frozen=True, slots=True)
class CarvedWindow:
    """A window split between expanders (`blocks`, in the order asked) and the main root bus (`free`)."""

    blocks: tuple[MmioWindow | None, ...]
    free: tuple[MmioWindow, ...]


def carve(window: MmioWindow | None, sizes: Sequence[int], align: int | None, what: str) -> CarvedWindow:
    """Blocks of `sizes` (0: none) from the top of `window`, largest first, each aligned to `align`
    (None: to its own size, for power-of-two memory blocks); ValueError when they do not fit."""
    if window is None:
        if any(sizes):
            raise ValueError(f"expander buses need {what} space, but their segment has no {what} window")
        return CarvedWindow(tuple(None for _ in sizes), ())
    blocks: list[MmioWindow | None] = [None] * len(sizes)
    free: list[MmioWindow] = []
    top = window.base + window.size
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[i]
        if not size:
            continue
        start = (top - size) // (align or size) * (align or size)
        if start < window.base:
            raise ValueError(
                f"expander buses need {sum(sizes):#x} bytes of {what} space; their segment's window "
                f"[{window.base:#x}, {window.last:#x}] has {window.size:#x}"
            )
        if start + size < top:
            free.append(MmioWindow(start + size, top - start - size))
        blocks[i] = MmioWindow(start, size)
        top = start
    if top > window.base:
        free.append(MmioWindow(window.base, top - window.base))
    return CarvedWindow(tuple(blocks), tuple(sorted(free, key=lambda w: w.base)))
