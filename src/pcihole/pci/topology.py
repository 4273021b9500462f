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
  >= 2010, and we provide no SMBIOS; see docs/linux-ecam.md §2).
- A segment's hierarchy has root buses: the segment's first bus (the main root bus, with the host
  bridge) and the bus of each expander bridge (QEMU's pxb-pcie, 1b36:000b, a host bridge function on
  the main root bus whose own root bus [bus, last_bus] lies above every bus of the main hierarchy, as
  QEMU's build_dsdt() cuts PCI0's bus range at the lowest expander bus). Linux finds each expander's
  root bus through its PNP0A08 device's _BBN (acpi/expander_bridge.py).
- Bridges (type 1 functions) own the bus range [secondary, subordinate] that firmware assigned them
  (Linux keeps it: pci_scan_bridge_extend() pass 0, pcibios_assign_all_busses() is false on x86).
  A bridge's range lies strictly below its parent's (the bridge whose secondary bus it sits on, or the
  root bus's range), and bridges on one bus have disjoint ranges: what pci_bus_insert_busn_res()
  needs to insert each child bus below its parent without conflict.
- What may sit where, as in PCIe 6.0 §1.3 and QEMU's device models:
  - root ports (pcie-root-port) and expander bridges on a root bus only (expanders on the main one);
  - below a root port or a switch's downstream port is a link: it reaches only device 0 (Linux scans
    only device 0 there, only_one_child() in drivers/pci/probe.c): endpoints or a switch's upstream
    port (x3130-upstream 104c:8232);
  - on a switch's internal bus (an upstream port's secondary bus) only its downstream ports
    (xio3130-downstream 104c:8233), any device number;
  - conventional PCI-PCI bridges (pci-bridge 1b36:0001, a conventional PCI device) on a root bus or
    below another one; their secondary bus is conventional PCI: 32 slots, endpoints and pci-bridges.
- Every function's bus is a root bus or some bridge's secondary bus ("bus 5 is reached by no bridge").
- Function N > 0 needs function 0 of the same device: Linux stops at an absent function 0
  (pci_scan_slot), so such a function would never be found. Function 0 gets the multi-function bit
  in Header Type when any other function of its device exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from . import ecam
from .bdf import MAX_SEGMENT, Bdf

FOUR_GIB = 1 << 32

WRITES_DISCARD = "discard"  # hole writes change nothing and cost no exit where the backend allows
WRITES_TRAP = "trap"  # the VMM sees every hole write and logs an Unsupported Request (see aer.py)
# Hole writes exit and are discarded: one exit per write to an absent function (a scan makes none),
# and no coalesced zone, so a hot-plug change touches no zone (KVM_UNREGISTER_COALESCED_MMIO waits
# for an SRCU grace period: milliseconds).
WRITES_EXIT = "exit"
WRITE_POLICIES = (WRITES_DISCARD, WRITES_TRAP, WRITES_EXIT)

