"""A read-only host window of fill bytes that costs one small sealed memfd, for PCI_HOLE reads.

The seed's PCI_HOLE reads return 0xff with no exit. The model answers them without a Python
callback by giving Unicorn real memory to read: a WINDOW_BYTES host range made of side-by-side
read-only mmaps of one CHUNK_BYTES memfd of 0xff (sealed, so nothing can change it), and as many
Unicorn regions pointing at that same window as a slot needs (aliasing works: docs/unicorn.md).
Host memory: CHUNK_BYTES, however large the holes.
"""

from __future__ import annotations

import fcntl
import os

from pcihole.host.mman import MAP_SHARED, PROT_READ, HostMapping

CHUNK_BYTES = 2 << 20
WINDOW_BYTES = 64 << 20
HOLE_FILL = 0xFF


class FillWindow:
    """WINDOW_BYTES of `fill` bytes at `addr`, read-only, backed by one sealed memfd."""

    def __init__(self, fill: int = HOLE_FILL) -> None:
        fd = os.memfd_create(f"pcihole-model-fill-{fill:02x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, CHUNK_BYTES)
            os.pwrite(fd, bytes([fill]) * CHUNK_BYTES, 0)
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self.mapping = HostMapping.reserve(WINDOW_BYTES, name=f"model fill {fill:#04x}")
            for offset in range(0, WINDOW_BYTES, CHUNK_BYTES):
                self.mapping.map_fixed(offset, CHUNK_BYTES, PROT_READ, MAP_SHARED, fd)
        finally:
            os.close(fd)  # the mappings keep the memfd alive
        self.addr = self.mapping.addr
        self.size = WINDOW_BYTES
        self.fill = fill


_windows: dict[int, FillWindow] = {}


def shared_fill_window(fill: int = HOLE_FILL) -> FillWindow:
    """One window per fill value for the whole process (like the kernel's zero page, never freed)."""
    window = _windows.get(fill)
    if window is None:
        window = _windows[fill] = FillWindow(fill)
    return window
