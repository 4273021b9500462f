"""Where pcihole puts things in guest-physical memory, in one place.

Low memory follows Firecracker's x86_64 layout.rs where it can, so a reader who knows one knows the
other. The PVH kernel is loaded where its ELF says (at or above 1 MiB); ECAM windows come from the
machine file (below 4 GiB) and must not overlap RAM.
"""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: struct hvm_start_info (56 bytes), then its memory map table (24 bytes per entry).
START_INFO_GPA = 0x7000
MEMMAP_GPA = START_INFO_GPA + 0x40
MEMMAP_MAX_ENTRIES = (0x1000 - 0x40) // 24
#: Initial stack pointer handed to the guest (PVH does not define one; the scan guest sets its own).
BOOT_STACK_GPA = 0x8FF0
#: The kernel command line (Firecracker's CMDLINE_START), NUL-terminated.
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
#: End of the usable RAM below the EBDA, as a PC reports it in E820 (Firecracker: EBDA_START).
LOW_RAM_END = 0x9FC00
#: ACPI tables go in the BIOS area, where a guest without rsdp_paddr finds the RSDP by scanning
#: 0xE0000-0xFFFFF on 16-byte boundaries (ACPI 6.5 §5.2.5.1; acpica tbxfroot.c).
ACPI_GPA = 0xE0000
ACPI_MAX = 0x100000 - ACPI_GPA
#: Where a PVH kernel may start.
KERNEL_MIN_GPA = 1 * MiB
#: RAM needs to hold low memory and at least a small kernel.
MIN_RAM = 2 * MiB
