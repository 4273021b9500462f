"""Generated topologies for tests and benchmarks: N functions spread over B buses in S segments.

`generate(functions, buses, segments)` builds a valid `Topology` with exactly `functions` functions
(host bridges included) in `segments` segments of `buses` buses each (buses 0..buses-1):
- segment i has ECAM base 0xE0000000 - i * 256 MiB (256 MiB apart, so each is aligned for any bus
  count, all below 4 GiB: 0xE0000000, 0xD0000000, 0xC0000000, 0xB0000000 for four segments);
- the functions are shared out evenly between segments (the first ones get the remainder);
- in a segment with F functions: the host bridge at 00:00.0, then k = min(buses - 1, 248, (F - 1) // 2)
  root ports packed eight to a device on bus 0 from 00:01.0 (multi-function, as libvirt lays out
  pcie-root-port), port j owning bus j + 1; the remaining endpoints are dealt round-robin to the ports'
  secondary buses as functions 0-7 of device 0 (virtio-net ids), and whatever does not fit there goes
  on bus 0 as Root Complex integrated endpoints in the free slots.
A segment holds at most `capacity(buses)` functions; asking for more raises ValueError.
"""

from __future__ import annotations

from . import ecam
from .bdf import Bdf
from .topology import (
    WRITES_DISCARD,
    EndpointSpec,
    RootPortSpec,
    Segment,
    Topology,
)

FIRST_ECAM_BASE = 0xE0000000
SEGMENT_STRIDE = ecam.SEGMENT_WINDOW_SIZE
FUNCTIONS_PER_DEVICE = ecam.MAX_FUNCTION + 1  # 8
# Devices 1-31 of bus 0, eight functions each: device 0 is left to the host bridge alone.
ROOT_BUS_FREE_SLOTS = ecam.MAX_DEVICE * FUNCTIONS_PER_DEVICE  # 248
SYNTHETIC_VENDOR = 0x1AF4  # virtio
SYNTHETIC_DEVICE = 0x1041  # virtio-net
SYNTHETIC_CLASS = 0x020000


def capacity(buses: int) -> int:
    """The most functions one segment of `buses` buses holds in this layout (2233 for 256 buses)."""
    return 1 + ROOT_BUS_FREE_SLOTS + FUNCTIONS_PER_DEVICE * min(buses - 1, ROOT_BUS_FREE_SLOTS)


def generate(
    functions: int,
    buses: int = ecam.MAX_BUS + 1,
    segments: int = 1,
    *,
    fill: int = 0xFF,
    writes: str = WRITES_DISCARD,
) -> Topology:
    """A valid topology with exactly `functions` functions; see the module docstring for the layout."""
    if not 1 <= segments <= 4:
        raise ValueError(f"segments must be 1 to 4 (all windows below 4 GiB), not {segments}")
    if not 1 <= buses <= ecam.MAX_BUS + 1:
        raise ValueError(f"buses must be 1 to 256, not {buses}")
    if not segments <= functions <= segments * capacity(buses):
        raise ValueError(
            f"{functions} functions do not fit {segments} segment(s) of {buses} bus(es): "
            f"need {segments} to {segments * capacity(buses)}"
        )
    segment_specs = []
    root_ports: list[RootPortSpec] = []
    endpoints: list[EndpointSpec] = []
    for index in range(segments):
        count = functions // segments + (1 if index < functions % segments else 0)
        segment_specs.append(
            Segment(
                id=index,
                ecam_base=FIRST_ECAM_BASE - index * SEGMENT_STRIDE,
                start_bus=0,
                end_bus=buses - 1,
                fill=fill,
                writes=writes,
            )
        )
        ports, eps = _populate(index, count, buses)
        root_ports += ports
        endpoints += eps
    return Topology(tuple(segment_specs), tuple(root_ports), tuple(endpoints)).validate()


def _root_bus_slot(n: int, segment: int) -> Bdf:
    """The n-th free function slot on bus 0 after the host bridge's device 0."""
    device, function = divmod(n, FUNCTIONS_PER_DEVICE)
    return Bdf(segment, 0, device + 1, function)


def _populate(segment: int, count: int, buses: int) -> tuple[list[RootPortSpec], list[EndpointSpec]]:
    remaining = count - 1  # the host bridge is implicit
    port_count = min(buses - 1, ROOT_BUS_FREE_SLOTS, remaining // 2)
    ports = [
        RootPortSpec(_root_bus_slot(j, segment), secondary=j + 1, subordinate=j + 1, name=f"port{j}")
        for j in range(port_count)
    ]
    remaining -= port_count
    endpoints = []
    below = min(remaining, port_count * FUNCTIONS_PER_DEVICE)
    for n in range(below):
        port, function = n % port_count, n // port_count
        endpoints.append(_endpoint(Bdf(segment, port + 1, 0, function)))
    # Functions fill a device's slots in order, so function 0 of each device exists before the others.
    for n in range(remaining - below):
        endpoints.append(_endpoint(_root_bus_slot(port_count + n, segment)))
    return ports, endpoints


def _endpoint(bdf: Bdf) -> EndpointSpec:
    return EndpointSpec(bdf, SYNTHETIC_VENDOR, SYNTHETIC_DEVICE, SYNTHETIC_CLASS, revision=1)
