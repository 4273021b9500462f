"""Guest-physical address math (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.memory.address import (
    ADDRESS_LIMIT,
    LAST_ADDRESS,
    AddressOverflow,
    GuestAddress,
    GuestRange,
    align_up,
    page_range,
)

addresses = st.integers(0, LAST_ADDRESS)


def test_a_range_may_end_at_the_last_byte_of_the_address_space():
    r = GuestRange.from_size(0xFFFF_FFFF_FFFF_F000, 0x1000)
    assert r.last == GuestAddress(LAST_ADDRESS)
    assert r.size == 0x1000
    assert r.end == ADDRESS_LIMIT
    assert str(r) == "[0xfffffffffffff000, 0xffffffffffffffff]"
    assert GuestRange(0, LAST_ADDRESS).size == 2**64


def test_checked_arithmetic_refuses_to_wrap():
    with pytest.raises(AddressOverflow):
        GuestAddress(LAST_ADDRESS).checked_add(1)
    with pytest.raises(AddressOverflow):
        GuestAddress(0).checked_sub(1)
    with pytest.raises(AddressOverflow):
        GuestRange.from_size(0xFFFF_FFFF_FFFF_F000, 0x2000)
    with pytest.raises(AddressOverflow):
        GuestAddress(2**64)
    with pytest.raises(AddressOverflow):
        GuestAddress(LAST_ADDRESS).align_up(0x1000)
    assert GuestAddress(LAST_ADDRESS - 1).checked_add(1).value == LAST_ADDRESS


def test_ranges_refuse_empty_and_take_inclusive_bounds():
    with pytest.raises(ValueError, match="empty range"):
        GuestRange(0x2000, 0x1FFF)
    with pytest.raises(ValueError):
        GuestRange.from_size(0x1000, 0)
    assert GuestRange(5, 5).size == 1
    assert GuestRange.from_bounds(0x1000, 0x3000) == GuestRange(0x1000, 0x2FFF)


def test_alignment_and_pages():
    assert GuestAddress(0x1234).align_down(0x1000) == GuestAddress(0x1000)
    assert GuestAddress(0x1234).align_up(0x1000) == GuestAddress(0x2000)
    assert page_range(0xE0008004) == GuestRange(0xE0008000, 0xE0008FFF)
    assert GuestRange(0x800, 0x2FFF).page_interior() == GuestRange(0x1000, 0x2FFF)
    assert GuestRange(0x800, 0xFFF).page_interior() is None
    assert GuestRange(0, LAST_ADDRESS).page_interior() == GuestRange(0, LAST_ADDRESS)
    with pytest.raises(ValueError):
        GuestAddress(1).align_down(3)


@given(addresses, addresses, addresses, addresses)
def test_subtract_and_intersection_partition_the_range(a, b, c, d):
    r = GuestRange(min(a, b), max(a, b))
    o = GuestRange(min(c, d), max(c, d))
    parts = r.subtract(o)
    inter = r.intersection(o)
    total = sum(p.size for p in parts) + (inter.size if inter else 0)
    assert total == r.size
    for p in parts:
        assert r.covers(p) and not p.overlaps(o)
    assert (inter is not None) == r.overlaps(o) == o.overlaps(r)


@given(addresses, st.integers(1, 2**40), st.integers(1, 2**36))
def test_split_covers_the_range_with_pieces_no_larger_than_asked(start, size, piece):
    size = min(size, ADDRESS_LIMIT - start)
    r = GuestRange.from_size(start, size)
    pieces = r.split(piece) if size // piece < 10_000 else r.split(size)
    assert pieces[0].start == r.start and pieces[-1].last == r.last
    assert sum(p.size for p in pieces) == r.size
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.end == b.start.value


def test_addresses_are_ordered_values_usable_as_ints():
    assert GuestAddress(1) < GuestAddress(2)
    assert hex(GuestAddress(0x1000)) == "0x1000"
    assert {GuestAddress(3), GuestAddress(3)} == {GuestAddress(3)}
    assert 0x1000 in GuestRange(0, 0x1FFF)
    assert GuestAddress(0x1000) in GuestRange(0, 0x1FFF)
    assert 0x2000 not in GuestRange(0, 0x1FFF)
    with pytest.raises(TypeError):
        GuestAddress(1.5)  # type: ignore[arg-type]


@given(st.integers(0, 2**70), st.integers(1, 2**40))
def test_align_up_gives_the_first_multiple_at_or_above_the_value(value, alignment):
    # Any positive alignment (the PCI and ACPI window code's), not only powers of two, and past 2**64.
    aligned = align_up(value, alignment)
    assert aligned % alignment == 0 and value <= aligned < value + alignment


def test_align_up_refuses_an_alignment_that_is_not_positive():
    with pytest.raises(ValueError, match="alignment must be positive, not 0"):
        align_up(5, 0)
