"""A minimal ELF32 (i386) reader for PVH images: program headers, notes, symbols. Stdlib only."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD = 1
PT_NOTE = 4
SHT_SYMTAB = 2
SHT_NOTE = 7
EM_386 = 3
XEN_ELFNOTE_PHYS32_ENTRY = 18


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int
    align: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    info: int
    shndx: int


class Elf32:
    """A parsed little-endian ELF32 image (the bytes stay in ``data``)."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        d = self.data
        if len(d) < 52 or d[:4] != b"\x7fELF":
            raise ElfError("not an ELF file")
        if d[4] != 1 or d[5] != 1:
            raise ElfError("not a little-endian ELF32 file")
        (
            self.type,
            self.machine,
            _version,
            self.entry,
            self.phoff,
            self.shoff,
            _flags,
            _ehsize,
            self.phentsize,
            self.phnum,
            self.shentsize,
            self.shnum,
            self.shstrndx,
        ) = struct.unpack_from("<HHIIIIIHHHHHH", d, 16)
        self.segments = [self._segment(i) for i in range(self.phnum)]
        self.sections = [self._section(i) for i in range(self.shnum)] if self.shoff else []

    def _segment(self, i: int) -> Segment:
        off = self.phoff + i * self.phentsize
        if off + 32 > len(self.data):
            raise ElfError("truncated program header table")
        return Segment(*struct.unpack_from("<IIIIIIII", self.data, off))

    def _section(self, i: int) -> tuple[int, ...]:
        off = self.shoff + i * self.shentsize
        if off + 40 > len(self.data):
            raise ElfError("truncated section header table")
        # name, type, flags, addr, offset, size, link, info, addralign, entsize
        return struct.unpack_from("<IIIIIIIIII", self.data, off)

    def notes(self) -> list[Note]:
        """All notes of the PT_NOTE segments (each padded to the segment's alignment, at least 4)."""
        out = []
        for seg in self.segments:
            if seg.type != PT_NOTE:
                continue
            align = max(seg.align, 4)
            pos, end = seg.offset, seg.offset + seg.filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                pos += 12
                name = self.data[pos : pos + namesz].rstrip(b"\0")
                pos += -(-namesz // align) * align
                desc = self.data[pos : pos + descsz]
                pos += -(-descsz // align) * align
                out.append(Note(name, ntype, desc))
        return out

    def pvh_entry(self) -> int | None:
        """The XEN_ELFNOTE_PHYS32_ENTRY address, or None."""
        for n in self.notes():
            if n.name == b"Xen" and n.type == XEN_ELFNOTE_PHYS32_ENTRY and len(n.desc) in (4, 8):
                return int.from_bytes(n.desc, "little")
        return None

    def symbols(self) -> dict[str, Symbol]:
        out: dict[str, Symbol] = {}
        for sh in self.sections:
            if sh[1] != SHT_SYMTAB:
                continue
            _n, _t, _f, _a, off, size, link, _i, _al, entsize = sh
            stroff = self.sections[link][4]
            for pos in range(off, off + size, entsize or 16):
                name, value, sz, info, _other, shndx = struct.unpack_from("<IIIBBH", self.data, pos)
                if not name:
                    continue
                end = self.data.index(b"\0", stroff + name)
                sname = self.data[stroff + name : end].decode()
                out.setdefault(sname, Symbol(sname, value, sz, info, shndx))
        return out

    def symbol(self, name: str) -> Symbol:
        try:
            return self.symbols()[name]
        except KeyError:
            raise ElfError(f"symbol {name!r} not found (image stripped?)") from None

    def load_segments(self) -> list[tuple[int, bytes, int]]:
        """(physical address, file bytes, memory size) of every PT_LOAD segment; the rest is zeros."""
        return [
            (s.paddr, self.data[s.offset : s.offset + s.filesz], s.memsz)
            for s in self.segments
            if s.type == PT_LOAD
        ]

    def segment_at(self, addr: int) -> Segment | None:
        """The PT_LOAD segment whose memory image contains physical address ``addr``."""
        for s in self.segments:
            if s.type == PT_LOAD and s.paddr <= addr < s.paddr + s.memsz:
                return s
        return None
