"""ELF images for the loader tests: made by hand field by field (the gABI's layouts), or linked by GNU ld.

``build`` lays a file out as: ELF header, program headers, each segment's bytes (16-byte aligned), then,
with symbols, .symtab, .strtab and three section headers (null, .symtab, .strtab). ``Built.offsets``
says where each segment's bytes start, so tests can name the offsets the reader must report.
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The gABI's and Xen's numbers, written out here rather than taken from the reader under test.
ELFCLASS32, ELFCLASS64 = 1, 2
ET_EXEC, EM_386, EM_X86_64 = 2, 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # xen/include/public/elfnote.h

# Per class: header, program header, section header, symbol formats.
_FORMATS = {
    ELFCLASS32: ("<4s12sHHIIIIIHHHHHH", "<8I", "<10I", "<IIIBBH"),
    ELFCLASS64: ("<4s12sHHIQQQIHHHHHH", "<IIQQQQQQ", "<IIQQQQIIQQ", "<IBBHQQ"),
}


@dataclass(frozen=True)
class Part:
    """One program header and the bytes it maps (``memsz`` defaults to their length)."""

    type: int
    paddr: int
    data: bytes = b""
    memsz: int | None = None
    flags: int = PF_R
    align: int = 4


@dataclass(frozen=True)
class Sym:
    name: str
    value: int
    size: int = 0
    info: int = 0x12  # STB_GLOBAL << 4 | STT_FUNC
    shndx: int = 1


@dataclass(frozen=True)
class Built:
    data: bytes
    offsets: list[int]  # file offset of each Part's bytes
    symtab_offset: int | None


def _pad(b: bytes, to: int = 4) -> bytes:
    return b + bytes(-len(b) % to)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """An Elf_Nhdr, its NUL-terminated name and its descriptor, each padded to 4 bytes."""
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + _pad(name + b"\0") + _pad(desc)


TEXT = Part(PT_LOAD, 0x100000, b"\xfa\xf4" * 8, flags=PF_R | PF_X, align=0x1000)  # cli; hlt
DATA = Part(PT_LOAD, 0x101000, b"\x11\x22\x33\x44", memsz=0x2000, flags=PF_R | PF_W, align=0x1000)


def phys32_note(entry: int, size: int = 4) -> Part:
    """A PT_NOTE with Xen's PHYS32_ENTRY note, its descriptor ``size`` bytes long."""
    return Part(PT_NOTE, 0, note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(size, "little")))


def build(
    parts: list[Part], *, elf_class: int = ELFCLASS64, entry: int = 0, symbols: Sequence[Sym] = ()
) -> Built:
    ehdr_fmt, phdr_fmt, shdr_fmt, sym_fmt = (struct.Struct(f) for f in _FORMATS[elf_class])
    phoff = ehdr_fmt.size
    off = phoff + len(parts) * phdr_fmt.size
    offsets = []
    for p in parts:
        off += -off % 16
        offsets.append(off)
        off += len(p.data)
    body = bytearray(off)
    phdrs = b""
    for p, o in zip(parts, offsets, strict=True):
        body[o : o + len(p.data)] = p.data
        memsz = len(p.data) if p.memsz is None else p.memsz
        if elf_class == ELFCLASS32:
            phdrs += phdr_fmt.pack(p.type, o, p.paddr, p.paddr, len(p.data), memsz, p.flags, p.align)
        else:
            phdrs += phdr_fmt.pack(p.type, p.flags, o, p.paddr, p.paddr, len(p.data), memsz, p.align)
    shoff, shnum, symtab_offset = 0, 0, None
    if symbols:
        strtab, syms = b"\0", sym_fmt.pack(*[0] * 6)
        for s in symbols:
            if elf_class == ELFCLASS32:
                syms += sym_fmt.pack(len(strtab), s.value, s.size, s.info, 0, s.shndx)
            else:
                syms += sym_fmt.pack(len(strtab), s.info, 0, s.shndx, s.value, s.size)
            strtab += s.name.encode() + b"\0"
        body += bytes(-len(body) % 8)
        symtab_offset = len(body)
        body += syms + _pad(strtab, 8)
        strtab_offset = symtab_offset + len(syms)
        shoff, shnum = len(body), 3
        body += shdr_fmt.pack(*[0] * 10)
        body += shdr_fmt.pack(0, 2, 0, 0, symtab_offset, len(syms), 2, 1, 8, sym_fmt.size)  # SHT_SYMTAB
        body += shdr_fmt.pack(0, 3, 0, 0, strtab_offset, len(strtab), 0, 0, 1, 0)  # SHT_STRTAB
    machine = EM_386 if elf_class == ELFCLASS32 else EM_X86_64
    ident = bytes([elf_class, 1, 1]) + bytes(9)
    fields = (
        ET_EXEC,
        machine,
        1,
        entry,
        phoff,
        shoff,
        0,
        phoff,
        phdr_fmt.size,
        len(parts),
        shdr_fmt.size,
        shnum,
        0,
    )
    body[:phoff] = ehdr_fmt.pack(b"\x7fELF", ident, *fields)
    body[phoff : phoff + len(phdrs)] = phdrs
    return Built(bytes(body), offsets, symtab_offset)


# A PVH kernel in miniature: an 8-byte PHYS32_ENTRY note, code at 1 MiB, a 4 KiB global in .bss.
LINKED_SOURCE = """
.section .note.Xen, "a", @note
.p2align 2
.long 4, 8, 18
.asciz "Xen"
.quad pvh_start
.text
.globl pvh_start
pvh_start:
    cli
    hlt
.bss
.globl big
.type big, @object
.size big, 4096
big:
    .skip 4096
"""

LINKER_SCRIPT = """
ENTRY(pvh_start)
SECTIONS {
  . = 0x100000;
  .text : { *(.text) }
  .notes : { *(.note.Xen) }
  . = ALIGN(0x1000);
  .bss : { *(.bss) }
}
"""


def binutils_missing() -> str | None:
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    return f"needs GNU binutils ({', '.join(missing)} not found)" if missing else None


@functools.cache
def link_x86_64(source: str) -> bytes:
    """``source`` assembled with ``as --64`` and linked with ``ld -m elf_x86_64`` at 1 MiB (LINKER_SCRIPT)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "k.s").write_text(source)
        (d / "k.ld").write_text(LINKER_SCRIPT)
        subprocess.run(["as", "--64", "-o", d / "k.o", d / "k.s"], check=True)
        ld = ["ld", "-m", "elf_x86_64", "-z", "max-page-size=0x1000", "-T", d / "k.ld", "-o", d / "k.elf"]
        subprocess.run([*ld, d / "k.o"], check=True)
        return (d / "k.elf").read_bytes()
