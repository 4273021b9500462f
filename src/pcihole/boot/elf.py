"""Just enough of ELF (32- and 64-bit, little-endian) to load a PVH kernel and find its symbols.

Field layouts are the System V gABI's (Elf32_Ehdr / Elf64_Ehdr, Elf*_Phdr, Elf*_Shdr, Elf*_Sym,
Elf*_Nhdr).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
PT_LOAD, PT_NOTE = 1, 4
SHT_SYMTAB = 2


class ElfError(ValueError):
    """The file is not an ELF image pcihole can load; the message says what is wrong and where."""


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


class ElfImage:
    def __init__(self, data: bytes, name: str = "<image>") -> None:
        self.data = data
        self.name = name
        if len(data) < 52 or data[:4] != ELF_MAGIC:
            raise ElfError(f"{name}: not an ELF file (no \\x7fELF magic)")
        self.elf_class = data[4]
        if self.elf_class not in (ELFCLASS32, ELFCLASS64) or data[5] != ELFDATA2LSB:
            raise ElfError(f"{name}: only little-endian ELF32/ELF64 images are supported")
        if self.elf_class == ELFCLASS32:
            (self.entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _shstrndx) = (
                struct.unpack_from("<IIIIHHHHHH", data, 24)
            )
        else:
            (self.entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _shstrndx) = (
                struct.unpack_from("<QQQIHHHHHH", data, 24)
            )
        self.segments = [self._phdr(phoff + i * phentsize) for i in range(phnum)]
        self._sections = [self._shdr(shoff + i * shentsize) for i in range(shnum)] if shoff else []

    def _need(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or offset + size > len(self.data):
            raise ElfError(f"{self.name}: {what} at file offset {offset:#x} (+{size:#x}) runs past the end of the file")

    def _phdr(self, off: int) -> Segment:
        if self.elf_class == ELFCLASS32:
            self._need(off, 32, "program header")
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _f, _a = struct.unpack_from("<8I", self.data, off)
        else:
            self._need(off, 56, "program header")
            p_type, _f, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _a = struct.unpack_from(
                "<IIQQQQQQ", self.data, off
            )
        if p_type in (PT_LOAD, PT_NOTE):
            self._need(p_offset, p_filesz, f"segment (type {p_type})")
        return Segment(p_type, p_offset, p_paddr, p_vaddr, p_filesz, p_memsz)

    def _shdr(self, off: int) -> tuple[int, int, int, int, int, int]:
        """(type, offset, size, link, entsize, addr) of a section header."""
        if self.elf_class == ELFCLASS32:
            self._need(off, 40, "section header")
            _n, t, _fl, addr, offset, size, link, _i, _al, entsize = struct.unpack_from("<10I", self.data, off)
        else:
            self._need(off, 64, "section header")
            _n, t, _fl, addr, offset, size, link, _i, _al, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", self.data, off
            )
        return t, offset, size, link, entsize, addr

    def loadable(self) -> list[Segment]:
        return [s for s in self.segments if s.type == PT_LOAD and s.memsz]

    def notes(self) -> list[Note]:
        out: list[Note] = []
        for seg in self.segments:
            if seg.type != PT_NOTE:
                continue
            pos, end = seg.offset, seg.offset + seg.filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                name_off = pos + 12
                desc_off = name_off + (namesz + 3) // 4 * 4
                next_pos = desc_off + (descsz + 3) // 4 * 4
                if next_pos > end:
                    raise ElfError(f"{self.name}: note at file offset {pos:#x} runs past its PT_NOTE segment")
                name = self.data[name_off : name_off + namesz].rstrip(b"\0")
                out.append(Note(name, ntype, self.data[desc_off : desc_off + descsz]))
                pos = next_pos
        return out

    def symbols(self) -> dict[str, int]:
        """Names to values from .symtab (empty for a stripped image)."""
        out: dict[str, int] = {}
        for t, offset, size, link, entsize, _addr in self._sections:
            if t != SHT_SYMTAB or not entsize:
                continue
            _st, stroff, strsize, *_ = self._sections[link]
            self._need(offset, size, "symbol table")
            for i in range(size // entsize):
                off = offset + i * entsize
                if self.elf_class == ELFCLASS32:
                    st_name, st_value = struct.unpack_from("<II", self.data, off)
                else:
                    st_name, _info, _other, _shndx, st_value = struct.unpack_from("<IBBHQ", self.data, off)
                if st_name and st_name < strsize:
                    end = self.data.index(b"\0", stroff + st_name)
                    out[self.data[stroff + st_name : end].decode(errors="replace")] = st_value
        return out
