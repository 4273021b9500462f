"""Where pcihole puts things in guest-physical memory, in one place.

Low memory follows Firecracker's x86_64 layout.rs where it can, so a reader who knows one knows the
other. The PVH kernel is loaded where its ELF says (at or above 1 MiB); ECAM windows come from the
machine file (below 4 GiB) and must not overlap RAM.
"""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: struct hvm_modlist_entry (32 bytes): the initrd, when there is one.
MODLIST_GPA = 0x6000
MODLIST_MAX = 0x1000
#: struct hvm_start_info (56 bytes), alone in its page.
START_INFO_GPA = 0x7000
START_INFO_MAX = 0x1000
#: Initial stack pointer handed to the guest (PVH does not define one; the scan guest sets its own),
#: at the top of its own page.
BOOT_STACK_GPA = 0x8FF0
BOOT_STACK_BOTTOM = 0x8000
#: The memory map table (struct hvm_memmap_table_entry, 24 bytes each), from the page after the
#: boot stack up to the command line: 3,925 entries, more than the ~1,500 ECAM segments whose ACPI
#: tables fit in ACPI_MAX (one entry each, plus four).
MEMMAP_GPA = 0x9000
MEMMAP_ENTRY_SIZE = 24
#: The kernel command line (Firecracker's CMDLINE_START), NUL-terminated.
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
MEMMAP_MAX_ENTRIES = (CMDLINE_GPA - MEMMAP_GPA) // MEMMAP_ENTRY_SIZE
#: End of the usable RAM below the EBDA, as a PC reports it in E820 (Firecracker: EBDA_START).
LOW_RAM_END = 0x9FC00
#: ACPI tables go in the BIOS area, where a guest without rsdp_paddr finds the RSDP by scanning
#: 0xE0000-0xFFFFF on 16-byte boundaries (ACPI 6.5 §5.2.5.1; acpica tbxfroot.c).
ACPI_GPA = 0xE0000
ACPI_MAX = 0x100000 - ACPI_GPA
#: Where a PVH kernel may start.
KERNEL_MIN_GPA = 1 * MiB

#: What pcihole writes below 1 MiB, [first, last] and what it is: a kernel segment over any of it is
#: refused (it would overwrite it, or be overwritten), naming both.
LOW_MEMORY = (
    (MODLIST_GPA, MODLIST_GPA + MODLIST_MAX - 1, "the PVH module list"),
    (START_INFO_GPA, START_INFO_GPA + START_INFO_MAX - 1, "the PVH start info"),
    (BOOT_STACK_BOTTOM, BOOT_STACK_GPA + 0xF, "the boot stack"),
    (MEMMAP_GPA, CMDLINE_GPA - 1, "the PVH memory map"),
    (CMDLINE_GPA, CMDLINE_GPA + CMDLINE_MAX - 1, "the kernel command line"),
    (LOW_RAM_END, ACPI_GPA - 1, "the EBDA and VGA hole (E820 reserved)"),
    (ACPI_GPA, ACPI_GPA + ACPI_MAX - 1, "the ACPI tables"),
)
#: RAM needs to hold low memory and at least a small kernel.
MIN_RAM = 2 * MiB
#: An initrd starts at the first 2 MiB boundary after the kernel's last segment (bss included), as
#: Firecracker aligns it, far enough from the kernel's brk and early page tables.
INITRD_ALIGN = 2 * MiB
