"""HoleTuning: prefault fills the host page tables of the hole backing when it is mapped (so the
guest's first touch costs no host page fault), and a fixed alias granule sets ro-alias's mappings.
Counted through /proc/self/smaps: the Rss of a mapping is the pages its page tables map."""

from __future__ import annotations

import pytest

from pcihole.hv import open_backend
from pcihole.memory import GuestRange, HoleTuning
from pcihole.memory.region import Hole
from pcihole.memory.strategies import RoAliasStrategy, RoFilledStrategy

MiB = 1 << 20
HOLE = Hole(GuestRange.from_size(0xE0000000, 16 * MiB), "ecam")


def mapped_bytes(addr: int, size: int) -> int:
    """Bytes of [addr, addr + size) that this process's page tables map (smaps Rss, summed over
    the mappings inside the range: each alias mapping's own page table entries)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = addr <= start and end <= addr + size
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def vm():
    hv = open_backend("model")
    vm = hv.create_vm()
    yield hv, vm
    vm.close()
    hv.close()


def alias_arena(hv, vm, tuning: HoleTuning) -> tuple[RoAliasStrategy, int, int]:
    strategy = RoAliasStrategy(hv, vm, tuning=tuning)
    layout = strategy.layout([HOLE], free_slots=16)
    (slot,) = layout.slots
    return strategy, slot.hva, slot.size


@pytest.mark.parametrize("prefault", [True, False])
def test_ro_alias_prefault_maps_every_page_of_the_arena_before_any_touch(vm, prefault):
    strategy, hva, size = alias_arena(*vm, HoleTuning(prefault=prefault))
    try:
        assert mapped_bytes(hva, size) == (size if prefault else 0)
    finally:
        strategy.close()


@pytest.mark.parametrize("prefault", [True, False])
def test_ro_filled_prefault_maps_every_page_of_the_buffer(vm, prefault):
    hv, v = vm
    strategy = RoFilledStrategy(hv, v, tuning=HoleTuning(prefault=prefault))
    try:
        (slot,) = strategy.layout([HOLE], free_slots=16).slots
        assert mapped_bytes(slot.hva, slot.size) == (slot.size if prefault else 0)
    finally:
        strategy.close()


@pytest.mark.parametrize("granule", [4096, 64 * 1024, 2 * MiB])
def test_a_fixed_alias_granule_sets_the_backing_and_the_mappings(vm, granule):
    strategy, hva, size = alias_arena(*vm, HoleTuning(alias_granule=granule))
    try:
        assert size == HOLE.range.size  # one slot over the whole hole: within the mapping budget
        assert strategy.backing_bytes() == granule
        assert strategy.host_mappings() == HOLE.range.size // granule
        assert mapped_bytes(hva, size) == size  # prefault is on by default
    finally:
        strategy.close()
