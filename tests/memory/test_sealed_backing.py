"""Hole contract 4 on every strategy: the hole's backing cannot be modified, not by the guest and not by
a bug in the VMM. For each strategy's host memory behind a hole, making it writable (mprotect) and
writing it through /proc/self/mem (which ignores page protections of private mappings: FOLL_FORCE)
must fail, and the guest must still read the fill. Strategies with no backing (exit, native,
mmio-bus) have nothing to attack; the guest's read is still checked."""

from __future__ import annotations

import ctypes
import errno

import pytest

from pcihole.host.mman import PAGE_SIZE, PROT_READ, PROT_WRITE, mprotect_raw
from pcihole.machine.builder import build_machine
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import loads
from tests.backends import BACKEND_STRATEGIES
from tests.guest_runner import pvh_kernel_from_asm

ECAM_BASE = 0xE0000000
ABSENT = ECAM_BASE + (1 << 20)  # bus 1, device 0: no function there
MACHINE = f'[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = {ECAM_BASE:#x}\nbuses = "0-15"\n'
#: Strategies whose holes are backed by host memory (the others have none to seal).
BACKED = {"ro-filled", "ro-alias"}


def reader_kernel() -> bytes:
    """Reads the absent function's vendor/device dword; debug-exit status 0 if all-ones, else 1."""
    return pvh_kernel_from_asm(
        f"mov ${ABSENT:#x}, %esi\nmov (%esi), %eax\ncmp $0xffffffff, %eax\njne 1f\n"
        "mov $0, %al\nout %al, $0xf4\nhlt\n1: mov $1, %al\nout %al, $0xf4\nhlt\n"
    )


def backing_hva(memory, gpa: int) -> int | None:
    """The host address behind guest address `gpa` in the slot that maps it, or None (no backing)."""
    for spec in memory.slot_table.values():
        if spec.range.start.value <= gpa <= spec.range.last.value and spec.hva:
            return spec.hva + (gpa - spec.range.start.value)
    return None


def attack(hva: int) -> list[str]:
    """Try to change the backing page at `hva` as a buggy VMM could; returns what succeeded."""
    page = hva & ~(PAGE_SIZE - 1)
    succeeded = []
    try:
        mprotect_raw(page, PAGE_SIZE, PROT_READ | PROT_WRITE)
    except OSError as e:
        assert e.errno in (errno.EACCES, errno.EPERM), e
    else:
        succeeded.append("mprotect(PROT_WRITE)")
        ctypes.memset(hva, 0, 4)  # the bug: a stray write through the now-writable mapping
    try:
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(hva)
            mem.write(b"\x00\x00\x00\x00")
    except OSError:
        pass
    else:
        succeeded.append("write to /proc/self/mem")
    return succeeded


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_the_hole_backing_cannot_be_modified(backend, strategy):
    spec = loads(MACHINE, "<sealed.toml>")
    with build_machine(
        spec, backend=backend, strategy=strategy, kernel=reader_kernel(), kernel_name="k"
    ) as m:
        hva = backing_hva(m.memory, ABSENT)
        assert (hva is not None) == (strategy in BACKED), hva
        succeeded = attack(hva) if hva is not None else []
        result = m.run(timeout=60)
        if hva is not None:
            assert ctypes.string_at(hva, 4) == b"\xff" * 4
    assert succeeded == [], f"{strategy}: the hole's backing could be changed by {', '.join(succeeded)}"
    assert (result.stop.reason, result.stop.status) == (StopReason.DEBUG_EXIT, 0), "the guest read no fill"
