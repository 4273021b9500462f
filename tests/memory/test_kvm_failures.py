"""Induced failures on a real VM: the old map stays in force, no slot leaks (KVM tier)."""

from __future__ import annotations

import errno

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import open_backend
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap, MemoryUpdateError, PlanError, Ram
from tests.backends import BACKENDS
from tests.guest_runner import ECAM, MiB
from tests.memory.fake_function import FakeFunction


def _kernel_slot_ids(vm, candidates) -> set[int]:
    """Which of these slot ids exist in the kernel: deleting an absent slot fails with EINVAL, so
    probe by deleting and re-creating is not possible; instead create a 1-page probe slot at a free
    gpa under each id: EEXIST-free success means the id was free (then delete it again)."""
    present = set()
    probe = HostMapping.anonymous(4096)
    try:
        for sid in candidates:
            try:
                vm.set_user_memory_region(sid, 0, 0x7000_0000, 4096, probe.addr)
            except OSError as e:
                # Re-creating an existing id with another size/hva is a modify -> EINVAL.
                assert e.errno == errno.EINVAL
                present.add(sid)
            else:
                vm.set_user_memory_region(sid, 0, 0x7000_0000, 0, probe.addr)
    finally:
        probe.close()
    return present


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_eexist_midway_leaves_the_old_map_and_no_slot(backend):
    hv = open_backend(backend)
    vm = hv.create_vm()
    squatter = HostMapping.anonymous(4096)
    try:
        mem = GuestMemory(hv, vm, "ro-alias")
        base = MemoryMap(
            [
                Ram(GuestRange.from_size(0, 2 * MiB), "ram"),
                Hole(GuestRange.from_size(ECAM, 128 * MiB), "ecam"),
            ]
        )
        mem.update(base)
        before = dict(mem.slot_table)
        # Someone else's slot (id 100) sits where the grown hole must go. The grown hole's slot
        # overlaps the old hole slot, so it can only be created after that one is deleted: the
        # change fails with EEXIST halfway, after a deletion that the undo must reverse.
        squatter_gpa = ECAM + 200 * MiB
        vm.set_user_memory_region(100, 0, squatter_gpa, 4096, squatter.addr)
        grown = MemoryMap(
            [
                Ram(GuestRange.from_size(0, 2 * MiB), "ram"),
                Hole(GuestRange.from_size(ECAM, 256 * MiB), "ecam"),
            ]
        )
        with pytest.raises(MemoryUpdateError, match="File exists") as e:
            mem.update(grown)
        assert e.value.__cause__.errno == errno.EEXIST
        assert "undid: unzone" in str(e.value) and "delete slot" in str(e.value)
        assert mem.memory_map == base and mem.slot_table == before
        assert mem.slots.in_use == frozenset(before)
        assert _kernel_slot_ids(vm, range(8)) == set(before), "a slot leaked or the old one is gone"
        vm.set_user_memory_region(100, 0, squatter_gpa, 0, squatter.addr)
        mem.update(grown)  # now it works
        assert mem.memory_map == grown and len(mem.slot_table) == len(before)
        mem.close()
    finally:
        vm.close()
        squatter.close()
        hv.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_holes_than_memslots_is_refused_before_touching_the_vm(backend):
    hv = open_backend(backend)
    vm = hv.create_vm()
    try:
        mem = GuestMemory(hv, vm, "ro-alias", nr_memslots=7)
        base = MemoryMap(
            [
                Ram(GuestRange.from_size(0, 2 * MiB), "ram"),
                Hole(GuestRange.from_size(ECAM, 256 * MiB), "ecam"),
            ]
        )
        mem.update(base)
        before = dict(mem.slot_table)
        m = base
        pages = [ECAM + i * 2 * MiB for i in range(1, 7)]
        for p in pages[:-1]:
            m = m.punch_page(p, FakeFunction())
        mem.update(m)  # 1 RAM + 6 hole pieces = 7 slots
        with pytest.raises(PlanError, match="need 7 memslots but only 6 are free"):
            mem.punch_page(pages[-1], FakeFunction())
        assert mem.memory_map == m and len(mem.slot_table) == 7
        assert _kernel_slot_ids(vm, range(10)) == set(mem.slot_table)
        mem.update(base)
        assert mem.slot_table.keys() == before.keys() or len(mem.slot_table) == 2
        mem.close()
    finally:
        vm.close()
        hv.close()
