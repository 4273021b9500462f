"""ECAM routing: present functions, the hole (fill bytes), accesses that cross between them, counters."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pcihole.pci.bdf import Bdf
from pcihole.pci.host_bridge import EcamAccessError, HostBridge
from pcihole.pci.topology import EndpointSpec, Segment, Topology
from tests.pci.pci_test_machines import ECAM_BASE, gpa, small_topology


def expected_bytes(bridge: HostBridge, address: int, size: int) -> bytes:
    """Byte by byte, independently of the access splitting: the function's byte or the fill byte."""
    out = bytearray()
    for a in range(address, address + size):
        segment = bridge.segment_at(a)
        offset = a - segment.ecam_base
        bdf = Bdf(segment.id, offset >> 20, (offset >> 15) & 31, (offset >> 12) & 7)
        fn = bridge.function(bdf)
        out.append(segment.fill if fn is None else fn.config.data[offset & 0xFFF])
    return bytes(out)


def test_absent_function_reads_all_ones_at_every_size(bridge):
    for size in (1, 2, 4, 8):
        assert bridge.mmio_read(gpa("0000:00:05.0"), size) == b"\xff" * size
        assert bridge.mmio_read(gpa("0000:ff:1f.7", 0xFF8), size) == b"\xff" * size


def test_vendor_probe_distinguishes_present_and_absent(bridge):
    # pci_bus_generic_read_dev_vendor_id(): one 32-bit read at offset 0.
    assert bridge.mmio_read_int(gpa("0000:01:00.0"), 4) == 0x10411AF4
    assert bridge.mmio_read_int(gpa("0000:01:01.0"), 4) == 0xFFFFFFFF
    assert bridge.mmio_read_int(gpa("0000:00:1f.1"), 4) == 0xFFFFFFFF  # hole inside a multi-function device


def test_qword_read_is_two_dwords(bridge):
    value = bridge.mmio_read_int(gpa("0000:01:00.0"), 8)
    assert value & 0xFFFFFFFF == bridge.mmio_read_int(gpa("0000:01:00.0"), 4)
    assert value >> 32 == bridge.mmio_read_int(gpa("0000:01:00.0", 4), 4)


def test_access_crossing_from_a_function_into_the_hole_gives_each_byte_its_value(bridge):
    # 00:00.0 is present, 00:00.1 is not: the last 2 bytes of one page, the first 2 of the next.
    data = bridge.mmio_read(gpa("0000:00:00.0", 0xFFE), 4)
    assert data == bytes(2) + b"\xff\xff"
    # And from the hole into a function: 00:1e.7 absent, 00:1f.0 present (vendor 0x8086 at its start).
    data = bridge.mmio_read(gpa("0000:00:1e.7", 0xFFC), 8)
    assert data == b"\xff" * 4 + bytes.fromhex("86801829")


def test_fill_value_is_per_segment():
    topology = Topology(
        (Segment(0, ECAM_BASE, fill=0xFF), Segment(1, 0xD0000000, 0, 15, fill=0x00)),
        endpoints=(EndpointSpec(Bdf(1, 0, 2, 0), 0x1AF4, 0x1042, 0x010000),),
    )
    bridge = HostBridge(topology)
    assert bridge.mmio_read(0xD0000000 + (3 << 15), 4) == bytes(4)
    assert bridge.mmio_read(ECAM_BASE + (3 << 15), 4) == b"\xff" * 4
    assert bridge.mmio_read_int(0xD0000000 + (2 << 15), 4) == 0x10421AF4


@settings(max_examples=300)
@given(
    st.sampled_from([gpa("0000:00:00.0"), gpa("0000:00:1f.0"), gpa("0000:01:00.0"), gpa("0000:00:1e.7")]),
    st.integers(-8, 4096),
    st.integers(1, 8),
)
def test_every_byte_of_any_access_is_right(page, delta, size):
    bridge = HostBridge(small_topology())
    address = page + delta
    assume(address >= ECAM_BASE)
    assert bridge.mmio_read(address, size) == expected_bytes(bridge, address, size)


