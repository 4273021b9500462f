"""Host bridge BAR windows: inside the aperture, clear of every ECAM window and of each other."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.acpi import MmioWindow
from pcihole.acpi.pci_windows import (
    DEFAULT_APERTURE_BASE,
    DEFAULT_APERTURE_END,
    allocate_mem64_windows,
    allocate_windows,
    carve,
)
from tests.acpi.acpi_helpers import Seg

MiB = 1 << 20


def ecam(seg: Seg) -> tuple[int, int]:
    return seg.ecam_base + seg.start_bus * MiB, seg.ecam_base + (seg.end_bus + 1) * MiB - 1


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _segment(i, mib, buses):
    first, last = sorted(buses)
    return Seg(i, mib * MiB, first, last)


segments_strategy = st.lists(
    st.builds(
        _segment,
        st.integers(0, 0xFFFF),
        st.integers(0, 4095),
        st.tuples(st.integers(0, 255), st.integers(0, 255)),
    ),
    max_size=12,
    unique_by=lambda s: s.id,
)


@given(segments_strategy)
def test_windows_stay_clear(segments):
    windows = allocate_windows(segments)
    assert len(windows) == len(segments)
    given_ = [w for w in windows if w is not None]
    # Every window present comes first, all of one power-of-two size, naturally aligned.
    assert windows[: len(given_)] == given_
    assert len({w.size for w in given_}) <= 1
    for w in given_:
        assert w.size >= MiB and w.size & (w.size - 1) == 0 and w.base % w.size == 0
        assert w.base >= DEFAULT_APERTURE_BASE and w.last < DEFAULT_APERTURE_END
        assert not any(overlaps((w.base, w.last), ecam(s)) for s in segments)
    spans = sorted((w.base, w.last) for w in given_)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_one_segment_gets_the_classic_hole():
    assert allocate_windows([Seg(0, 0xE0000000, 0, 255)]) == [MmioWindow(0xC0000000, 0x20000000)]


def test_synthetic_four_segments():
    # pci/synthetic.py puts 16-bus segments at 0xE0000000, 0xD0000000, 0xC0000000, 0xB0000000.
    segments = [
        Seg(i, base, 0, 15) for i, base in enumerate([0xE0000000, 0xD0000000, 0xC0000000, 0xB0000000])
    ]
    assert allocate_windows(segments) == [
        MmioWindow(base, 128 * MiB) for base in (0xC8000000, 0xD8000000, 0xE8000000, 0xF0000000)
    ]


def test_windows_bigger_than_the_aperture_allows_none():
    full = [Seg(0, 0xC0000000, 0, 255)]
    assert allocate_windows(full, MmioWindow(0xC0000000, 0x10000000)) == [None]
    # Two 1 MiB gaps for three segments: the first two get one each.
    aperture = MmioWindow(0xC0000000, 4 * MiB)
    segs = [Seg(0, 0xC0100000, 0, 0), Seg(1, 0xC0300000, 0, 0), Seg(2, 0xE0000000, 0, 0)]
    assert allocate_windows(segs, aperture) == [
        MmioWindow(0xC0000000, MiB),
        MmioWindow(0xC0200000, MiB),
        None,
    ]


@pytest.mark.parametrize(
    "aperture", [MmioWindow(0xFFF00000, 2 * MiB), MmioWindow(0, 0), MmioWindow(-MiB, 2 * MiB)]
)
def test_aperture_must_be_below_4_gib(aperture):
    with pytest.raises(ValueError, match="aperture"):
        allocate_windows([Seg(0, 0xE0000000, 0, 0)], aperture)


# --- expanders' blocks and 64-bit windows sized by need ----------------------------------------------

GiB = 1 << 30


def test_carve_takes_blocks_from_the_top_and_leaves_the_rest():
    window = MmioWindow(0xC0000000, 0x20000000)
    carved = carve(window, [0x800000, 0, 0x2000000], None, "32-bit memory")
    # Largest first from the top, each aligned to its size; the main root bus keeps the bottom.
    assert carved.blocks == (MmioWindow(0xDD800000, 0x800000), None, MmioWindow(0xDE000000, 0x2000000))
    assert carved.free == (MmioWindow(0xC0000000, 0x1D800000),)


@given(st.lists(st.integers(0, 12), max_size=6), st.integers(0, 3))
def test_carved_blocks_and_free_ranges_tile_the_window(orders, io_units):
    window = MmioWindow(0x1000, 0xF000)
    sizes = [(1 << o) * 0x100 if o else 0 for o in orders]
    sizes = [(s + 0xFFF) // 0x1000 * 0x1000 for s in sizes]
    try:
        carved = carve(window, sizes, 0x1000, "I/O")
    except ValueError as e:
        assert "I/O" in str(e) and sum(sizes) > 0
        return
    pieces = sorted([b for b in carved.blocks if b is not None] + list(carved.free), key=lambda w: w.base)
    assert pieces[0].base == window.base and pieces[-1].last == window.last
    assert all(a.last + 1 == b.base for a, b in zip(pieces, pieces[1:], strict=False))
    assert [b.size if b else 0 for b in carved.blocks] == sizes
    assert all(b.base % 0x1000 == 0 for b in carved.blocks if b)


def test_carve_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"need 0x2000 bytes of I/O space"):
        carve(MmioWindow(0x1000, 0x1000), [0x2000], 0x1000, "I/O")
    with pytest.raises(ValueError, match="no 32-bit memory window"):
        carve(None, [0x100000], None, "32-bit memory")


def test_mem64_windows_grow_to_what_a_segment_needs():
    # No need beyond the share: the equal split of [256 GiB, 512 GiB), as before.
    assert allocate_mem64_windows(2, [0, 1 << 20]) == [
        MmioWindow(256 * GiB, 128 * GiB),
        MmioWindow(384 * GiB, 128 * GiB),
    ]
    # A GPU server's 1664 GiB: a naturally aligned 2 TiB block, placed first; the other keeps its share.
    big, small = allocate_mem64_windows(2, [1664 * GiB, 0])
    assert big == MmioWindow(2048 * GiB, 2048 * GiB)
    assert small is not None and small.size == 128 * GiB and small.base >= big.base + big.size
    with pytest.raises(ValueError, match="52 physical address bits"):
        allocate_mem64_windows(1, [1 << 52])
