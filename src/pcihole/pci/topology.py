"""What a machine's PCIe hierarchy is: segments (ECAM windows) and the functions in them, as plain data.

A `Topology` is built from a machine file (`pcihole.machine.machinefile`), by `synthetic.generate`,
or by hand; `validate()` checks it and raises `TopologyError` naming the first problem in one line,
e.g. "endpoint 0000:05:00.0: bus 5 is reached by no bridge". `HostBridge` turns it into devices.

Rules (each checked, with the reason):
- Every segment has an implicit host bridge function at <root bus>:00.0 (1b36:0008, QEMU's gpex
  "PCIe host bridge" ids, class 0x060000), the root bus being the first bus of its range.
- `ecam_base` is the address of bus 0 of the segment, as MCFG's "Base Address" and _CBA are, even when
  the bus range starts later; the window actually decoded is [ecam_base + start_bus MiB, + buses MiB).
  It is aligned to 2^(n+20) bytes where n is the number of bus-number bits (PCIe 6.0 §7.2.2: "the base
  address of the range must be aligned to a 2^(n+20)-byte memory address boundary"), and the window lies
  below 4 GiB (Linux's acpi_mcfg_check_entry() refuses a base at or above 4 GiB without a DMI year
  >= 2010, and we provide no SMBIOS; see research/linux-ecam-boot.md §1.2).
- Root ports sit on their segment's root bus (we model no switches), each owning the bus range
  [secondary, subordinate]; ranges of different ports do not overlap.
- A function is on the root bus or on a root port's secondary bus, and below a root port it is device 0:
  a PCIe link reaches exactly one device and Linux scans only device 0 there (only_one_child() in
  drivers/pci/probe.c). Buses above a port's secondary bus would need a switch, which we do not model.
- Function N > 0 needs function 0 of the same device: Linux stops at an absent function 0
  (pci_scan_slot), so such a function would never be found. Function 0 gets the multi-function bit
  in Header Type when any other function of its device exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from . import ecam
from .bdf import MAX_SEGMENT, Bdf

FOUR_GIB = 1 << 32

WRITES_DISCARD = "discard"  # hole writes change nothing and cost no exit where the backend allows
WRITES_TRAP = "trap"  # the VMM sees every hole write and logs an Unsupported Request (see aer.py)
WRITE_POLICIES = (WRITES_DISCARD, WRITES_TRAP)

HOST_BRIDGE_VENDOR = 0x1B36  # Red Hat, Inc. (QEMU)
HOST_BRIDGE_DEVICE = 0x0008  # QEMU PCIe host bridge (hw/pci-host/gpex.c)
HOST_BRIDGE_CLASS = 0x060000  # bridge, host bridge
ROOT_PORT_VENDOR = 0x1B36
ROOT_PORT_DEVICE = 0x000C  # QEMU pcie-root-port (hw/pci-bridge/gen_pcie_root_port.c)
ROOT_PORT_CLASS = 0x060400  # bridge, PCI-to-PCI bridge, normal decode
QEMU_SUBSYSTEM_VENDOR = 0x1AF4  # QEMU gives every device subsystem 1af4:1100 (pci_default_sub_vendor_id)
QEMU_SUBSYSTEM = 0x1100

BAR_MEM32 = "mem32"
BAR_MEM64 = "mem64"
BAR_IO = "io"
BAR_KINDS = (BAR_MEM32, BAR_MEM64, BAR_IO)
MIN_MEM_BAR = 128  # PCIe 6.0 §7.5.1.2.1: "the minimum memory address range requested by a BAR is 128 bytes"
MIN_IO_BAR = 4
MAX_IO_BAR = 256  # an I/O BAR may not request more than 256 bytes (PCI Local Bus 3.0 §6.2.5.1)
MAX_MEM32_BAR = 1 << 31
MAX_MEM64_BAR = 1 << 63


class TopologyError(ValueError):
    """One problem in a topology, in one line: "<what>: <problem>"."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One PCI segment group: an ECAM window with its hole policy."""

    id: int
    ecam_base: int  # guest-physical address of bus 0 (MCFG Base Address)
    start_bus: int = 0
    end_bus: int = ecam.MAX_BUS
    fill: int = 0xFF  # what every byte of an absent function reads as
    writes: str = WRITES_DISCARD

    @property
    def root_bus(self) -> int:
        return self.start_bus

    @property
    def window_base(self) -> int:
        """Guest-physical address of the first byte decoded (bus start_bus)."""
        return self.ecam_base + (self.start_bus << ecam.BUS_SHIFT)

    @property
    def window_size(self) -> int:
        return (self.end_bus - self.start_bus + 1) << ecam.BUS_SHIFT

    @property
    def window_last(self) -> int:
        """Inclusive last byte of the window."""
        return self.window_base + self.window_size - 1

    @property
    def alignment(self) -> int:
        """2^(n+20): n bus-number bits cover end_bus (at least 1, PCIe 6.0 §7.2.2)."""
        return 1 << (max(1, self.end_bus.bit_length()) + ecam.BUS_SHIFT)

    def has_bus(self, bus: int) -> bool:
        return self.start_bus <= bus <= self.end_bus

    def page_gpa(self, bdf: Bdf) -> int:
        """Guest-physical address of bdf's 4 KiB configuration page."""
        return self.ecam_base + bdf.ecam_offset

    def describe(self) -> str:
        return f"segment {self.id}"


