"""Map changes as memslot diffs, and what a failure leaves behind (pure: a fake VM records the ops).

The fake VM enforces the two kernel rules that shape the operation order: slots may not overlap
(EEXIST, kvm_check_memslot_overlap) and ids must be below KVM_CAP_NR_MEMSLOTS (EINVAL).
"""

from __future__ import annotations

import errno

import pytest

from pcihole.hv.uapi import KvmCap
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap, MemoryUpdateError, PlanError, Ram

MiB = 1 << 20
ECAM = 0xE0000000


class FakeHv:
    name = "fake"
    implements_proposed_abi = False


class FakeVm:
    def __init__(self, nr_memslots: int = 32764) -> None:
        self.nr = nr_memslots
        self.slots: dict[int, tuple[int, int, int, int]] = {}
        self.zones: list[tuple[int, int]] = []
        self.log: list[tuple] = []
        self.fail_at: int | None = None  # fail the n-th mutating call (0-based)
        self.calls = 0

    def check_extension(self, cap: int) -> int:
        return {
            KvmCap.KVM_CAP_NR_MEMSLOTS: self.nr,
            KvmCap.KVM_CAP_READONLY_MEM: 1,
            KvmCap.KVM_CAP_COALESCED_MMIO: 2,
        }.get(cap, 0)

    def _maybe_fail(self, what: str) -> None:
        n = self.calls
        self.calls += 1
        if self.fail_at is not None and n == self.fail_at:
            raise OSError(errno.ENOMEM, f"induced failure of {what}")

    def set_user_memory_region(self, slot, flags, gpa, size, hva):
        self._maybe_fail("set_user_memory_region")
        if slot >= self.nr:
            raise OSError(errno.EINVAL, f"slot {slot}")
        if size == 0:
            if slot not in self.slots:
                raise OSError(errno.EINVAL, f"delete of absent slot {slot}")
            del self.slots[slot]
            self.log.append(("delete", slot, gpa))
            return
        if slot in self.slots:
            raise OSError(errno.EINVAL, "modify")
        for s, (_, g, n, _) in self.slots.items():
            if gpa < g + n and g < gpa + size:
                raise OSError(errno.EEXIST, f"overlaps slot {s}")
        self.slots[slot] = (flags, gpa, size, hva)
        self.log.append(("create", slot, gpa, size))

    def register_coalesced_mmio(self, addr, size, pio=False):
        self._maybe_fail("register_coalesced_mmio")
        self.zones.append((addr, size))
        self.log.append(("zone", addr, size))

    def unregister_coalesced_mmio(self, addr, size, pio=False):
        self._maybe_fail("unregister_coalesced_mmio")
        self.zones = [(a, n) for a, n in self.zones if not (a <= addr and addr + size <= a + n)]
        self.log.append(("unzone", addr, size))


class Fn:
    def read(self, offset, size):
        return bytes(size)

    def write(self, offset, data):
        pass


def make(strategy: str = "ro-alias", **kw) -> tuple[GuestMemory, FakeVm]:
    vm = FakeVm(**kw)
    mem = GuestMemory(FakeHv(), vm, strategy, map_budget=16384)
    mem.update(
        MemoryMap(
            [
                Ram(GuestRange.from_size(0, 2 * MiB), "ram"),
                Hole(GuestRange.from_size(ECAM, 256 * MiB), "ecam"),
            ]
        )
    )
    vm.log.clear()
    return mem, vm


def test_the_same_map_costs_no_operation():
    mem, vm = make()
    mem.update(mem.memory_map)
    assert vm.log == []


def test_a_punch_replaces_only_the_hole_slot_and_its_zone():
    mem, vm = make()
    ram_slot = next(i for i, s in mem.slot_table.items() if s.gpa == 0)
    page = ECAM + 0x10_8000
    mem.punch_page(page, Fn())
    old_hole_slot = next(op[1] for op in vm.log if op[0] == "delete")
    assert vm.log == [
        ("unzone", ECAM, 256 * MiB),
        ("delete", old_hole_slot, ECAM),
        # The larger piece first: the shorter the gap for most of the hole. The deleted slot's id
        # is only released on success (an undo re-creates the slot under its own id).
        ("create", 2, page + 0x1000, ECAM + 256 * MiB - page - 0x1000),
        ("create", 3, ECAM, page - ECAM),
        ("zone", ECAM, page - ECAM),
        ("zone", page + 0x1000, ECAM + 256 * MiB - page - 0x1000),
    ]
    assert ram_slot in vm.slots and vm.slots[ram_slot][1] == 0
    assert len(vm.slots) == 3
    vm.log.clear()
    mem.fill_page(page)
    assert [op[0] for op in vm.log] == ["unzone", "unzone", "delete", "delete", "create", "zone"]
    assert len(vm.slots) == 2 and mem.memory_map.punched() == []


def test_new_slots_that_clash_with_nothing_are_created_before_any_deletion():
    mem, vm = make()
    m = mem.memory_map
    moved = MemoryMap(
        [*(r for r in m if r.name != "ecam"), Hole(GuestRange.from_size(0xB0000000, 256 * MiB), "ecam2")]
    )
    mem.update(moved)
    kinds = [op[0] for op in vm.log if op[0] in ("create", "delete")]
    assert kinds == ["create", "delete"], vm.log


@pytest.mark.parametrize("strategy", ["ro-alias", "ro-filled", "exit"])
def test_a_failure_at_any_step_leaves_the_old_map_and_leaks_nothing(strategy):
    mem, vm = make(strategy)
    before = (dict(vm.slots), list(vm.zones), mem.memory_map, mem.slots.in_use, dict(mem.slot_table))
    backing_before = mem.strategy.host_mappings()
    page = ECAM + 0x10_8000
    n = 0
    while True:
        vm.fail_at, vm.calls = n, 0
        try:
            mem.punch_page(page, Fn())
        except MemoryUpdateError as e:
            assert "the previous map is still in force" in str(e)
            assert isinstance(e.__cause__, OSError)
            assert (
                dict(vm.slots),
                list(vm.zones),
                mem.memory_map,
                mem.slots.in_use,
                dict(mem.slot_table),
            ) == before
            assert mem.strategy.host_mappings() == backing_before
            n += 1
            continue
        break
    assert n >= 3, "the punch should take several operations"
    assert len(mem.memory_map.punched()) == 1


def test_too_many_holes_for_the_memslots_fail_before_any_operation():
    vm = FakeVm(nr_memslots=4)
    mem = GuestMemory(FakeHv(), vm, "ro-alias", map_budget=1000)
    base = MemoryMap([Ram(GuestRange.from_size(0, 2 * MiB), "ram")])
    mem.update(base)
    vm.log.clear()
    holes = [Hole(GuestRange.from_size(ECAM + i * 2 * MiB, MiB), f"h{i}") for i in range(4)]
    with pytest.raises(PlanError, match="need 4 memslots but only 3 are free"):
        mem.update(base.with_regions(*holes))
    assert vm.log == [] and mem.memory_map == base and mem.strategy.host_mappings() == 0


def test_failure_frees_new_ram_backing():
    mem, vm = make()
    vm.fail_at, vm.calls = 0, 0
    with pytest.raises(MemoryUpdateError):
        mem.update(mem.memory_map.with_regions(Ram(GuestRange.from_size(0x1000_0000, MiB), "more")))
    assert len(mem._backings) == 1  # only the original RAM
