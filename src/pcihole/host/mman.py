"""Host memory mappings through libc mmap(2), with the address exposed.

Python's `mmap` module hides the address and cannot do MAP_FIXED, and both are needed: KVM takes the
address as a memslot's `userspace_addr`, Unicorn as `mem_map_ptr`'s pointer, and the ro-alias
strategy maps one small memfd many times side by side (MAP_FIXED) so that one memslot covers a long
run of hole. A `HostMapping` owns its range and unmaps it on close().
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
#: The one page size of the project: x86-64's 4 KiB base page (arch/x86/include/asm/page_types.h
#: PAGE_SHIFT). Host mappings, memslots (KVM counts them in these pages), dirty bitmaps and guest page
#: frames all use it; pcihole runs on x86-64 only, where mmap.PAGESIZE is the same.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PROT_NONE = 0  # <asm-generic/mman-common.h>; Python's mmap module does not export it
PROT_READ, PROT_WRITE = mmap.PROT_READ, mmap.PROT_WRITE
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = mmap.MAP_SHARED, mmap.MAP_PRIVATE, mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10  # <asm-generic/mman-common.h>
MAP_NORESERVE = 0x4000  # x86
# <asm-generic/mman-common.h>, Linux 5.14: fault in the page tables of a range, as a read would.
MADV_POPULATE_READ = 22


def _check(result: int | None, what: str) -> int:
    if result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mmap_raw(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); returns the address or raises OSError naming the call."""
    res = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    return _check(res, f"mmap(addr={addr:#x}, length={length:#x}, prot={prot}, flags={flags:#x}, fd={fd})")


def munmap_raw(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap({addr:#x}, {length:#x}): {os.strerror(err)}")


def mprotect_raw(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(addr, length, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect({addr:#x}, {length:#x}, {prot}): {os.strerror(err)}")


class HostMapping:
    """A range of this process's address space that we own: anonymous memory, or a file mapping.

    `addr` is what KVM calls the HVA. Reads and writes go through ctypes at the address and are
    bounds-checked against the mapping.
    """

    def __init__(self, addr: int, size: int, prot: int, name: str = "") -> None:
        self.addr = addr
        self.size = size
        self.prot = prot
        self.name = name
        self._closed = False

    @classmethod
    def anonymous(cls, size: int, *, prot: int = PROT_READ | PROT_WRITE, name: str = "") -> HostMapping:
        """Private anonymous memory (zero-filled, allocated on first touch), like guest RAM."""
        size = _page_align(size)
        addr = mmap_raw(0, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        return cls(addr, size, prot, name)

    @classmethod
    def reserve(cls, size: int, name: str = "") -> HostMapping:
        """A PROT_NONE reservation, to be filled later with MAP_FIXED mappings (see map_fixed)."""
        size = _page_align(size)
        addr = mmap_raw(0, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        return cls(addr, size, PROT_NONE, name)

    def map_fixed(
        self, offset: int, length: int, prot: int, flags: int, fd: int, file_offset: int = 0
    ) -> int:
        """Replace [addr+offset, +length) of this reservation by a mapping of `fd` (MAP_FIXED)."""
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > self.size:
            raise ValueError(f"map_fixed [{offset:#x}, +{length:#x}) outside {self!r}")
        return mmap_raw(self.addr + offset, length, prot, flags | MAP_FIXED, fd, file_offset)

    def populate_read(self) -> bool:
        """Fault in the host page tables of the whole mapping now, as reads would (madvise
        MADV_POPULATE_READ, mm/madvise.c madvise_populate): later reads, and KVM's translation of
        the guest's first touch (hva_to_pfn), take no host page fault. False where the kernel lacks
        it (before 5.14: EINVAL); then the pages fault in on first touch, as without this call.
        PROT_NONE parts of a reservation would fail (ENOMEM), so call it once it is mapped."""
        if _libc.madvise(self.addr, self.size, MADV_POPULATE_READ) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return False
        raise OSError(err, f"madvise({self.addr:#x}, {self.size:#x}, MADV_POPULATE_READ): {os.strerror(err)}")

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IndexError(f"[{offset:#x}, +{length:#x}) is outside {self!r}")

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))

    def view(self) -> memoryview:
        """A writable memoryview of the whole mapping (valid until close())."""
        self._check_range(0, 0)
        return memoryview((ctypes.c_char * self.size).from_address(self.addr)).cast("B")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            munmap_raw(self.addr, self.size)

    def __enter__(self) -> HostMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        label = f" {self.name}" if self.name else ""
        return f"<HostMapping{label} [{self.addr:#x}, {self.addr + self.size - 1:#x}]>"


def _page_align(size: int) -> int:
    if size <= 0:
        raise ValueError(f"mapping size must be positive, not {size}")
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


__all__ = [
    "HostMapping",
    "MADV_POPULATE_READ",
    "MAP_FIXED",
    "MAP_NORESERVE",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "mmap_raw",
    "mprotect_raw",
    "munmap_raw",
]