@dataclass(frozen=True, slots=True)
class BarSpec:
    """One Base Address Register of an endpoint; a mem64 BAR also takes register index + 1."""

    index: int
    kind: str
    size: int
    prefetchable: bool = False

    @property
    def indices(self) -> tuple[int, ...]:
        return (self.index, self.index + 1) if self.kind == BAR_MEM64 else (self.index,)


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """A type 0 function. On the root bus it is a Root Complex Integrated Endpoint, below a port an Endpoint."""

    bdf: Bdf
    vendor: int
    device: int
    class_code: int
    revision: int = 0
    subsystem_vendor: int = QEMU_SUBSYSTEM_VENDOR
    subsystem: int = QEMU_SUBSYSTEM
    bars: tuple[BarSpec, ...] = ()
    name: str = ""

    kind = "endpoint"

    def describe(self) -> str:
        return f"endpoint {self.bdf}"


@dataclass(frozen=True, slots=True)
class RootPortSpec:
    """A type 1 function on the root bus with the PCIe capability (Root Port) and AER at 0x100."""

    bdf: Bdf
    secondary: int
    subordinate: int
    vendor: int = ROOT_PORT_VENDOR
    device: int = ROOT_PORT_DEVICE
    physical_slot: int | None = None  # None: the secondary bus number
    name: str = ""

    kind = "root port"
    class_code = ROOT_PORT_CLASS

    @property
    def slot_number(self) -> int:
        return self.secondary if self.physical_slot is None else self.physical_slot

    def describe(self) -> str:
        return f"root port {self.bdf}"


@dataclass(frozen=True, slots=True)
class HostBridgeSpec:
    """The implicit host bridge function at <root bus>:00.0 of a segment."""

    bdf: Bdf
    vendor: int = HOST_BRIDGE_VENDOR
    device: int = HOST_BRIDGE_DEVICE
    class_code: int = HOST_BRIDGE_CLASS
    name: str = "host bridge"

    kind = "host bridge"

    def describe(self) -> str:
        return f"host bridge {self.bdf}"


