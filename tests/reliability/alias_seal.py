"""Hole contract point 4 for ro-alias, checked from the host: the fill memfd is still sealed and still
all fill bytes. (The tiny PVH kernels and machines these tests boot come from tests/guest_runner.py.)
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest


def check_alias_sealed(memory) -> int:
    """Hole contract 4 for ro-alias: every fill memfd still holds only its fill byte, and no host-side
    write can change it (write(2), a writable shared mapping, growing or shrinking). Returns how many
    memfds were checked (0 for other strategies). Call before the machine is closed."""
    memfds = list(getattr(memory.strategy, "memfds", {}).values())
    for m in memfds:
        data = os.pread(m.fd, m.size, 0)
        assert len(data) == m.size
        assert data == bytes([m.fill]) * m.size, f"{m!r}: bytes other than {m.fill:#04x} in the alias"
        with pytest.raises(PermissionError):
            os.pwrite(m.fd, b"\x00", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(m.fd, m.size * 2)
        with pytest.raises(PermissionError):
            os.ftruncate(m.fd, 0)
        with pytest.raises(PermissionError) as e:
            mmap.mmap(m.fd, m.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert e.value.errno == errno.EPERM
        # Still all fill after the attempts.
        assert os.pread(m.fd, m.size, 0) == bytes([m.fill]) * m.size
    return len(memfds)
