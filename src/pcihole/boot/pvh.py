"""The PVH boot protocol: what QEMU's `-kernel` does for an ELF with a Xen PHYS32_ENTRY note.

Xen's xen/include/public/elfnote.h (XEN_ELFNOTE_PHYS32_ENTRY = 18) and
xen/include/public/arch-x86/hvm/start_info.h (struct hvm_start_info, struct hvm_memmap_table_entry).
The kernel is entered in 32-bit flat protected mode with paging off and EBX = &hvm_start_info
(hv/x86_cpu_state.enter_protected_mode_flat).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pcihole.boot.elf import ElfError, ElfImage

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1
# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr (u64), cmdline_paddr (u64),
# rsdp_paddr (u64), memmap_paddr (u64), memmap_entries (u32), reserved (u32): 56 bytes.
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_memmap_table_entry: addr (u64), size (u64), type (u32), reserved (u32).
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")
# struct hvm_modlist_entry: paddr (u64), size (u64), cmdline_paddr (u64), reserved (u64). Linux's PVH
# entry takes the first module as its initrd (arch/x86/platform/pvh/enlighten.c pvh_bootparams:
# ramdisk_image = modlist[0].paddr, ramdisk_size = modlist[0].size).
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
E820_RAM, E820_RESERVED, E820_ACPI = 1, 2, 3


class PvhError(ValueError):
    """The image cannot be booted with PVH; says why."""


@dataclass(frozen=True)
class MemmapEntry:
    addr: int
    size: int
    type: int


def phys32_entry(image: ElfImage) -> int:
    """The XEN_ELFNOTE_PHYS32_ENTRY address (a 4- or 8-byte descriptor); PvhError if there is none."""
    for note in image.notes():
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise PvhError(
                    f"{image.name}: XEN_ELFNOTE_PHYS32_ENTRY has {len(note.desc)} bytes, expected 4 or 8"
                )
            return int.from_bytes(note.desc, "little")
    raise PvhError(
        f"{image.name}: no XEN_ELFNOTE_PHYS32_ENTRY note, so this is not a PVH kernel "
        "(build it with CONFIG_PVH, or add the note)"
    )


def pvh_entry(image: ElfImage) -> int | None:
    """``phys32_entry``, or None where the image has no usable PHYS32_ENTRY note."""
    try:
        return phys32_entry(image)
    except PvhError:
        return None


def load_elf(
    image: ElfImage,
    write: Callable[[int, bytes], None],
    ram_size: int,
    reserved: Sequence[tuple[int, int, str]] = (),
) -> int:
    """Copy every PT_LOAD segment to its physical address (zero-filling the bss); returns the PVH entry.

    `reserved` is what the VMM itself puts in guest memory, (first, last, what): a segment over any
    of it is refused before anything is copied (it would overwrite the ACPI tables or the start
    info, or they would overwrite it)."""
    entry = phys32_entry(image)
    segments = image.load_segments()
    for paddr, _data, memsz in segments:
        last = paddr + memsz - 1
        if paddr + memsz > ram_size:
            raise PvhError(
                f"{image.name}: segment [{paddr:#x}, {last:#x}] does not fit in {ram_size >> 20} MiB of RAM"
            )
        for first, end, what in reserved:
            if paddr <= end and first <= last:
                raise PvhError(
                    f"{image.name}: segment [{paddr:#x}, {last:#x}] overlaps {what} [{first:#x}, {end:#x}] "
                    "(a PVH kernel loads at or above 1 MiB)"
                )
    for paddr, data, memsz in segments:
        write(paddr, data + bytes(memsz - len(data)))
    if image.segment_at(entry) is None:
        raise PvhError(f"{image.name}: the PVH entry {entry:#x} is in no loadable segment")
    return entry


def kernel_end(image: ElfImage) -> int:
    """The first byte after every PT_LOAD segment in memory (bss included): where free RAM starts."""
    return max((paddr + memsz for paddr, _data, memsz in image.load_segments()), default=0)


def modlist_entry(paddr: int, size: int, cmdline_paddr: int = 0) -> bytes:
    return HVM_MODLIST_ENTRY.pack(paddr, size, cmdline_paddr, 0)


def start_info(
    *,
    cmdline_paddr: int,
    rsdp_paddr: int,
    memmap_paddr: int,
    memmap: Sequence[MemmapEntry],
    modlist_paddr: int = 0,
    nr_modules: int = 0,
) -> tuple[bytes, bytes]:
    """The bytes of struct hvm_start_info and of its memory map table."""
    info = HVM_START_INFO.pack(
        HVM_START_MAGIC_VALUE,
        HVM_START_INFO_VERSION,
        0,
        nr_modules,
        modlist_paddr,
        cmdline_paddr,
        rsdp_paddr,
        memmap_paddr,
        len(memmap),
        0,
    )
    table = b"".join(HVM_MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0) for e in memmap)
    return info, table


__all__ = [
    "ElfError",
    "MemmapEntry",
    "PvhError",
    "kernel_end",
    "load_elf",
    "modlist_entry",
    "phys32_entry",
    "pvh_entry",
    "start_info",
]