HOST_BRIDGE_VENDOR = 0x1B36  # Red Hat, Inc. (QEMU)
HOST_BRIDGE_DEVICE = 0x0008  # QEMU PCIe host bridge (hw/pci-host/gpex.c)
HOST_BRIDGE_CLASS = 0x060000  # bridge, host bridge
ROOT_PORT_VENDOR = 0x1B36
ROOT_PORT_DEVICE = 0x000C  # QEMU pcie-root-port (hw/pci-bridge/gen_pcie_root_port.c)
ROOT_PORT_CLASS = 0x060400  # bridge, PCI-to-PCI bridge, normal decode
SWITCH_VENDOR = 0x104C  # Texas Instruments: QEMU's switch ports model the XIO3130
UPSTREAM_PORT_DEVICE = 0x8232  # x3130-upstream (hw/pci-bridge/xio3130_upstream.c)
UPSTREAM_PORT_REVISION = 0x2  # XIO3130_REVISION there
DOWNSTREAM_PORT_DEVICE = 0x8233  # xio3130-downstream (hw/pci-bridge/xio3130_downstream.c)
DOWNSTREAM_PORT_REVISION = 0x1
PCI_BRIDGE_VENDOR = 0x1B36
PCI_BRIDGE_DEVICE = 0x0001  # QEMU pci-bridge (hw/pci-bridge/pci_bridge_dev.c, PCI_DEVICE_ID_REDHAT_BRIDGE)
PCI_BRIDGE_SLOTS = 32  # its SHPC and Slot Identification capability offer 32 slots
EXPANDER_VENDOR = 0x1B36
EXPANDER_DEVICE = 0x000B  # QEMU pxb-pcie (hw/pci-bridge/pci_expander_bridge.c, PCI_DEVICE_ID_REDHAT_PXB_PCIE)
QEMU_SUBSYSTEM_VENDOR = 0x1AF4  # QEMU gives every device subsystem 1af4:1100 (pci_default_sub_vendor_id)
QEMU_SUBSYSTEM = 0x1100

BRIDGE_SUBCLASSES = (0x0604, 0x0607)  # PCI-to-PCI bridge and CardBus bridge: type 1 and 2 headers only
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
    revision = 0  # QEMU's pcie-root-port

    @property
    def slot_number(self) -> int:
        return self.secondary if self.physical_slot is None else self.physical_slot

    def describe(self) -> str:
        return f"root port {self.bdf}"


@dataclass(frozen=True, slots=True)
class UpstreamPortSpec:
    """A switch's upstream port: a type 1 function on a link (below a root or downstream port)."""

    bdf: Bdf
    secondary: int  # the switch's internal bus, where its downstream ports sit
    subordinate: int
    vendor: int = SWITCH_VENDOR
    device: int = UPSTREAM_PORT_DEVICE
    name: str = ""

    kind = "upstream port"
    class_code = ROOT_PORT_CLASS
    revision = UPSTREAM_PORT_REVISION

    def describe(self) -> str:
        return f"upstream port {self.bdf}"


@dataclass(frozen=True, slots=True)
class DownstreamPortSpec:
    """A switch's downstream port: a type 1 function with a hot-plug slot on the switch's internal bus."""

    bdf: Bdf
    secondary: int
    subordinate: int
    vendor: int = SWITCH_VENDOR
    device: int = DOWNSTREAM_PORT_DEVICE
    physical_slot: int | None = None  # None: the secondary bus number
    name: str = ""

    kind = "downstream port"
    class_code = ROOT_PORT_CLASS
    revision = DOWNSTREAM_PORT_REVISION

    @property
    def slot_number(self) -> int:
        return self.secondary if self.physical_slot is None else self.physical_slot

    def describe(self) -> str:
        return f"downstream port {self.bdf}"


@dataclass(frozen=True, slots=True)
class PciBridgeSpec:
    """A conventional PCI-PCI bridge (QEMU pci-bridge): no PCIe capability, a 32-slot secondary bus."""

    bdf: Bdf
    secondary: int
    subordinate: int
    vendor: int = PCI_BRIDGE_VENDOR
    device: int = PCI_BRIDGE_DEVICE
    chassis: int | None = None  # Slot Identification chassis number; None: the secondary bus number
    name: str = ""

    kind = "pci bridge"
    class_code = ROOT_PORT_CLASS
    revision = 0

    @property
    def chassis_number(self) -> int:
        return self.secondary if self.chassis is None else self.chassis

    def describe(self) -> str:
        return f"pci bridge {self.bdf}"


@dataclass(frozen=True, slots=True)
class ExpanderSpec:
    """A PCIe expander bridge (QEMU pxb-pcie): a host bridge function on the main root bus that opens
    another root bus, `bus`, owning the buses [bus, last_bus] of its segment."""

    bdf: Bdf
    bus: int
    last_bus: int
    vendor: int = EXPANDER_VENDOR
    device: int = EXPANDER_DEVICE
    name: str = ""

    kind = "expander bridge"
    class_code = HOST_BRIDGE_CLASS

    def describe(self) -> str:
        return f"expander bridge {self.bdf}"


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