FunctionSpec = HostBridgeSpec | RootPortSpec | EndpointSpec


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    root_ports: tuple[RootPortSpec, ...] = ()
    endpoints: tuple[EndpointSpec, ...] = ()
    _by_id: dict[int, Segment] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "root_ports", tuple(self.root_ports))
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "_by_id", {s.id: s for s in self.segments})

    # --- queries ----------------------------------------------------------------------------------
    def segment(self, segment_id: int) -> Segment:
        return self._by_id[segment_id]

    def host_bridges(self) -> tuple[HostBridgeSpec, ...]:
        return tuple(HostBridgeSpec(Bdf(s.id, s.root_bus, 0, 0)) for s in self.segments)

    def functions(self) -> Iterator[FunctionSpec]:
        """Every function: host bridges, root ports, endpoints, in that order."""
        yield from self.host_bridges()
        yield from self.root_ports
        yield from self.endpoints

    def bridge_for_bus(self, segment_id: int, bus: int) -> RootPortSpec | None:
        """The root port whose bus range holds `bus` (None on the root bus or where no port reaches)."""
        for port in self.root_ports:
            if port.bdf.segment == segment_id and port.secondary <= bus <= port.subordinate:
                return port
        return None

    def is_multifunction(self, bdf: Bdf) -> bool:
        """Whether bdf's device has more than one function (fn 0 then has the multi-function bit)."""
        return any(
            f.bdf != bdf
            and f.bdf.segment == bdf.segment
            and f.bdf.bus == bdf.bus
            and f.bdf.device == bdf.device
            for f in self.functions()
        )

    def with_function(self, spec: RootPortSpec | EndpointSpec) -> Topology:
        """A new topology with one more function (not validated)."""
        if isinstance(spec, RootPortSpec):
            return Topology(self.segments, (*self.root_ports, spec), self.endpoints)
        return Topology(self.segments, self.root_ports, (*self.endpoints, spec))

    def without_function(self, bdf: Bdf) -> Topology:
        """A new topology without the function at bdf (not validated)."""
        if not any(p.bdf == bdf for p in self.root_ports) and not any(e.bdf == bdf for e in self.endpoints):
            raise TopologyError(f"{bdf}: no such root port or endpoint")
        return Topology(
            self.segments,
            tuple(p for p in self.root_ports if p.bdf != bdf),
            tuple(e for e in self.endpoints if e.bdf != bdf),
        )

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> Topology:
        """Raise TopologyError for the first problem found; return self when there is none."""
        if not self.segments:
            raise TopologyError("the machine has no segment")
        _check_segments(self.segments)
        owners: dict[Bdf, FunctionSpec] = {}
        for spec in self.functions():
            _check_function_fields(spec)
            if spec.bdf.segment not in self._by_id:
                raise TopologyError(f"{spec.describe()}: segment {spec.bdf.segment} is not declared")
            segment = self._by_id[spec.bdf.segment]
            if not segment.has_bus(spec.bdf.bus):
                raise TopologyError(
                    f"{spec.describe()}: bus {spec.bdf.bus} is outside segment {segment.id}'s buses "
                    f"{segment.start_bus}-{segment.end_bus}"
                )
            if spec.bdf in owners:
                raise TopologyError(
                    f"{spec.describe()}: duplicate BDF, {spec.bdf} is already the {owners[spec.bdf].kind}"
                )
            owners[spec.bdf] = spec
        _check_root_ports(self)
        for spec in self.functions():
            _check_reachable(self, spec)
            if spec.bdf.function != 0 and spec.bdf.with_function(0) not in owners:
                raise TopologyError(
                    f"{spec.describe()}: function 0 of its device is missing "
                    "(Linux stops scanning a device whose function 0 is absent)"
                )
        return self


def _range(first: int, last: int) -> str:
    return f"[{first:#x}, {last:#x}]"


