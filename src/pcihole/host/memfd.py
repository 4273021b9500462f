"""Sealed memfds of fill bytes: the backing of every ro-alias hole (memory/strategies/ro_alias.py).

memfd_create(2) with MFD_ALLOW_SEALING, filled with write(2) (never through a shared writable
mapping: F_SEAL_WRITE fails with EBUSY while one exists, mm/memfd.c memfd_wait_for_pins /
mapping_deny_writable), then sealed F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW and finally
F_SEAL_SEAL so the seals themselves cannot change. After that nothing in this process (a VMM bug
included) can change the bytes: write(2) and ftruncate(2) fail with EPERM, mmap(PROT_WRITE,
MAP_SHARED) fails with EPERM, and a read-only shared mapping cannot be mprotect()ed writable
(the kernel clears VM_MAYWRITE on it). That is point 4 of the hole contract.
"""

from __future__ import annotations

import fcntl
import os

from pcihole.host.mman import PAGE_SIZE

ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_CHUNK = 1 << 20


class SealedFillMemfd:
    """A memfd of `size` bytes, all equal to `fill`, sealed against any change."""

    def __init__(self, size: int, fill: int = 0xFF, name: str = "") -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memfd size must be a positive multiple of {PAGE_SIZE}, not {size:#x}")
        if not 0 <= fill <= 0xFF:
            raise ValueError(f"fill must be a byte, not {fill:#x}")
        self.size = size
        self.fill = fill
        self.name = name or f"pcihole-fill-{fill:02x}-{size // 1024}k"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            chunk = bytes([fill]) * min(size, _CHUNK)
            done = 0
            while done < size:
                done += os.pwrite(self.fd, chunk[: size - done], done)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, ALL_SEALS)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(self.fd)
            raise

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)

    def allocated_bytes(self) -> int:
        """Host memory really behind the file: st_blocks * 512 (what `hole_backing_bytes` counts)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SealedFillMemfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SealedFillMemfd {self.name} fd={self.fd} size={self.size:#x}>"


__all__ = ["ALL_SEALS", "SealedFillMemfd"]
