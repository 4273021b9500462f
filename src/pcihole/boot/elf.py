"""Just enough of ELF (32- and 64-bit, little-endian) to load a PVH kernel and find its symbols.

Field layouts are the System V gABI's (Elf32_Ehdr / Elf64_Ehdr, Elf*_Phdr, Elf*_Shdr, Elf*_Sym,
Elf*_Nhdr). Every offset read from the file is checked against its size first: a bad image gives an
``ElfError`` naming the file and the offset, never an ``IndexError`` or ``struct.error``.
The PVH entry note itself is looked up in ``boot.pvh`` (``phys32_entry``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
SHT_SYMTAB = 2

# Per class: (ELF header size, program header size, section header size, symbol size).
_SIZES = {ELFCLASS32: (52, 32, 40, 16), ELFCLASS64: (64, 56, 64, 24)}


class ElfError(ValueError):
    """The file is not an ELF image pcihole can load; the message says what is wrong and where."""


@dataclass(frozen=True)
class Segment:
    """A program header (Elf*_Phdr)."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int  # PF_X | PF_W | PF_R
    align: int


@dataclass(frozen=True)
class Note:
    name: bytes  # without the trailing NULs
    type: int
    desc: bytes


@dataclass(frozen=True)
class Symbol:
    """A .symtab entry (Elf*_Sym)."""

    name: str
    value: int
    size: int
    info: int  # binding << 4 | type
    shndx: int


class ElfImage:
    """A parsed little-endian ELF32 or ELF64 image (the bytes stay in ``data``)."""

    def __init__(self, data: bytes, name: str = "<image>") -> None:
        self.data = bytes(data)
        self.name = name
        if data[:4] != ELF_MAGIC:
            raise ElfError(f"{name}: not an ELF file (no \\x7fELF magic)")
        if len(data) < 52:
            raise ElfError(f"{name}: truncated ELF file: {len(data)} bytes, shorter than an ELF header")
        self.elf_class = data[4]
        if self.elf_class not in _SIZES or data[5] != ELFDATA2LSB:
            raise ElfError(f"{name}: only little-endian ELF32/ELF64 images are supported")
        ehsize, phsize, shsize, self._symsize = _SIZES[self.elf_class]
        self._need(0, ehsize, "ELF header")
        self.type, self.machine = struct.unpack_from("<HH", data, 16)
        word = "I" if self.elf_class == ELFCLASS32 else "Q"
        (self.entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _shstrndx) = (
            struct.unpack_from(f"<{word}{word}{word}IHHHHHH", data, 24)
        )
        if phnum and phentsize < phsize:
            raise ElfError(f"{name}: e_phentsize {phentsize} is smaller than a program header ({phsize})")
        if shoff and shnum and shentsize < shsize:
            raise ElfError(f"{name}: e_shentsize {shentsize} is smaller than a section header ({shsize})")
        self.segments = [self._phdr(phoff + i * phentsize) for i in range(phnum)]
        self._sections = [self._shdr(shoff + i * shentsize) for i in range(shnum)] if shoff else []
        self._symbols: dict[str, Symbol] | None = None

    def _need(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ElfError(
                f"{self.name}: {what} at file offset {offset:#x} (+{size:#x}) runs past the end of the file"
            )

    def _phdr(self, off: int) -> Segment:
        if self.elf_class == ELFCLASS32:
            self._need(off, 32, "program header")
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = struct.unpack_from(
                "<8I", self.data, off
            )
        else:
            self._need(off, 56, "program header")
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
                "<IIQQQQQQ", self.data, off
            )
        if p_type in (PT_LOAD, PT_NOTE):
            self._need(p_offset, p_filesz, f"segment (type {p_type})")
        if p_type == PT_LOAD and p_filesz > p_memsz:
            raise ElfError(
                f"{self.name}: PT_LOAD program header at file offset {off:#x} has p_filesz {p_filesz:#x} "
                f"> p_memsz {p_memsz:#x}"
            )
        return Segment(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align)

    def _shdr(self, off: int) -> tuple[int, int, int, int, int, int]:
        """(type, offset, size, link, entsize, addr) of a section header."""
        if self.elf_class == ELFCLASS32:
            self._need(off, 40, "section header")
            _n, t, _fl, addr, offset, size, link, _i, _al, entsize = struct.unpack_from(
                "<10I", self.data, off
            )
        else:
            self._need(off, 64, "section header")
            _n, t, _fl, addr, offset, size, link, _i, _al, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", self.data, off
            )
        return t, offset, size, link, entsize, addr

    def loadable(self) -> list[Segment]:
        """The PT_LOAD segments that take memory (p_memsz > 0)."""
        return [s for s in self.segments if s.type == PT_LOAD and s.memsz]

    def load_segments(self) -> list[tuple[int, bytes, int]]:
        """(physical address, file bytes, memory size) of every loadable segment; the rest is zeros."""
        return [(s.paddr, self.data[s.offset : s.offset + s.filesz], s.memsz) for s in self.loadable()]

    def segment_at(self, addr: int) -> Segment | None:
        """The loadable segment whose memory image contains physical address ``addr``, or None."""
        for s in self.loadable():
            if s.paddr <= addr < s.paddr + s.memsz:
                return s
        return None

    def notes(self) -> list[Note]:
        """Every note of every PT_NOTE segment (4-byte aligned, as Linux and GNU as write them)."""
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

    def symbols(self) -> dict[str, Symbol]:
        """Names to symbols from .symtab (empty for a stripped image). Where a name repeats, the last
        entry wins: locals come first in a symbol table, so a global beats a local of the same name.

        Parsed once: a loader calls it before the guest runs, so a broken symbol or string table is
        an ElfError then, not after the run when the report is read."""
        if self._symbols is None:
            self._symbols = self._parse_symbols()
        return self._symbols

    def _parse_symbols(self) -> dict[str, Symbol]:
        out: dict[str, Symbol] = {}
        for t, offset, size, link, entsize, _addr in self._sections:
            if t != SHT_SYMTAB or not entsize:
                continue
            if entsize < self._symsize:
                raise ElfError(
                    f"{self.name}: symbol table at file offset {offset:#x} has entries of {entsize} bytes"
                )
            if link >= len(self._sections):
                raise ElfError(
                    f"{self.name}: symbol table at file offset {offset:#x} links to no section ({link})"
                )
            _st, stroff, strsize, *_ = self._sections[link]
            self._need(offset, size, "symbol table")
            self._need(stroff, strsize, "string table")
            for i in range(size // entsize):
                off = offset + i * entsize
                if self.elf_class == ELFCLASS32:
                    st_name, st_value, st_size, st_info, _other, st_shndx = struct.unpack_from(
                        "<IIIBBH", self.data, off
                    )
                else:
                    st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from(
                        "<IBBHQQ", self.data, off
                    )
                if not st_name or st_name >= strsize:
                    continue
                end = self.data.find(b"\0", stroff + st_name, stroff + strsize)
                if end < 0:
                    raise ElfError(
                        f"{self.name}: symbol name at file offset {stroff + st_name:#x} is not terminated"
                    )
                sname = self.data[stroff + st_name : end].decode(errors="replace")
                out[sname] = Symbol(sname, st_value, st_size, st_info, st_shndx)
        return out

    def symbol(self, name: str) -> Symbol:
        try:
            return self.symbols()[name]
        except KeyError:
            raise ElfError(f"{self.name}: symbol {name!r} not found (image stripped?)") from None
