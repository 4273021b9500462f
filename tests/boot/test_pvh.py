"""boot/pvh.py: the PHYS32_ENTRY note, loading PT_LOAD segments into RAM, struct hvm_start_info."""

from __future__ import annotations

import re

import pytest

from pcihole.boot.elf import ELFCLASS32, ELFCLASS64, PT_NOTE, ElfImage
from pcihole.boot.pvh import MemmapEntry, PvhError, load_elf, phys32_entry, pvh_entry, start_info
from tests.boot.elfimages import (
    DATA,
    LINKED_SOURCE,
    TEXT,
    Part,
    binutils_missing,
    build,
    link_x86_64,
    note,
    phys32_note,
)


def _raises(what: str):
    return pytest.raises(PvhError, match=re.escape(what))


@pytest.mark.parametrize("elf_class", [ELFCLASS32, ELFCLASS64], ids=["elf32", "elf64"])
@pytest.mark.parametrize("size", [4, 8])
def test_phys32_entry_note_of_4_and_8_bytes(elf_class, size):
    elf = ElfImage(build([TEXT, phys32_note(0x100004, size)], elf_class=elf_class).data)
    assert phys32_entry(elf) == pvh_entry(elf) == 0x100004


def test_phys32_entry_missing():
    others = note(b"Xen", 17, bytes(4)) + note(b"Linux", 18, bytes(4))  # other type; other owner
    for parts in ([TEXT], [TEXT, Part(PT_NOTE, 0, others)]):
        elf = ElfImage(build(parts).data, "bzImage")
        with _raises("bzImage: no XEN_ELFNOTE_PHYS32_ENTRY note, so this is not a PVH kernel"):
            phys32_entry(elf)
        assert pvh_entry(elf) is None


def test_phys32_entry_with_a_2_byte_descriptor():
    elf = ElfImage(build([TEXT, Part(PT_NOTE, 0, note(b"Xen", 18, b"\x00\x10"))]).data, "k")
    with _raises("k: XEN_ELFNOTE_PHYS32_ENTRY has 2 bytes, expected 4 or 8"):
        phys32_entry(elf)
    assert pvh_entry(elf) is None


class Ram:
    def __init__(self, size: int):
        self.size = size
        self.bytes = bytearray(b"\xa5" * size)  # not zero: the loader must zero the bss itself

    def write(self, addr: int, data: bytes) -> None:
        assert addr + len(data) <= self.size
        self.bytes[addr : addr + len(data)] = data


def test_load_elf_copies_segments_and_zero_fills_bss():
    ram = Ram(4 << 20)
    elf = ElfImage(build([TEXT, DATA, phys32_note(0x100002, 8)]).data)
    assert load_elf(elf, ram.write, ram.size) == 0x100002
    assert ram.bytes[0x100000:0x100010] == TEXT.data
    assert ram.bytes[0x101000:0x103000] == DATA.data + bytes(0x2000 - 4)
    assert ram.bytes[0x100010] == ram.bytes[0x103000] == 0xA5  # nothing written past a segment


def test_load_elf_rejects_a_segment_outside_ram():
    elf = ElfImage(build([TEXT, DATA, phys32_note(0x100000)]).data, "k")
    with _raises("k: segment [0x101000, 0x102fff] does not fit in 1 MiB of RAM"):
        load_elf(elf, Ram(0x102000).write, 0x102000)


@pytest.mark.parametrize("entry", [0x200000, 0x100010, 0x103000])
def test_load_elf_rejects_an_entry_outside_every_loadable_segment(entry):
    elf = ElfImage(build([TEXT, DATA, phys32_note(entry)]).data, "k")
    ram = Ram(4 << 20)
    with _raises(f"k: the PVH entry {entry:#x} is in no loadable segment"):
        load_elf(elf, ram.write, ram.size)


@pytest.mark.skipif(binutils_missing() is not None, reason=str(binutils_missing()))
def test_load_elf_of_an_elf64_linked_by_gnu_ld():
    elf = ElfImage(link_x86_64(LINKED_SOURCE), "linked.elf")
    ram = Ram(4 << 20)
    assert load_elf(elf, ram.write, ram.size) == elf.symbol("pvh_start").value == 0x100000
    assert ram.bytes[0x100000:0x100002] == b"\xfa\xf4"  # cli; hlt
    assert ram.bytes[0x101000:0x102000] == bytes(4096)  # .bss


def _u(b: bytes, off: int, size: int) -> int:
    return int.from_bytes(b[off : off + size], "little")


def test_start_info_layout_is_xens():
    memmap = [
        MemmapEntry(0, 0x9FC00, 1),
        MemmapEntry(0x100000, 0x7FF00000, 1),
        MemmapEntry(0x1_B000_0000, 0x1000_0000, 2),
    ]
    info, table = start_info(
        cmdline_paddr=0x1_0000_6000, rsdp_paddr=0x2_000F_0010, memmap_paddr=0x3_0000_7000, memmap=memmap
    )
    # xen/include/public/arch-x86/hvm/start_info.h, struct hvm_start_info
    assert len(info) == 56
    assert _u(info, 0, 4) == 0x336EC578  # magic
    assert _u(info, 4, 4) == 1  # version
    assert _u(info, 8, 4) == 0  # flags
    assert _u(info, 12, 4) == 0  # nr_modules
    assert _u(info, 16, 8) == 0  # modlist_paddr
    assert _u(info, 24, 8) == 0x1_0000_6000  # cmdline_paddr
    assert _u(info, 32, 8) == 0x2_000F_0010  # rsdp_paddr
    assert _u(info, 40, 8) == 0x3_0000_7000  # memmap_paddr
    assert _u(info, 48, 4) == 3  # memmap_entries
    assert _u(info, 52, 4) == 0  # reserved
    # struct hvm_memmap_table_entry: u64 addr, u64 size, u32 type, u32 reserved
    assert len(table) == 3 * 24
    for i, e in enumerate(memmap):
        entry = table[24 * i : 24 * (i + 1)]
        assert (_u(entry, 0, 8), _u(entry, 8, 8), _u(entry, 16, 4), _u(entry, 20, 4)) == (
            e.addr,
            e.size,
            e.type,
            0,
        )


def test_start_info_without_memmap():
    info, table = start_info(cmdline_paddr=0, rsdp_paddr=0, memmap_paddr=0, memmap=[])
    assert table == b""
    assert _u(info, 48, 4) == 0
