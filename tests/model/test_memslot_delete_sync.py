"""Deleting a slot is synchronous, as KVM_SET_USER_MEMORY_REGION is: once it returns, the VMM may munmap
the slot's host pages at once, while the vCPU keeps running.

The model maps a slot's host pages into Unicorn zero-copy, so a vCPU that went on using its old map
after the delete returned would read unmapped memory (SIGSEGV in emu_start: the soak's ro-filled
crash, when the hot-plug thread freed a hole buffer). The guest below reads two guest-physical
places, one of which a READONLY slot covers at any time, each iteration right after an MMIO read
(so that the rest of that translation block runs after an exit); the host deletes the slot,
munmaps its buffer, and creates it over a fresh buffer at the other place. Every read must return
a backing's fill or the MMIO answer, and nothing may crash.
"""

from __future__ import annotations

import threading
import time

import pytest

from pcihole.host.mman import PROT_READ, HostMapping, mprotect_raw
from pcihole.hv import exits
from pcihole.hv.uapi import KvmMemFlag
from tests.guest_runner import RAM_BYTES, close_run, run_guest

SLOT_SIZE = 0x200000
PLACES = (0x400000, 0x800000)  # where the slot alternates
MMIO_GPA = 0x10000000  # never backed: every read of it exits
MMIO_VALUE = 0x4F494D4D  # the run loop's answer for any MMIO read
BAD = 0x2000  # the guest counts reads that are neither a backing's fill nor MMIO_VALUE
LAST_BAD = 0x2004  # ... and keeps the last such value
READS = 0x2008  # ... and counts iterations
STOP = 0x200C  # the host sets this to end the guest
FILLS = range(0xA1, 0xAF)  # backings are memset to one of these bytes
READONLY = int(KvmMemFlag.KVM_MEM_READONLY)


def _check(reg: str, n: int) -> str:
    """Count `reg` as bad unless it is MMIO_VALUE or four equal bytes within FILLS."""
    return f"""
    cmp ${MMIO_VALUE:#x}, %{reg}
    je ok{n}
    mov %{reg}, %esi
    rol $8, %esi
    cmp %{reg}, %esi
    jne bad{n}
    mov %{reg}, %esi
    and $0xff, %esi
    cmp ${FILLS.start:#x}, %esi
    jb bad{n}
    cmp ${FILLS.stop - 1:#x}, %esi
    jbe ok{n}
bad{n}:
    incl {BAD:#x}
    mov %{reg}, {LAST_BAD:#x}
ok{n}:
"""


GUEST = f"""
loop:
    mov {MMIO_GPA:#x}, %ebx
    mov {PLACES[0]:#x}, %eax
    mov {PLACES[1] + SLOT_SIZE - 4:#x}, %ecx
    mov {PLACES[0] + SLOT_SIZE // 2:#x}, %edx
    mov {PLACES[1]:#x}, %edi
{_check("eax", 0)}{_check("ecx", 1)}{_check("edx", 2)}{_check("edi", 3)}
    incl {READS:#x}
    cmpl $0, {STOP:#x}
    je loop
    hlt
"""


def _backing(fill: int) -> HostMapping:
    """A private buffer filled with `fill` and made read-only, as the ro-filled strategy makes them."""
    mapping = HostMapping.anonymous(SLOT_SIZE, name=f"fill {fill:#x}")
    mapping.write(0, bytes([fill]) * SLOT_SIZE)
    mprotect_raw(mapping.addr, SLOT_SIZE, PROT_READ)
    return mapping


class _Mover:
    """Moves slot 1 between PLACES over a fresh buffer each time, unmapping the old one at once."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.moves = 0
        self.current = _backing(FILLS[0])
        vm.set_user_memory_region(1, READONLY, PLACES[0], SLOT_SIZE, self.current.addr)

    def move(self) -> None:
        self.moves += 1
        self.vm.set_user_memory_region(1, READONLY, PLACES[(self.moves - 1) % 2], 0, 0)
        self.current.close()  # munmap: KVM no longer touches the old hva once the delete returned
        self.current = _backing(FILLS[self.moves % len(FILLS)])
        self.vm.set_user_memory_region(1, READONLY, PLACES[self.moves % 2], SLOT_SIZE, self.current.addr)

    def close(self) -> None:
        self.current.close()


def _read_u32(run, gpa: int) -> int:
    return int.from_bytes(run.ram.read(gpa, 4), "little")


def _start(model_hv):
    assert PLACES[0] >= RAM_BYTES
    run = run_guest(model_hv, GUEST, max_exits=0)
    return run, _Mover(run.vm)


MOVES = 200
#: Only bounds a hang: the tests count work (moves), never time, and a loaded machine only takes
#: longer (test_..._during_an_mmio_exit[3] needs 900 guest iterations: 9 s at a load of 8 on two
#: cores, and it failed when a 60 s bound ended the loop before the 300th move).
HANG_BOUND = 900.0


def test_a_slot_deleted_and_unmapped_by_another_thread_is_never_read_again(model_hv):
    run, mover = _start(model_hv)
    errors: list[BaseException] = []

    def host() -> None:
        try:
            # A number of moves, not a time: a loaded machine takes longer but does the same work.
            deadline = time.monotonic() + HANG_BOUND
            while mover.moves < MOVES and time.monotonic() < deadline:
                mover.move()
                time.sleep(0.0003 * (mover.moves % 3))  # some moves back to back
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            run.ram.write(STOP, (1).to_bytes(4, "little"))

    thread = threading.Thread(target=host, name="memslots")
    thread.start()
    mmio_exits = 0
    try:
        while True:
            exit_ = run.vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            assert exit_ == exits.MmioRead(MMIO_GPA, 4) or (
                isinstance(exit_, exits.MmioRead) and exit_.size == 4
            ), exit_
            mmio_exits += 1
            run.vcpu.complete_read(MMIO_VALUE.to_bytes(4, "little"))
    finally:
        thread.join()
        bad, last_bad, reads = (_read_u32(run, a) for a in (BAD, LAST_BAD, READS))
        close_run(run)
        mover.close()
    assert not errors, errors
    assert bad == 0, f"{bad} reads were neither a backing nor MMIO (last {last_bad:#x})"
    assert mover.moves == MOVES and reads > 0 and mmio_exits > reads


@pytest.mark.parametrize("every", [1, 3])
def test_a_slot_moved_by_the_vcpu_thread_during_an_mmio_exit_is_never_read_again(model_hv, every):
    """The same, with the VMM moving the slot while it handles the MMIO read: the guest resumes in
    the middle of a translation block that goes on to read both places."""
    run, mover = _start(model_hv)
    iterations = 0
    deadline = time.monotonic() + HANG_BOUND
    try:
        while True:  # until the guest halts, after the host set STOP at the 300th move
            assert time.monotonic() < deadline, f"the guest hung after {mover.moves} moves"
            exit_ = run.vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            assert isinstance(exit_, exits.MmioRead) and exit_.size == 4, exit_
            if exit_.addr == MMIO_GPA:
                iterations += 1
                if iterations % every == 0:
                    mover.move()
            if mover.moves >= 300:
                run.ram.write(STOP, (1).to_bytes(4, "little"))
            run.vcpu.complete_read(MMIO_VALUE.to_bytes(4, "little"))
        bad, last_bad = _read_u32(run, BAD), _read_u32(run, LAST_BAD)
    finally:
        close_run(run)
        mover.close()
    assert bad == 0, f"{bad} reads were neither a backing nor MMIO (last {last_bad:#x})"
    assert mover.moves >= 300
