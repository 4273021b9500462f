"""boot/elf.py: ELF32 and ELF64 headers, segments, notes and symbols; bad files name what and where."""

from __future__ import annotations

import re
import struct

import pytest

from pcihole.boot.elf import (
    ELFCLASS32,
    ELFCLASS64,
    EM_386,
    EM_X86_64,
    ET_EXEC,
    PF_R,
    PF_W,
    PF_X,
    PT_LOAD,
    PT_NOTE,
    ElfError,
    ElfImage,
    Note,
    Symbol,
)
from tests.boot.elfimages import (
    DATA,
    LINKED_SOURCE,
    TEXT,
    Part,
    Sym,
    binutils_missing,
    build,
    link_x86_64,
    note,
    phys32_note,
)

BOTH = pytest.mark.parametrize("elf_class", [ELFCLASS32, ELFCLASS64], ids=["elf32", "elf64"])


def _raises(what: str):
    return pytest.raises(ElfError, match=re.escape(what))


@BOTH
def test_header_and_program_headers(elf_class):
    built = build([TEXT, DATA, phys32_note(0x100000)], elf_class=elf_class, entry=0x100000)
    elf = ElfImage(built.data, "k.elf")
    assert (elf.elf_class, elf.type, elf.entry) == (elf_class, ET_EXEC, 0x100000)
    assert elf.machine == (EM_386 if elf_class == ELFCLASS32 else EM_X86_64)
    text, data, notes = elf.segments
    assert (text.type, text.offset, text.paddr, text.vaddr) == (PT_LOAD, built.offsets[0], 0x100000, 0x100000)
    assert (text.filesz, text.memsz, text.flags, text.align) == (16, 16, PF_R | PF_X, 0x1000)
    assert (data.filesz, data.memsz, data.flags) == (4, 0x2000, PF_R | PF_W)
    assert (notes.type, notes.offset, notes.align) == (PT_NOTE, built.offsets[2], 4)
    assert elf.loadable() == [text, data]


@BOTH
def test_load_segments_and_segment_at(elf_class):
    empty = Part(PT_LOAD, 0x300000)  # p_memsz 0: nothing to load
    elf = ElfImage(build([TEXT, empty, DATA, phys32_note(0x100000)], elf_class=elf_class).data)
    assert elf.load_segments() == [(0x100000, TEXT.data, 16), (0x101000, DATA.data, 0x2000)]
    assert elf.segment_at(0x100000).paddr == 0x100000
    assert elf.segment_at(0x100010) is None  # just past .text
    assert elf.segment_at(0x102FFF).paddr == 0x101000  # bss: past p_filesz, inside p_memsz
    assert elf.segment_at(0x103000) is None
    assert elf.segment_at(0x300000) is None
    assert elf.segment_at(0) is None  # the PT_NOTE's p_paddr: not a loadable segment


@pytest.mark.parametrize("size", [4, 8])
def test_elf64_xen_phys32_entry_note_of_4_and_8_bytes(size):
    # A note with a 6-byte name and a 3-byte descriptor first: both padded to 4 before the next note.
    linux = note(b"Linux", 6, b"\x01\x02\x03")
    xen = phys32_note(0x1000A0, size).data
    elf = ElfImage(build([TEXT, Part(PT_NOTE, 0, linux + xen)]).data)
    assert elf.notes() == [
        Note(b"Linux", 6, b"\x01\x02\x03"),
        Note(b"Xen", 18, (0x1000A0).to_bytes(size, "little")),
    ]


def test_elf64_symbols():
    syms = [
        Sym("startup_64", 0xFFFF_FFFF_8100_0000, 0x40),
        Sym("pvh_start", 0x100000, 0x10, 0x10, 1),  # STB_GLOBAL, STT_NOTYPE
        Sym("report", 0x101000, 0x1800, 0x11, 2),  # STB_GLOBAL, STT_OBJECT
        Sym("local_twin", 0x101000, 4, 0x01, 2),
    ]
    elf = ElfImage(build([TEXT, DATA], symbols=syms).data, "vmlinux")
    assert elf.symbols() == {s.name: Symbol(s.name, s.value, s.size, s.info, s.shndx) for s in syms}
    assert elf.symbol("startup_64").value == 0xFFFF_FFFF_8100_0000
    assert elf.symbol("report") == Symbol("report", 0x101000, 0x1800, 0x11, 2)
    with _raises("vmlinux: symbol 'missing' not found"):
        elf.symbol("missing")


