"""The sealed fill memfd: hole contract point 4 (the backing can never be modified)."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from pcihole.host.memfd import SealedFillMemfd
from pcihole.host.mman import (
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    mmap_raw,
    mprotect_raw,
    munmap_raw,
)

SIZE = 64 * 1024


@pytest.fixture
def memfd():
    m = SealedFillMemfd(SIZE, 0xFF)
    yield m
    m.close()


def test_contents_and_seals(memfd):
    assert os.pread(memfd.fd, SIZE, 0) == b"\xff" * SIZE
    seals = memfd.seals()
    for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SEAL):
        assert seals & seal
    assert memfd.allocated_bytes() == SIZE


def test_write_and_resize_are_refused_with_eperm(memfd):
    with pytest.raises(OSError) as e:
        os.pwrite(memfd.fd, b"\0", 0)
    assert e.value.errno == errno.EPERM
    for size in (SIZE // 2, SIZE * 2):
        with pytest.raises(OSError) as e:
            os.ftruncate(memfd.fd, size)
        assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:  # F_SEAL_SEAL: the seals cannot be loosened or added to
        fcntl.fcntl(
            memfd.fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_FUTURE_WRITE if hasattr(fcntl, "F_SEAL_FUTURE_WRITE") else 0x10,
        )
    assert e.value.errno == errno.EPERM
    assert os.pread(memfd.fd, SIZE, 0) == b"\xff" * SIZE


def test_a_writable_shared_mapping_is_refused_with_eperm(memfd):
    with pytest.raises(OSError) as e:
        mmap_raw(0, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.fd)
    assert e.value.errno == errno.EPERM


def test_a_read_only_shared_mapping_cannot_be_made_writable(memfd):
    addr = mmap_raw(0, SIZE, PROT_READ, MAP_SHARED, memfd.fd)
    try:
        # The kernel cleared VM_MAYWRITE on this mapping (the file is write-sealed): mprotect refuses
        # with EACCES, mm/mprotect.c: "if ((newflags & ~(newflags >> 4)) & VM_ACCESS_FLAGS) -> -EACCES".
        with pytest.raises(OSError) as e:
            mprotect_raw(addr, SIZE, PROT_READ | PROT_WRITE)
        assert e.value.errno == errno.EACCES
    finally:
        munmap_raw(addr, SIZE)


def test_a_private_copy_does_not_reach_the_file(memfd):
    addr = mmap_raw(0, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, memfd.fd)
    try:
        import ctypes

        ctypes.memset(addr, 0, 16)
    finally:
        munmap_raw(addr, SIZE)
    assert os.pread(memfd.fd, 16, 0) == b"\xff" * 16


def test_bad_sizes_and_fills_are_refused():
    with pytest.raises(ValueError):
        SealedFillMemfd(1000)
    with pytest.raises(ValueError):
        SealedFillMemfd(4096, 256)
