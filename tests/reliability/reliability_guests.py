"""Shared pieces of the reliability tests: tiny PVH kernels built on the fly, machines from TOML text,
and the check that the ro-alias fill memfd is still sealed and still all fill bytes.

Kernels are flat code assembled with tests/guestasm.py at 1 MiB, wrapped in an ELF with a Xen
PHYS32_ENTRY note by tests/boot/elfimages.py, so `build_machine` loads them like any PVH kernel.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from boot.elfimages import ELFCLASS32, PF_R, PF_W, PF_X, PT_LOAD, Part, build, phys32_note
from guestasm import assemble
from pcihole.hv import kvm_available
from pcihole.machine.builder import build_machine
from pcihole.machine.machinefile import MachineFile, loads

KERNEL_GPA = 0x100000
KVM_UNAVAILABLE = kvm_available()

# What each backend can express (DESIGN.md "Strategies").
STRATEGIES_BY_BACKEND = {
    "kvm": ("exit", "ro-filled", "ro-alias"),
    "model": ("exit", "ro-filled", "ro-alias", "native", "mmio-bus"),
}
BACKEND_STRATEGIES = [
    pytest.param(b, s, id=f"{b}-{s}", marks=[pytest.mark.kvm] if b == "kvm" else [])
    for b, strategies in STRATEGIES_BY_BACKEND.items()
    for s in strategies
]
ALL_COMBINATIONS = [(b, s) for b, strategies in STRATEGIES_BY_BACKEND.items() for s in strategies]


def pvh_kernel(code: bytes, *, bss: int = 0) -> bytes:
    """A PVH ELF whose one segment is `code` at 1 MiB (plus `bss` zero bytes), entered at its start."""
    load = Part(PT_LOAD, KERNEL_GPA, code, memsz=len(code) + bss, flags=PF_R | PF_W | PF_X, align=0x1000)
    return build([load, phys32_note(KERNEL_GPA)], elf_class=ELFCLASS32, entry=KERNEL_GPA).data


def pvh_kernel_from_asm(source: str, *, bits: int = 32) -> bytes:
    return pvh_kernel(assemble(source, bits=bits, org=KERNEL_GPA))


def machine(toml: str, backend: str, strategy: str, kernel: bytes, name: str = "test-kernel"):
    """build_machine for a machine given as TOML text; skips kvm cases where /dev/kvm cannot be opened."""
    if backend == "kvm" and KVM_UNAVAILABLE is not None:
        pytest.skip(f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    spec: MachineFile = loads(toml, f"<{name}.toml>")
    return build_machine(spec, backend=backend, strategy=strategy, kernel=kernel, kernel_name=name)


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
