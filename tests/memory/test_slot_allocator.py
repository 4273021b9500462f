"""Memslot ids (pure)."""

from __future__ import annotations

import pytest

from pcihole.memory.slot_allocator import SlotAllocator, SlotsExhausted


def test_lowest_free_id_first_and_the_limit_holds():
    a = SlotAllocator(3)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(SlotsExhausted, match="all 3 memslots"):
        a.allocate()
    a.release(1)
    assert a.free == 1
    assert a.allocate() == 1
    with pytest.raises(ValueError, match="not allocated"):
        SlotAllocator(3).release(0)
