"""The config-page mirror's memfd cannot change size: sealed F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL.

A shrink would leave the read-only memslots over mirror pages pointing past the end of the file (a
SIGBUS in the VMM, a fault in KVM). The VMM still writes the pages (a function's config space is its
page), so F_SEAL_WRITE is not there, and F_SEAL_SEAL keeps anyone from adding it later.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from pcihole.pci.config_mirror import ConfigMirror
from pcihole.pci.host_bridge import HostBridge
from tests.pci.pci_test_machines import gpa, small_topology


@pytest.fixture
def mirror():
    bridge = HostBridge(small_topology())
    bridge.use_mirrors()
    try:
        yield bridge, bridge._mirror
    finally:
        bridge.close_mirrors()


def _errno_of(call, *args) -> int:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def test_the_mirror_cannot_shrink_grow_or_change_its_seals(mirror):
    _, m = mirror
    assert isinstance(m, ConfigMirror)
    seals = fcntl.fcntl(m.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    assert not seals & fcntl.F_SEAL_WRITE
    assert _errno_of(os.ftruncate, m.fd, m.size - 4096) == errno.EPERM
    assert _errno_of(os.ftruncate, m.fd, m.size + 4096) == errno.EPERM
    assert _errno_of(os.pwrite, m.fd, b"x", m.size) == errno.EPERM  # a write past the end grows it
    assert _errno_of(fcntl.fcntl, m.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE) == errno.EPERM
    assert os.fstat(m.fd).st_size == m.size


def test_the_vmm_still_writes_a_function_page_through_the_mirror(mirror):
    bridge, m = mirror
    page = gpa("0000:01:00.0")
    before = bytes(m.page(page)[0x3C:0x3D])
    bridge.mmio_write(page + 0x3C, b"\x5a")  # Interrupt Line: a plain read-write register
    assert bytes(m.page(page)[0x3C:0x3D]) == b"\x5a" != before
    assert os.pread(m.fd, 1, m.offset(page) + 0x3C) == b"\x5a"  # the file's own bytes changed
