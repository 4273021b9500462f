"""Topology validation (one problem, one line) and the synthetic generator for tests and benchmarks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcihole.pci import synthetic
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import BarSpec, EndpointSpec, RootPortSpec, Segment, Topology, TopologyError
from tests.pci.pci_test_machines import bdf

SEG0 = Segment(0, 0xE0000000)


def ep(text, **kw):
    return EndpointSpec(bdf(text), kw.pop("vendor", 0x1AF4), 0x1041, 0x020000, **kw)


@pytest.mark.parametrize(
    "topology,message",
    [
        (Topology(()), "the machine has no segment"),
        (Topology((SEG0, Segment(0, 0xD0000000))), "segment 0: duplicate segment id"),
        (Topology((Segment(0, 0xE8000000),)), "segment 0: ecam_base 0xe8000000 is not aligned to 256 MiB"),
        (
            Topology((Segment(0, 0xE0800000, 0, 15),)),
            "segment 0: ecam_base 0xe0800000 is not aligned to 16 MiB",
        ),
        (Topology((Segment(0, 0x100000000),)), "is not below 4 GiB"),
        (Topology((Segment(0, 0x110000000, 0, 15),)), "is not below 4 GiB"),
        (
            Topology((SEG0, Segment(1, 0xE0000000, 0, 15))),
            "segment 1: ECAM window [0xe0000000, 0xe0ffffff] overlaps segment 0's [0xe0000000, 0xefffffff]",
        ),
        (Topology((Segment(0, 0xE0000000, 9, 3),)), "bus range 9-3 is empty"),
        (Topology((Segment(0, 0xE0000000, fill=256),)), "fill 0x100 is outside"),
        (
            Topology((Segment(0, 0xE0000000, writes="drop"),)),
            "writes 'drop' is not one of discard, trap, exit",
        ),
        (Topology((SEG0,), endpoints=(ep("0000:00:00.0"),)), "endpoint 0000:00:00.0: duplicate BDF"),
        (Topology((SEG0,), endpoints=(ep("0000:00:03.0"), ep("0000:00:03.0"))), "duplicate BDF"),
        (Topology((SEG0,), endpoints=(ep("0001:00:03.0"),)), "segment 1 is not declared"),
        (
            Topology((Segment(0, 0xE0000000, 0, 3),), endpoints=(ep("0000:05:00.0"),)),
            "endpoint 0000:05:00.0: bus 5 is outside segment 0's buses 0-3",
        ),
        (
            Topology((SEG0,), endpoints=(ep("0000:05:00.0"),)),
            "endpoint 0000:05:00.0: bus 5 is reached by no bridge",
        ),
        (
            Topology((SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 1, 3),), (ep("0000:02:00.0"),)),
            "bus 2 is behind root port 0000:00:01.0 but only its secondary bus 1 holds devices",
        ),
        (
            Topology((SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 1, 1),), (ep("0000:01:02.0"),)),
            "device 2 below root port 0000:00:01.0: a PCIe link reaches only device 0",
        ),
        (
            Topology((SEG0,), endpoints=(ep("0000:00:03.2"),)),
            "endpoint 0000:00:03.2: function 0 of its device is missing",
        ),
        (
            Topology(
                (SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 1, 4), RootPortSpec(bdf("0000:00:02.0"), 4, 5))
            ),
            "root port 0000:00:02.0: buses 4-5 overlap root port 0000:00:01.0's buses 1-4",
        ),
        (Topology((SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 0, 0),)), "needs bus 0 < secondary (0)"),
        (Topology((SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 3, 2),)), "<= subordinate (2)"),
        (
            Topology(
                (SEG0,), (RootPortSpec(bdf("0000:00:01.0"), 1, 1), RootPortSpec(bdf("0000:01:00.0"), 2, 2))
            ),
            "root port 0000:01:00.0: a root port must be on the root bus 0",
        ),
        (Topology((SEG0,), endpoints=(ep("0000:00:03.0", vendor=0xFFFF),)), "reads as an absent function"),
        (
            Topology((SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(5, "mem64", 4096),)),)),
            "BAR 5: a 64-bit BAR needs two registers",
        ),
        (
            Topology(
                (SEG0,),
                endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "mem64", 4096), BarSpec(1, "mem32", 4096))),),
            ),
            "BAR 1: register 1 is already used by BAR 0",
        ),
        (
            Topology((SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "mem32", 3000),)),)),
            "not a power of two",
        ),
        (
            Topology((SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "mem32", 64),)),)),
            "size 0x40 is outside",
        ),
        (
            Topology((SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "io", 512),)),)),
            "size 0x200 is outside",
        ),
        (Topology((SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "rom", 4096),)),)), "type 'rom'"),
        (
            Topology(
                (SEG0,), endpoints=(ep("0000:00:03.0", bars=(BarSpec(0, "io", 16, prefetchable=True),)),)
            ),
            "an I/O BAR cannot be prefetchable",
        ),
    ],
)
def test_each_problem_has_its_own_one_line_error(topology, message):
    with pytest.raises(TopologyError) as raised:
        topology.validate()
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_valid_multi_segment_topology():
    topology = Topology(
        (Segment(0, 0xE0000000), Segment(1, 0xD0000000, 0, 63), Segment(2, 0xC0000000, 16, 31)),
        (RootPortSpec(bdf("0002:10:01.0"), 17, 17),),
        (ep("0002:11:00.0"), ep("0001:00:05.0")),
    ).validate()
    assert [h.bdf for h in topology.host_bridges()] == [
        bdf("0000:00:00.0"),
        bdf("0001:00:00.0"),
        bdf("0002:10:00.0"),
    ]


@settings(max_examples=40, deadline=None)
@given(
    segments=st.sampled_from([1, 4]),
    buses=st.integers(1, 256),
    data=st.data(),
)
def test_generated_topologies_are_valid_and_exact(segments, buses, data):
    functions = data.draw(st.integers(segments, min(1024, segments * synthetic.capacity(buses))))
    topology = synthetic.generate(functions, buses, segments)
    bridge = HostBridge(topology)
    devices = bridge.devices()
    assert len(devices) == functions == len(bridge.present_pages())
    assert len(topology.segments) == segments
    for segment in topology.segments:
        assert segment.window_size == buses << 20
        assert segment.window_last < 1 << 32
    assert max(d.bdf.bus for d in devices) < buses
    # Every function is found by a Linux-style scan: fn 0 first, others only if fn 0 says multi-function.
    found = set()
    for segment in topology.segments:
        for bus in range(buses):
            for device in range(32):
                base = segment.ecam_base + (bus << 20 | device << 15)
                if bridge.mmio_read_int(base, 4) == 0xFFFFFFFF:
                    continue
                found.add((segment.id, bus, device, 0))
                if bridge.mmio_read_int(base + 0xE, 1) & 0x80:
                    for fn in range(1, 8):
                        if bridge.mmio_read_int(base + (fn << 12), 4) != 0xFFFFFFFF:
                            found.add((segment.id, bus, device, fn))
    assert found == {(d.bdf.segment, d.bdf.bus, d.bdf.device, d.bdf.function) for d in devices}


@pytest.mark.parametrize("args", [(0, 256, 1), (3, 256, 4), (250, 1, 1), (1024, 256, 5), (4, 0, 1)])
def test_generator_refuses_what_does_not_fit(args):
    with pytest.raises(ValueError):
        synthetic.generate(*args)
