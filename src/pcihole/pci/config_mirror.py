"""A read-only mirror of one segment's ECAM window: the page a guest reads a present function from
without an exit.

`ConfigMirror` is a sparse memfd as large as the segment's window, mapped shared and writable into
the VMM once. The page of a present function at window offset `o` is file page `o`, and it is the
function's configuration space itself: `ConfigSpace.attach()` makes that page the space's bytes,
so every change, whether a guest write emulated after its exit, a hot-plug slot status, an AER
status set by a trapped write elsewhere or a link state, lands in the page the guest reads; there
is no second copy to keep up to date and so no moment at which it can be stale. The memory map
backs the function's page with a KVM_MEM_READONLY memslot at `hva(page)`: reads are served from
it with no exit, writes still exit (the slot is read-only) and are emulated before the vCPU
resumes, as QEMU's pci_default_write_config does for every access.

A page that belongs to no function holds the segment's fill bytes, written before the memory map
maps it and after its function left, so a guest read of it sees fill bytes or the function's
bytes, never zeros (hole contract point 5). Only the pages of functions that were ever present
take host memory (tmpfs allocates a memfd's pages on first write).
"""

from __future__ import annotations

import os

from pcihole.host.mman import MAP_SHARED, PROT_READ, PROT_WRITE, HostMapping, mmap_raw
from pcihole.memory.region import MirrorPage

from .ecam import CONFIG_SPACE_SIZE
from .topology import Segment


class ConfigMirror:
    """The mirror pages of one segment's window."""

    def __init__(self, segment: Segment) -> None:
        self.base = segment.window_base
        self.size = segment.window_size
        self.fill = segment.fill
        self.fd = os.memfd_create(f"pcihole-ecam-mirror-{segment.id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            addr = mmap_raw(0, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        except BaseException:
            os.close(self.fd)
            raise
        self.mapping = HostMapping(addr, self.size, PROT_READ | PROT_WRITE, f"ecam mirror {segment.id}")
        self._view = self.mapping.view()
        self._blank = bytes((self.fill,)) * CONFIG_SPACE_SIZE

    def offset(self, page_gpa: int) -> int:
        """The page's offset in the window (and in the memfd)."""
        off = page_gpa - self.base
        if off < 0 or off >= self.size or off % CONFIG_SPACE_SIZE:
            raise ValueError(f"{page_gpa:#x} is not a config page of the window at {self.base:#x}")
        return off

    def hva(self, page_gpa: int) -> int:
        """The host address of the page: the userspace_addr of its read-only memslot."""
        return self.mapping.addr + self.offset(page_gpa)

    def mirror_page(self, page_gpa: int) -> MirrorPage:
        """The page as the memory map takes it: its host address, and its place in the memfd."""
        return MirrorPage(self.hva(page_gpa), self.fd, self.offset(page_gpa))

    def page(self, page_gpa: int) -> memoryview:
        """The page's bytes, writable by the VMM (a function's config space attaches to it)."""
        off = self.offset(page_gpa)
        return self._view[off : off + CONFIG_SPACE_SIZE]

    def blank(self, page_gpa: int) -> None:
        """The page reads as the segment's fill (no function is there)."""
        self.page(page_gpa)[:] = self._blank

    def allocated_bytes(self) -> int:
        """Host memory behind the mirror: the memfd's allocated blocks."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            self._view.release()
            self.mapping.close()
            os.close(self.fd)
            self.fd = -1


__all__ = ["ConfigMirror"]
