"""MemoryMap as a value: overlaps, lookup, punch and fill (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.memory import GuestRange, Hole, MemoryMap, MemoryMapError, Mmio, OverlapError, Ram, Rom

MiB = 1 << 20
ECAM = 0xE0000000


class Fn:
    def read(self, offset, size):
        return bytes(size)

    def write(self, offset, data):
        pass


def base_map() -> MemoryMap:
    return MemoryMap(
        [
            Ram(GuestRange.from_size(0, 16 * MiB), "ram"),
            Rom(GuestRange.from_size(0xFFFF0000, 0x10000), "bios", data=b"\x90" * 16),
            Hole(GuestRange.from_size(ECAM, 256 * MiB), "ecam"),
        ]
    )


def test_overlap_is_refused_naming_both_ranges():
    with pytest.raises(OverlapError) as e:
        base_map().with_regions(Ram(GuestRange.from_size(0xEFFFF000, 0x2000), "oops"))
    msg = str(e.value)
    assert "[0xe0000000, 0xefffffff]" in msg and "[0xeffff000, 0xf0000fff]" in msg
    assert "'ecam'" in msg and "'oops'" in msg


def test_region_at_finds_the_covering_region_by_bisection():
    m = base_map()
    assert m.region_at(0).name == "ram"
    assert m.region_at(16 * MiB - 1).name == "ram"
    assert m.region_at(16 * MiB) is None
    assert m.region_at(ECAM + 0x12345).name == "ecam"
    assert m.region_at(0xFFFFFFFF).name == "bios"
    assert m.region_at(0x1_0000_0000) is None
    assert [r.name for r in m.regions_in(GuestRange(0, 0xFFFFFFFF))] == ["ram", "ecam", "bios"]


def test_region_holding_needs_every_byte_in_one_region():
    m = base_map()
    assert m.region_holding(16 * MiB - 4, 4).name == "ram"
    assert m.region_holding(16 * MiB - 2, 4) is None  # the last two bytes are in no region
    assert m.region_holding(ECAM + 0x12345, 8).name == "ecam"
    assert m.region_holding(ECAM + 256 * MiB - 1, 1).name == "ecam"
    assert m.region_holding(ECAM - 1, 2) is None  # one byte before the hole
    punched = m.punch(GuestRange.from_size(ECAM + 0x8000, 0x1000), Fn(), "fn")
    assert punched.region_holding(ECAM + 0x8FFC, 4).name == "fn"
    assert punched.region_holding(ECAM + 0x8FFE, 4) is None  # across the page and the hole after it


def test_ram_and_rom_must_be_page_aligned_but_holes_need_not():
    with pytest.raises(ValueError, match="not page aligned"):
        Ram(GuestRange(0, 0x17FF))
    Hole(GuestRange(0x800, 0x17FF))
    with pytest.raises(ValueError, match="fill must be a byte"):
        Hole(GuestRange(0, 0xFFF), fill=0x100)
    with pytest.raises(ValueError, match="writes must be one of"):
        Hole(GuestRange(0, 0xFFF), writes="ignore")  # type: ignore[arg-type]


def test_punch_then_fill_gives_back_the_same_map():
    m = base_map()
    fn = Fn()
    p = m.punch_page(ECAM + 0x8000, fn, "00:01.0")
    mmio = p.region_at(ECAM + 0x8123)
    assert (
        isinstance(mmio, Mmio)
        and mmio.handler is fn
        and mmio.range == GuestRange(ECAM + 0x8000, ECAM + 0x8FFF)
    )
    assert p.region_at(ECAM + 0x7FFF).range == GuestRange(ECAM, ECAM + 0x7FFF)
    assert p.region_at(ECAM + 0x9000).range == GuestRange(ECAM + 0x9000, ECAM + 256 * MiB - 1)
    assert len(p) == len(m) + 2
    assert m.region_at(ECAM + 0x8123).name == "ecam"  # the old map is untouched
    assert p.fill_page(ECAM + 0x8000) == m


def test_punch_at_the_edges_of_a_hole_and_errors():
    m = base_map()
    p = m.punch_page(ECAM, Fn()).punch_page(ECAM + 256 * MiB - 0x1000, Fn())
    assert len(p.holes()) == 1
    assert p.fill_page(ECAM).fill_page(ECAM + 256 * MiB - 0x1000) == m
    with pytest.raises(MemoryMapError, match="not inside one hole"):
        m.punch_page(0x1000, Fn())
    with pytest.raises(MemoryMapError, match="not inside one hole"):
        p.punch_page(ECAM, Fn())  # already punched
    with pytest.raises(MemoryMapError, match="not a punched range"):
        m.fill_page(ECAM)


@given(st.lists(st.integers(0, 255), min_size=1, max_size=24, unique=True), st.randoms())
def test_any_punch_and_fill_order_returns_the_original_map(buses, rnd):
    m = base_map()
    pages = [ECAM + (b << 20) + (b % 32 << 15) for b in buses]
    p = m
    for page in pages:
        p = p.punch_page(page, Fn())
    assert len(p.punched()) == len(pages)
    for r in p:  # punched map still covers the whole window without overlap
        assert r.range.start.value >= 0
    assert sum(r.range.size for r in p.regions_in(GuestRange.from_size(ECAM, 256 * MiB))) == 256 * MiB
    rnd.shuffle(pages)
    for page in pages:
        p = p.fill_page(page)
    assert p == m


def test_holes_runs_merge_adjacent_same_fill_only():
    m = MemoryMap(
        [
            Hole(GuestRange.from_size(0x1000, 0x1000), "a"),
            Hole(GuestRange.from_size(0x2000, 0x1000), "b"),
            Hole(GuestRange.from_size(0x3000, 0x1000), "c", fill=0),
            Hole(GuestRange.from_size(0x5000, 0x1000), "d"),
        ]
    )
    assert [[h.name for h in run] for run in m.hole_runs()] == [["a", "b"], ["c"], ["d"]]