@settings(max_examples=200)
@given(st.integers(0xFF0, 0x1010), st.integers(1, 8), st.binary(min_size=8, max_size=8))
def test_writes_change_present_bytes_through_masks_and_never_the_hole(offset, size, payload):
    bridge = HostBridge(small_topology())
    base = gpa("0000:00:1f.0")  # 00:1f.0 present; its neighbour 00:1f.1 absent
    address = base - 0x1000 + offset
    data = payload[:size]
    before = {a: expected_bytes(bridge, a, 1) for a in range(address - 4, address + size + 4)}
    masks = {}
    for a in range(address, address + size):
        fn = bridge.function(Bdf(0, 0, ((a - ECAM_BASE) >> 15) & 31, ((a - ECAM_BASE) >> 12) & 7))
        masks[a] = (
            None if fn is None else (fn.config.writable[a & 0xFFF], fn.config.write_1_to_clear[a & 0xFFF])
        )
    bridge.mmio_write(address, data)
    for a, old in before.items():
        now = expected_bytes(bridge, a, 1)
        if a not in masks or masks[a] is None:
            assert now == old  # outside the access, or in the hole
        else:
            rw, w1c = masks[a]
            value = data[a - address]
            assert now[0] == ((old[0] & ~rw) | (value & rw)) & ~(value & w1c) & 0xFF


def test_writes_to_absent_functions_are_dropped_and_counted(bridge):
    bridge.mmio_write(gpa("0000:00:05.0", 4), b"\x07\x00")
    assert bridge.mmio_read(gpa("0000:00:05.0", 4), 2) == b"\xff\xff"
    assert bridge.stats.absent_writes == 1
    assert bridge.stats.unsupported_requests == 0  # "discard" logs nothing


def test_counters(bridge):
    bridge.mmio_read(gpa("0000:00:00.0"), 4)
    bridge.mmio_read(gpa("0000:00:02.0"), 4)
    bridge.mmio_read(gpa("0000:00:00.0", 0xFFE), 4)  # half absent
    bridge.mmio_write(gpa("0000:00:00.0", 4), b"\x02\x00")
    assert bridge.stats.config_reads == 3
    assert bridge.stats.absent_reads == 2
    assert bridge.stats.config_writes == 1
    assert bridge.stats.absent_writes == 0


@pytest.mark.parametrize(
    "address,size",
    [
        (ECAM_BASE - 1, 1),
        (ECAM_BASE - 2, 4),
        (ECAM_BASE + (256 << 20) - 2, 4),
        (ECAM_BASE, 0),
        (ECAM_BASE, 9),
    ],
)
def test_accesses_not_inside_a_window_are_refused_without_side_effects(bridge, address, size):
    with pytest.raises(EcamAccessError):
        bridge.mmio_read(address, size)
    with pytest.raises(EcamAccessError):
        bridge.mmio_write(address, b"\x00" * size)
    assert bridge.stats.config_writes == 0


def test_windows_and_present_pages(bridge):
    (segment,) = bridge.segments
    assert (segment.window_base, segment.window_size) == (ECAM_BASE, 256 << 20)
    assert bridge.present_pages() == sorted(
        gpa(x)
        for x in (
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:00:01.1",
            "0000:00:1f.0",
            "0000:00:1f.3",
            "0000:01:00.0",
        )
    )


def test_segment_with_bus_range_not_starting_at_zero():
    # MCFG-style: ecam_base is the address of bus 0 even though the window starts at bus 16.
    topology = Topology((Segment(0, 0xE0000000, 16, 31),))
    bridge = HostBridge(topology)
    (segment,) = bridge.segments
    assert segment.window_base == 0xE0000000 + (16 << 20)
    assert segment.window_size == 16 << 20
    assert bridge.present_pages() == [0xE0000000 + (16 << 20)]  # host bridge at 16:00.0
    assert bridge.mmio_read_int(0xE0000000 + (16 << 20), 4) == 0x00081B36
    with pytest.raises(EcamAccessError):
        bridge.mmio_read(0xE0000000, 4)


@st.composite
def segment_sets(draw: st.DrawFn) -> tuple[Segment, ...]:
    """1 to 8 segments in distinct 256 MiB slots below 4 GiB (a 256-bus window's alignment), each with
    a random bus range, so windows may touch (bus 255 of one slot, bus 0 of the next) but never overlap."""
    slots = draw(st.lists(st.integers(0, 15), min_size=1, max_size=8, unique=True))
    segments = []
    for i, slot in enumerate(slots):
        start = draw(st.integers(0, 255))
        end = draw(st.integers(start, 255))
        segments.append(Segment(i, slot << 28, start, end))
    return tuple(segments)


@settings(max_examples=300)
@given(segment_sets(), st.lists(st.integers(0, (1 << 33) - 1), max_size=20))
def test_segment_at_agrees_with_the_linear_definition(segments, random_gpas):
    bridge = HostBridge(Topology(segments))
    edges = {0, (1 << 32) - 1, 1 << 32, (1 << 64) - 1}
    for s in segments:
        edges |= {s.window_base - 1, s.window_base, s.window_last, s.window_last + 1}
    for address in sorted(edges - {-1}) + random_gpas:
        linear = [s for s in segments if s.window_base <= address <= s.window_last]
        assert bridge.segment_at(address) == (linear[0] if linear else None), hex(address)