@BOTH
def test_symbols_keep_size_info_and_section(elf_class):
    elf = ElfImage(
        build([TEXT, DATA], elf_class=elf_class, symbols=[Sym("buf", 0x101000, 0x2000, 0x11, 2)]).data
    )
    assert elf.symbols() == {"buf": Symbol("buf", 0x101000, 0x2000, 0x11, 2)}


def test_stripped_image_has_no_symbols():
    elf = ElfImage(build([TEXT]).data, "stripped")
    assert elf.symbols() == {}
    with _raises("stripped: symbol 'pvh_start' not found (image stripped?)"):
        elf.symbol("pvh_start")


@pytest.mark.skipif(binutils_missing() is not None, reason=str(binutils_missing()))
def test_elf64_linked_by_gnu_ld():
    elf = ElfImage(link_x86_64(LINKED_SOURCE), "linked.elf")
    assert (elf.elf_class, elf.machine, elf.entry) == (ELFCLASS64, EM_X86_64, 0x100000)
    syms = elf.symbols()
    assert syms["pvh_start"].value == 0x100000
    assert (syms["big"].value, syms["big"].size, syms["big"].info) == (0x101000, 4096, 0x11)  # global object
    assert elf.segment_at(syms["big"].value).flags & PF_W
    assert Note(b"Xen", 18, (0x100000).to_bytes(8, "little")) in elf.notes()


# ---------------------------------------------------------------------------- bad files


def test_not_elf_or_not_little_endian():
    with _raises("x: not an ELF file"):
        ElfImage(b"MZ" + bytes(100), "x")
    big_endian = bytearray(build([TEXT]).data)
    big_endian[5] = 2
    with _raises("x: only little-endian ELF32/ELF64"):
        ElfImage(bytes(big_endian), "x")


def test_truncated_elf64_header():
    with _raises("k: ELF header at file offset 0x0 (+0x40) runs past the end of the file"):
        ElfImage(build([TEXT]).data[:60], "k")


@BOTH
def test_truncated_program_header_table(elf_class):
    gnu_stack = Part(0x6474E551, 0)  # first: a type whose (empty) bytes the reader does not look for
    data = build([gnu_stack, TEXT], elf_class=elf_class).data
    phoff = 52 if elf_class == ELFCLASS32 else 64
    phsize = 32 if elf_class == ELFCLASS32 else 56
    with _raises(f"k: program header at file offset {phoff + phsize:#x} (+{phsize:#x}) runs past the end"):
        ElfImage(data[: phoff + phsize + 8], "k")


@BOTH
def test_segment_past_end_of_file(elf_class):
    built = build([TEXT, DATA], elf_class=elf_class)
    with _raises(f"k: segment (type 1) at file offset {built.offsets[1]:#x} (+0x4) runs past the end"):
        ElfImage(built.data[:-1], "k")


def test_load_segment_with_filesz_above_memsz():
    with _raises("k: PT_LOAD program header at file offset 0x40 has p_filesz 0x10 > p_memsz 0x8"):
        ElfImage(build([Part(PT_LOAD, 0x100000, bytes(16), memsz=8)]).data, "k")


def test_truncated_section_headers():
    data = build([TEXT], symbols=[Sym("a", 1)]).data
    with _raises(f"k: section header at file offset {len(data) - 64:#x} (+0x40) runs past the end"):
        ElfImage(data[:-1], "k")


def test_symbol_table_past_end_of_file():
    built = build([TEXT], symbols=[Sym("a", 1)])
    data = bytearray(built.data)
    (shoff,) = struct.unpack_from("<Q", data, 40)
    struct.pack_into("<Q", data, shoff + 64 + 32, 0x10000)  # .symtab's sh_size
    elf = ElfImage(bytes(data), "k")
    with _raises(f"k: symbol table at file offset {built.symtab_offset:#x} (+0x10000) runs past the end"):
        elf.symbols()


@pytest.mark.parametrize("cut", [1, 4, 11])
def test_note_running_past_its_segment(cut):
    first, second = note(b"Linux", 6, b"abcd"), phys32_note(0x100000, 8).data
    built = build([TEXT, Part(PT_NOTE, 0, first + second[:-cut]), DATA])
    elf = ElfImage(built.data, "k")  # the file itself is long enough: the segment is what is short
    with _raises(f"k: note at file offset {built.offsets[1] + len(first):#x} runs past its PT_NOTE segment"):
        elf.notes()
