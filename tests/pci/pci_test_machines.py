"""Small machines for the PCI tests, built from specs (no machine file involved)."""

from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import BarSpec, EndpointSpec, RootPortSpec, Segment, Topology

ECAM_BASE = 0xE0000000


def bdf(text: str) -> Bdf:
    return Bdf.parse(text)


def small_topology(writes: str = "discard", fill: int = 0xFF) -> Topology:
    """Host bridge, two root ports (buses 1 and 2-3), a NIC below the first, a 2-function device on bus 0."""
    return Topology(
        segments=(Segment(0, ECAM_BASE, 0, 255, fill=fill, writes=writes),),
        root_ports=(
            RootPortSpec(bdf("0000:00:01.0"), secondary=1, subordinate=1),
            RootPortSpec(bdf("0000:00:01.1"), secondary=2, subordinate=3),
        ),
        endpoints=(
            EndpointSpec(
                bdf("0000:01:00.0"),
                0x1AF4,
                0x1041,
                0x020000,
                revision=1,
                bars=(BarSpec(1, "mem32", 0x1000), BarSpec(4, "mem64", 0x4000, prefetchable=True)),
            ),
            EndpointSpec(bdf("0000:00:1f.0"), 0x8086, 0x2918, 0x060100),
            EndpointSpec(bdf("0000:00:1f.3"), 0x8086, 0x2930, 0x0C0500, bars=(BarSpec(4, "io", 0x20),)),
        ),
    )


def gpa(text: str, register: int = 0, base: int = ECAM_BASE) -> int:
    b = bdf(text)
    return base + (b.bus << 20 | b.device << 15 | b.function << 12 | register)