BridgeSpec = RootPortSpec | UpstreamPortSpec | DownstreamPortSpec | PciBridgeSpec
SlotPortSpec = RootPortSpec | DownstreamPortSpec  # ports with a hot-plug slot below them
FunctionSpec = HostBridgeSpec | ExpanderSpec | BridgeSpec | EndpointSpec
AddableSpec = ExpanderSpec | BridgeSpec | EndpointSpec  # what hot-plug may add or remove


# Where a bus sits, for the placement rules (see the module docstring).
BUS_ROOT = "root bus"
BUS_LINK = "link"  # the secondary bus of a root port or a downstream port
BUS_SWITCH = "switch internal bus"  # the secondary bus of an upstream port
BUS_CONVENTIONAL = "conventional bus"  # the secondary bus of a pci-bridge


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    root_ports: tuple[RootPortSpec, ...] = ()
    endpoints: tuple[EndpointSpec, ...] = ()
    #: switch ports and PCI-PCI bridges (root ports are kept apart, as before switches existed)
    bridges: tuple[UpstreamPortSpec | DownstreamPortSpec | PciBridgeSpec, ...] = ()
    expanders: tuple[ExpanderSpec, ...] = ()
    _by_id: dict[int, Segment] = field(init=False, repr=False, compare=False)
    # Indexes for the queries below (a Topology is never modified, only replaced).
    _by_secondary: dict[tuple[int, int], BridgeSpec] = field(init=False, repr=False, compare=False)
    _expanders_of: dict[int, list[ExpanderSpec]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "root_ports", tuple(self.root_ports))
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "bridges", tuple(self.bridges))
        object.__setattr__(self, "expanders", tuple(self.expanders))
        object.__setattr__(self, "_by_id", {s.id: s for s in self.segments})
        # With two bridges opening one bus (refused by validate()), the first one wins, as a scan would.
        by_secondary: dict[tuple[int, int], BridgeSpec] = {}
        for bridge in self.all_bridges():
            by_secondary.setdefault((bridge.bdf.segment, bridge.secondary), bridge)
        object.__setattr__(self, "_by_secondary", by_secondary)
        expanders_of: dict[int, list[ExpanderSpec]] = {}
        for x in self.expanders:
            expanders_of.setdefault(x.bdf.segment, []).append(x)
        object.__setattr__(self, "_expanders_of", expanders_of)

    # --- queries ----------------------------------------------------------------------------------
    def segment(self, segment_id: int) -> Segment:
        return self._by_id[segment_id]

    def host_bridges(self) -> tuple[HostBridgeSpec, ...]:
        return tuple(HostBridgeSpec(Bdf(s.id, s.root_bus, 0, 0)) for s in self.segments)

    def all_bridges(self) -> tuple[BridgeSpec, ...]:
        """Every type 1 function: root ports, switch ports, PCI-PCI bridges."""
        return (*self.root_ports, *self.bridges)

    def functions(self) -> Iterator[FunctionSpec]:
        """Every function: host bridges, expander bridges, root ports, other bridges, endpoints."""
        yield from self.host_bridges()
        yield from self.expanders
        yield from self.root_ports
        yield from self.bridges
        yield from self.endpoints

    def root_bus_range(self, segment_id: int, bus: int) -> tuple[int, int] | None:
        """(first, last) of the root bus `bus` of the segment (main or expander), None if not a root bus.

        The main root bus ends below the lowest expander bus, as QEMU's build_dsdt() gives PCI0
        the buses up to root_bus_limit = (lowest pxb bus) - 1.
        """
        segment = self._by_id[segment_id]
        expanders = self._expanders_of.get(segment_id, [])
        for x in expanders:
            if x.bus == bus:
                return x.bus, x.last_bus
        if bus != segment.root_bus:
            return None
        last = min([segment.end_bus, *(x.bus - 1 for x in expanders if x.bus > segment.root_bus)])
        return segment.root_bus, last

    def parent_bridge(self, segment_id: int, bus: int) -> BridgeSpec | None:
        """The bridge whose secondary bus is `bus` (None for a root bus or a bus no bridge opens)."""
        return self._by_secondary.get((segment_id, bus))

    def bus_kind(self, segment_id: int, bus: int) -> str | None:
        """BUS_ROOT, BUS_LINK, BUS_SWITCH or BUS_CONVENTIONAL; None where no bridge reaches `bus`."""
        if self.root_bus_range(segment_id, bus) is not None:
            return BUS_ROOT
        parent = self.parent_bridge(segment_id, bus)
        if parent is None:
            return None
        if isinstance(parent, UpstreamPortSpec):
            return BUS_SWITCH
        if isinstance(parent, PciBridgeSpec):
            return BUS_CONVENTIONAL
        return BUS_LINK

    def bridge_for_bus(self, segment_id: int, bus: int) -> BridgeSpec | None:
        """The innermost bridge whose bus range holds `bus` (None on a root bus or where none reaches)."""
        best: BridgeSpec | None = None
        for bridge in self.all_bridges():
            inside = bridge.bdf.segment == segment_id and bridge.secondary <= bus <= bridge.subordinate
            if inside and (best is None or bridge.secondary > best.secondary):
                best = bridge
        return best

    def is_multifunction(self, bdf: Bdf) -> bool:
        """Whether bdf's device has more than one function (fn 0 then has the multi-function bit)."""
        return any(
            f.bdf != bdf
            and f.bdf.segment == bdf.segment
            and f.bdf.bus == bdf.bus
            and f.bdf.device == bdf.device
            for f in self.functions()
        )

    def with_function(self, spec: AddableSpec) -> Topology:
        """A new topology with one more function (not validated)."""
        if isinstance(spec, RootPortSpec):
            return replace(self, root_ports=(*self.root_ports, spec))
        if isinstance(spec, EndpointSpec):
            return replace(self, endpoints=(*self.endpoints, spec))
        if isinstance(spec, ExpanderSpec):
            return replace(self, expanders=(*self.expanders, spec))
        return replace(self, bridges=(*self.bridges, spec))

    def without_function(self, bdf: Bdf) -> Topology:
        """A new topology without the function at bdf (not validated)."""
        present = (*self.root_ports, *self.bridges, *self.expanders, *self.endpoints)
        if not any(f.bdf == bdf for f in present):
            raise TopologyError(f"{bdf}: no such bridge, port or endpoint")
        return replace(
            self,
            root_ports=tuple(p for p in self.root_ports if p.bdf != bdf),
            endpoints=tuple(e for e in self.endpoints if e.bdf != bdf),
            bridges=tuple(b for b in self.bridges if b.bdf != bdf),
            expanders=tuple(x for x in self.expanders if x.bdf != bdf),
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
        _check_expanders(self)
        _check_bridge_numbers(self)
        for spec in self.functions():
            _check_placement(self, spec)
            if spec.bdf.function != 0 and spec.bdf.with_function(0) not in owners:
                raise TopologyError(
                    f"{spec.describe()}: function 0 of its device is missing "
                    "(Linux stops scanning a device whose function 0 is absent)"
                )
        _check_bridge_ranges(self)
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
        if spec.class_code >> 8 in BRIDGE_SUBCLASSES:
            # pci_setup_device(): a type 0 header with a PCI-to-PCI or CardBus bridge class is
            # "ignoring class ... (doesn't match header type 00)": Linux would follow no bus below it.
            raise TopologyError(
                f"{what}: class {spec.class_code:#08x} is a bridge's, but an endpoint has a type 0 header "
                "and nothing below it (Linux ignores that class); describe the bridge as a root_port, "
                "upstream_port, downstream_port or pci_bridge"
            )
        _check_int(what, "revision", spec.revision, 0, 0xFF)
        _check_int(what, "subsystem_vendor", spec.subsystem_vendor, 0, 0xFFFF)
        _check_int(what, "subsystem", spec.subsystem, 0, 0xFFFF)
        _check_bars(what, spec.bars)
    if isinstance(spec, (RootPortSpec, DownstreamPortSpec)) and spec.physical_slot is not None:
        _check_int(what, "slot", spec.physical_slot, 0, (1 << 13) - 1)
    if isinstance(spec, PciBridgeSpec) and spec.chassis is not None:
        _check_int(what, "chassis", spec.chassis, 0, 0xFF)


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


def _bus_place(topology: Topology, segment_id: int, bus: int) -> str:
    """Where `bus` is, in words: "the root bus 0" or "bus 3 below downstream port 0000:02:00.0"."""
    if topology.root_bus_range(segment_id, bus) is not None:
        return f"root bus {bus}"
    parent = topology.parent_bridge(segment_id, bus)
    return f"bus {bus} below {parent.describe()}" if parent is not None else f"bus {bus}"


def _check_expanders(topology: Topology) -> None:
    for x in topology.expanders:
        what = x.describe()
        segment = topology.segment(x.bdf.segment)
        _check_int(what, "bus", x.bus, 0, ecam.MAX_BUS)
        _check_int(what, "last bus", x.last_bus, 0, ecam.MAX_BUS)
        if x.bdf.bus != segment.root_bus:
            raise TopologyError(
                f"{what}: an expander bridge must be on the root bus {segment.root_bus} of {segment.describe()}"
            )
        if not segment.root_bus < x.bus <= x.last_bus <= segment.end_bus:
            raise TopologyError(
                f"{what}: needs root bus {segment.root_bus} < bus ({x.bus}) <= last bus ({x.last_bus}) <= "
                f"{segment.end_bus}, the last bus of {segment.describe()}"
            )
    ranges = sorted(topology.expanders, key=lambda x: (x.bdf.segment, x.bus))
    for before, after in zip(ranges, ranges[1:], strict=False):
        if before.bdf.segment == after.bdf.segment and after.bus <= before.last_bus:
            raise TopologyError(
                f"{after.describe()}: buses {after.bus}-{after.last_bus} overlap "
                f"{before.describe()}'s buses {before.bus}-{before.last_bus}"
            )


def _check_bridge_numbers(topology: Topology) -> None:
    """Each bridge's own bus numbers are sane, and no two bridges open the same bus."""
    bridges = topology.all_bridges()
    for bridge in bridges:
        what = bridge.describe()
        _check_int(what, "secondary", bridge.secondary, 0, ecam.MAX_BUS)
        _check_int(what, "subordinate", bridge.subordinate, 0, ecam.MAX_BUS)
        if not bridge.bdf.bus < bridge.secondary <= bridge.subordinate:
            raise TopologyError(
                f"{what}: needs bus {bridge.bdf.bus} < secondary ({bridge.secondary}) <= subordinate "
                f"({bridge.subordinate})"
            )
    by_secondary: dict[tuple[int, int], BridgeSpec] = {}
    for bridge in bridges:
        key = (bridge.bdf.segment, bridge.secondary)
        if key in by_secondary:
            other = by_secondary[key]
            raise TopologyError(
                f"{bridge.describe()}: buses {bridge.secondary}-{bridge.subordinate} overlap "
                f"{other.describe()}'s buses {other.secondary}-{other.subordinate}"
            )
        by_secondary[key] = bridge


def _check_bridge_ranges(topology: Topology) -> None:
    """Each bridge's range lies inside its parent's and is disjoint from its siblings' (same bus)."""
    by_secondary = {(b.bdf.segment, b.secondary): b for b in topology.all_bridges()}
    siblings: dict[tuple[int, int], list[BridgeSpec]] = {}
    for bridge in topology.all_bridges():
        siblings.setdefault((bridge.bdf.segment, bridge.bdf.bus), []).append(bridge)
    for (segment_id, bus), group in siblings.items():
        group.sort(key=lambda b: b.secondary)
        for before, after in zip(group, group[1:], strict=False):
            if after.secondary <= before.subordinate:
                raise TopologyError(
                    f"{after.describe()}: buses {after.secondary}-{after.subordinate} overlap "
                    f"{before.describe()}'s buses {before.secondary}-{before.subordinate}"
                )
        segment = topology.segment(segment_id)
        root = topology.root_bus_range(segment_id, bus)
        parent = by_secondary.get((segment_id, bus))
        if root is not None:
            first, last, owner = root[0], root[1], f"root bus {bus}'s buses"
        elif parent is not None:
            first, last, owner = parent.secondary, parent.subordinate, f"{parent.describe()}'s buses"
        else:
            continue  # an unreachable bus: _check_placement says so, naming the function
        for bridge in group:
            if not (first < bridge.secondary and bridge.subordinate <= last):
                raise TopologyError(
                    f"{bridge.describe()}: buses {bridge.secondary}-{bridge.subordinate} are not inside "
                    f"{owner} {first}-{last} in {segment.describe()} (a bridge there needs {first} < "
                    f"secondary <= subordinate <= {last})"
                )


def _check_placement(topology: Topology, spec: FunctionSpec) -> None:
    """The bus `spec` is on is reachable and may hold this kind of function (module docstring)."""
    segment = topology.segment(spec.bdf.segment)
    bus = spec.bdf.bus
    what = spec.describe()
    kind = topology.bus_kind(segment.id, bus)
    if kind is None:
        bridge = topology.bridge_for_bus(segment.id, bus)
        if bridge is None:
            raise TopologyError(f"{what}: bus {bus} is reached by no bridge")
        raise TopologyError(
            f"{what}: bus {bus} is behind {bridge.describe()} but only its secondary bus {bridge.secondary} "
            f"holds devices (no bridge below it has secondary bus {bus})"
        )
    place = _bus_place(topology, segment.id, bus)
    if isinstance(spec, (HostBridgeSpec, ExpanderSpec)):
        return  # on the main root bus: checked by _check_expanders
    if isinstance(spec, RootPortSpec):
        if kind != BUS_ROOT:
            raise TopologyError(
                f"{what}: a root port must be on the root bus {segment.root_bus} of {segment.describe()} or "
                f"an expander bridge's bus, not on {place}"
            )
        return
    if isinstance(spec, DownstreamPortSpec):
        if kind != BUS_SWITCH:
            raise TopologyError(
                f"{what}: a downstream port must be on a switch's internal bus (the secondary bus of an "
                f"upstream port), not on {place}"
            )
        return
    if kind == BUS_SWITCH:
        raise TopologyError(
            f"{what}: only downstream ports sit on a switch's internal bus, and {place} is one"
        )
    if isinstance(spec, UpstreamPortSpec) and kind != BUS_LINK:
        raise TopologyError(
            f"{what}: an upstream port must be below a root port or a downstream port (on its link), "
            f"not on {place}"
        )
    if isinstance(spec, PciBridgeSpec) and kind == BUS_LINK:
        raise TopologyError(
            f"{what}: a conventional PCI bridge (QEMU pci-bridge) cannot be on the PCIe link {place}; "
            "put it on a root bus or below another pci bridge"
        )
    if kind == BUS_LINK and spec.bdf.device != 0:
        parent = topology.parent_bridge(segment.id, bus)
        assert parent is not None
        raise TopologyError(
            f"{what}: device {spec.bdf.device} below {parent.describe()}: a PCIe link reaches only device 0 "
            "(Linux scans only device 0 there, only_one_child())"
        )
