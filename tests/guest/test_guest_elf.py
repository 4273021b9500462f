"""Structure of the committed image: a PVH ELF loadable at 1 MiB with its report symbol."""

from __future__ import annotations

import struct

import pytest

from pcihole.boot.elf import EM_386, PT_LOAD, ElfError, ElfImage
from pcihole.boot.pvh import pvh_entry
from pcihole.guest import REPORT_SYMBOL, image_bytes
from pcihole.guest.report import HEADER, REGION


@pytest.fixture(scope="module")
def elf() -> ElfImage:
    return ElfImage(image_bytes())


def test_is_i386_executable(elf):
    assert elf.machine == EM_386
    assert elf.type == 2  # ET_EXEC


def test_phys32_entry_note_points_into_executable_load_segment(elf):
    entry = pvh_entry(elf)
    assert entry is not None, "no XEN_ELFNOTE_PHYS32_ENTRY note"
    seg = elf.segment_at(entry)
    assert seg is not None and seg.type == PT_LOAD
    assert seg.flags & 1, "entry segment not executable"
    assert entry < seg.paddr + seg.filesz  # code, not bss
    assert entry == elf.symbol("pvh_start").value
    # the entry starts with cli (0xfa)
    assert elf.data[seg.offset + entry - seg.paddr] == 0xFA


def test_loads_at_1mib_below_2mib(elf):
    loads = [s for s in elf.segments if s.type == PT_LOAD]
    assert loads and min(s.paddr for s in loads) == 0x100000
    assert max(s.paddr + s.memsz for s in loads) < 0x200000
    for s in loads:
        assert s.vaddr == s.paddr
        assert not (s.flags & 1 and s.flags & 2), "no writable+executable segment"


def test_report_symbol_in_writable_segment_with_expected_size(elf):
    sym = elf.symbol(REPORT_SYMBOL)
    seg = elf.segment_at(sym.value)
    assert seg is not None and seg.flags & 2
    assert sym.value + sym.size <= seg.paddr + seg.memsz
    # The header and room for 4096 regions (every 1 MiB window below 4 GiB); the device list is apart.
    assert sym.size == HEADER.size + 4096 * REGION.size


def test_stack_symbols_kept(elf):
    syms = elf.symbols()
    assert syms["pcihole_stack_top"].value - syms["pcihole_stack"].value >= 4096
    assert "pcihole_main" in syms


def test_notes_parsing_rejects_garbage():
    with pytest.raises(ElfError):
        ElfImage(b"\x7fELF" + bytes(10))
    with pytest.raises(ElfError):
        ElfImage(b"MZ" + bytes(100))


def test_note_with_8_byte_descriptor_is_understood():
    # A minimal ELF32 with one PT_NOTE: Xen / 18 / 8-byte desc (as 64-bit Linux kernels write it).
    note = struct.pack("<III4sQ", 4, 8, 18, b"Xen\0", 0x1234567)
    ehdr = (
        b"\x7fELF"
        + bytes([1, 1, 1])
        + bytes(9)
        + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    )
    phdr = struct.pack("<IIIIIIII", 4, 84, 0, 0, len(note), len(note), 4, 4)
    e = ElfImage(ehdr + phdr + note)
    assert pvh_entry(e) == 0x1234567