def _check_int(what: str, name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"{what}: {name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise TopologyError(f"{what}: {name} {value:#x} is outside {low:#x}..{high:#x}")


def _check_segments(segments: Iterable[Segment]) -> None:
    seen: dict[int, Segment] = {}
    for s in segments:
        what = s.describe()
        _check_int(what, "id", s.id, 0, MAX_SEGMENT)
        if s.id in seen:
            raise TopologyError(f"{what}: duplicate segment id")
        _check_int(what, "start bus", s.start_bus, 0, ecam.MAX_BUS)
        _check_int(what, "end bus", s.end_bus, 0, ecam.MAX_BUS)
        if s.start_bus > s.end_bus:
            raise TopologyError(f"{what}: bus range {s.start_bus}-{s.end_bus} is empty")
        _check_int(what, "fill", s.fill, 0, 0xFF)
        if s.writes not in WRITE_POLICIES:
            raise TopologyError(f"{what}: writes {s.writes!r} is not one of {', '.join(WRITE_POLICIES)}")
        _check_int(what, "ecam_base", s.ecam_base, 0, (1 << 64) - 1)
        if s.ecam_base % s.alignment:
            raise TopologyError(
                f"{what}: ecam_base {s.ecam_base:#x} is not aligned to {s.alignment >> 20} MiB "
                f"(2^(n+20) bytes for buses up to {s.end_bus}, PCIe 6.0 §7.2.2)"
            )
        end = s.ecam_base + ((s.end_bus + 1) << ecam.BUS_SHIFT)
        if end > FOUR_GIB:
            raise TopologyError(
                f"{what}: ECAM window {_range(s.window_base, s.window_last)} is not below 4 GiB "
                "(Linux rejects an MCFG base above 4 GiB on a machine without SMBIOS)"
            )
        for other in seen.values():
            if s.window_base <= other.window_last and other.window_base <= s.window_last:
                raise TopologyError(
                    f"{what}: ECAM window {_range(s.window_base, s.window_last)} overlaps "
                    f"{other.describe()}'s {_range(other.window_base, other.window_last)}"
                )
        seen[s.id] = s


def _check_function_fields(spec: FunctionSpec) -> None:
    what = spec.describe()
    if not isinstance(spec.bdf, Bdf):
        raise TopologyError(f"{what}: bdf must be a Bdf")
    _check_int(what, "vendor", spec.vendor, 0, 0xFFFF)
    # pci_bus_generic_read_dev_vendor_id() takes these vendor IDs to mean "no device here".
    if spec.vendor in (0x0000, 0xFFFF):
        raise TopologyError(f"{what}: vendor {spec.vendor:#06x} reads as an absent function to Linux")
    _check_int(what, "device", spec.device, 0, 0xFFFF)
    _check_int(what, "class", spec.class_code, 0, 0xFFFFFF)
    if isinstance(spec, EndpointSpec):
        _check_int(what, "revision", spec.revision, 0, 0xFF)
        _check_int(what, "subsystem_vendor", spec.subsystem_vendor, 0, 0xFFFF)
        _check_int(what, "subsystem", spec.subsystem, 0, 0xFFFF)
        _check_bars(what, spec.bars)
    if isinstance(spec, RootPortSpec) and spec.physical_slot is not None:
        _check_int(what, "slot", spec.physical_slot, 0, (1 << 13) - 1)


def _check_bars(what: str, bars: Iterable[BarSpec]) -> None:
    used: dict[int, BarSpec] = {}
    for bar in bars:
        at = f"{what}: BAR {bar.index}"
        _check_int(at, "index", bar.index, 0, 5)
        if bar.kind not in BAR_KINDS:
            raise TopologyError(f"{at}: type {bar.kind!r} is not one of {', '.join(BAR_KINDS)}")
        if bar.kind == BAR_MEM64 and bar.index == 5:
            raise TopologyError(f"{at}: a 64-bit BAR needs two registers; BAR 5 is the last")
        if bar.kind == BAR_IO and bar.prefetchable:
            raise TopologyError(f"{at}: an I/O BAR cannot be prefetchable")
        low, high = {
            BAR_MEM32: (MIN_MEM_BAR, MAX_MEM32_BAR),
            BAR_MEM64: (MIN_MEM_BAR, MAX_MEM64_BAR),
            BAR_IO: (MIN_IO_BAR, MAX_IO_BAR),
        }[bar.kind]
        _check_int(at, "size", bar.size, low, high)
        if bar.size & (bar.size - 1):
            raise TopologyError(f"{at}: size {bar.size:#x} is not a power of two")
        for index in bar.indices:
            if index in used:
                raise TopologyError(f"{at}: register {index} is already used by BAR {used[index].index}")
            used[index] = bar


def _check_root_ports(topology: Topology) -> None:
    for port in topology.root_ports:
        what = port.describe()
        segment = topology.segment(port.bdf.segment)
        if port.bdf.bus != segment.root_bus:
            raise TopologyError(
                f"{what}: a root port must be on the root bus {segment.root_bus} of {segment.describe()} "
                "(switches are not modeled)"
            )
        _check_int(what, "secondary", port.secondary, 0, ecam.MAX_BUS)
        _check_int(what, "subordinate", port.subordinate, 0, ecam.MAX_BUS)
        if not port.bdf.bus < port.secondary <= port.subordinate:
            raise TopologyError(
                f"{what}: needs bus {port.bdf.bus} < secondary ({port.secondary}) <= subordinate "
                f"({port.subordinate})"
            )
        if not segment.has_bus(port.subordinate):
            raise TopologyError(
                f"{what}: buses {port.secondary}-{port.subordinate} are outside {segment.describe()}'s "
                f"buses {segment.start_bus}-{segment.end_bus}"
            )
    ports = sorted(topology.root_ports, key=lambda p: (p.bdf.segment, p.secondary))
    for before, after in zip(ports, ports[1:], strict=False):
        if before.bdf.segment == after.bdf.segment and after.secondary <= before.subordinate:
            raise TopologyError(
                f"{after.describe()}: buses {after.secondary}-{after.subordinate} overlap "
                f"{before.describe()}'s buses {before.secondary}-{before.subordinate}"
            )


def _check_reachable(topology: Topology, spec: FunctionSpec) -> None:
    segment = topology.segment(spec.bdf.segment)
    bus = spec.bdf.bus
    if bus == segment.root_bus:
        return
    port = topology.bridge_for_bus(segment.id, bus)
    what = spec.describe()
    if port is None:
        raise TopologyError(f"{what}: bus {bus} is reached by no bridge")
    if bus != port.secondary:
        raise TopologyError(
            f"{what}: bus {bus} is behind {port.describe()} but only its secondary bus {port.secondary} "
            "holds devices (switches are not modeled)"
        )
    if spec.bdf.device != 0:
        raise TopologyError(
            f"{what}: device {spec.bdf.device} below {port.describe()}: a PCIe link reaches only device 0 "
            "(Linux scans only device 0 there, only_one_child())"
        )
