"""A read-only mirror of the ECAM windows: the pages a guest reads present functions from without an
exit.

`ConfigMirror` is one sparse memfd holding every segment's window side by side (segment after
segment, in window order: one file descriptor and one host mapping however many segments there
are), mapped shared and writable into the VMM once. The page of a present function is its window's
file range plus the page's offset in the window, and it is the function's configuration space
itself: `ConfigSpace.attach()` makes that page the space's bytes, so every change, whether a guest
write emulated after its exit, a hot-plug slot status, an AER status set by a trapped write
elsewhere or a link state, lands in the page the guest reads; there is no second copy to keep up
to date and so no moment at which it can be stale. The memory map backs the function's page with
it (a KVM_MEM_READONLY memslot at `hva(page)`, or that file page mapped into the hole's own slot):
reads are served from it with no exit, writes still exit (the slot is read-only) and are emulated
before the vCPU resumes, as QEMU's pci_default_write_config does for every access.

A page that belongs to no function holds its segment's fill bytes, written before the memory map
maps it and after its function left, so a guest read of it sees fill bytes or the function's
bytes, never zeros (hole contract point 5). Only the pages of functions that were ever present
take host memory (tmpfs allocates a memfd's pages on first write).

The memfd is sealed F_SEAL_SHRINK | F_SEAL_GROW, then F_SEAL_SEAL: its size is fixed when it is made
(every window, side by side) and nothing resizes it, and a shrink would make the memslots' host pages
past the new end SIGBUS in the VMM and fault in KVM (mm/memfd.c memfd_add_seals, mm/shmem.c
shmem_setattr refuse it with EPERM). F_SEAL_WRITE cannot be added: the VMM writes the pages through
its shared writable mapping (ConfigSpace.attach), which F_SEAL_WRITE forbids (EBUSY while it exists).
"""

from __future__ import annotations

import bisect
import fcntl
import os
from collections.abc import Sequence

from pcihole.host.mman import MAP_SHARED, PROT_READ, PROT_WRITE, HostMapping, mmap_raw
from pcihole.memory.region import MirrorPage

from .ecam import CONFIG_SPACE_SIZE
from .topology import Segment

#: What the mirror is sealed with (the module docstring says why not F_SEAL_WRITE).
MIRROR_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ConfigMirror:
    """The mirror pages of every segment's window."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self._segments = sorted(segments, key=lambda s: s.window_base)
        self._bases = [s.window_base for s in self._segments]
        self._file_offsets = []
        size = 0
        for s in self._segments:
            self._file_offsets.append(size)
            size += s.window_size
        self.size = size
        self.fd = os.memfd_create("pcihole-ecam-mirror", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, MIRROR_SEALS)
            addr = mmap_raw(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        except BaseException:
            os.close(self.fd)
            raise
        self.mapping = HostMapping(addr, size, PROT_READ | PROT_WRITE, "ecam mirror")
        self._view = self.mapping.view()

    def _locate(self, page_gpa: int) -> tuple[Segment, int]:
        i = bisect.bisect_right(self._bases, page_gpa) - 1
        if i < 0 or page_gpa > self._segments[i].window_last or page_gpa % CONFIG_SPACE_SIZE:
            raise ValueError(f"{page_gpa:#x} is not a config page of any ECAM window")
        segment = self._segments[i]
        return segment, self._file_offsets[i] + page_gpa - segment.window_base

    def offset(self, page_gpa: int) -> int:
        """The page's offset in the memfd."""
        return self._locate(page_gpa)[1]

    def hva(self, page_gpa: int) -> int:
        """The host address of the page: the userspace_addr of its read-only memslot."""
        return self.mapping.addr + self.offset(page_gpa)

    def mirror_page(self, page_gpa: int) -> MirrorPage:
        """The page as the memory map takes it: its host address, and its place in the memfd."""
        off = self.offset(page_gpa)
        return MirrorPage(self.mapping.addr + off, self.fd, off)

    def page(self, page_gpa: int) -> memoryview:
        """The page's bytes, writable by the VMM (a function's config space attaches to it)."""
        off = self.offset(page_gpa)
        return self._view[off : off + CONFIG_SPACE_SIZE]

    def blank(self, page_gpa: int) -> None:
        """The page reads as its segment's fill (no function is there)."""
        segment, off = self._locate(page_gpa)
        self._view[off : off + CONFIG_SPACE_SIZE] = bytes((segment.fill,)) * CONFIG_SPACE_SIZE

    def allocated_bytes(self) -> int:
        """Host memory behind the mirror: the memfd's allocated blocks."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            self._view.release()
            self.mapping.close()
            os.close(self.fd)
            self.fd = -1


__all__ = ["MIRROR_SEALS", "ConfigMirror"]
