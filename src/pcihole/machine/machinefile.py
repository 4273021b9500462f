"""Machine files: a TOML description of the guest's RAM and PCIe hierarchy.

Schema (every key is checked: an unknown key, a wrong type or an invalid value is an error)::

    [machine]                       # required
    ram_mib = 64                    # required, integer 1..4096: guest RAM in MiB (RAM starts at 0 and
                                    #   must end below the ECAM windows, which lie below 4 GiB)
    name = "default"                # optional string

    [[segment]]                     # one or more; each is an ECAM window and its hole
    id = 0                          # required, PCI segment group 0..65535
    ecam_base = 0xe0000000          # required: guest-physical address of bus 0 (MCFG Base Address),
                                    #   aligned to 2^(n+20) for n bus-number bits, window below 4 GiB
    buses = "0-255"                 # optional, "first-last" (ASCII decimal), default "0-255"
    fill = 0xff                     # optional, the byte absent functions read as, default 0xff
    writes = "discard"              # optional, "discard" | "trap" (log Unsupported Requests) | "exit" (see below), default "discard"

    [[root_port]]                   # zero or more, on the segment's root bus (QEMU pcie-root-port)
    bdf = "0000:00:02.0"            # required, SSSS:BB:DD.F in hexadecimal
    secondary = 1                   # required: the bus below the port
    subordinate = 1                 # optional, default = secondary
    vendor = 0x1b36                 # optional, default 0x1b36
    device = 0x000c                 # optional, default 0x000c (class is always 0x060400)
    slot = 1                        # optional physical slot number, default = secondary
    name = "rp1"                    # optional string

    [[upstream_port]]               # a PCIe switch's upstream port (QEMU x3130-upstream 104c:8232),
    bdf = "0000:01:00.0"            #   device 0 of a root or downstream port's secondary bus
    secondary = 2                   # required: the switch's internal bus
    subordinate = 6                 # optional, default = secondary: the switch's last bus
    vendor = 0x104c                 # optional (and device = 0x8232), class is always 0x060400
    name = "switch0"                # optional string

    [[downstream_port]]             # a switch's downstream port (QEMU xio3130-downstream 104c:8233),
    bdf = "0000:02:00.0"            #   on an upstream port's secondary bus, with a hot-plug slot
    secondary = 3                   # required; subordinate, vendor, device, name: as for root_port
    slot = 3                        # optional physical slot number, default = secondary

    [[pci_bridge]]                  # a conventional PCI-PCI bridge (QEMU pci-bridge 1b36:0001): on a
    bdf = "0000:00:05.0"            #   root bus or below another pci_bridge; its bus has 32 slots
    secondary = 7                   # required; subordinate, vendor, device, name: as for root_port
    chassis = 1                     # optional Slot Identification chassis number, default = secondary

    [[expander]]                    # a PCIe expander bus (QEMU pxb-pcie 1b36:000b) on the segment's
    bdf = "0000:00:10.0"            #   root bus: a host bridge function opening another root bus
    buses = "128-191"               # required: its root bus and last bus, above the main hierarchy
    name = "numa1"                  # optional string

    [[endpoint]]                    # zero or more type 0 functions
    bdf = "0000:01:00.0"            # required; on a root bus, device 0 below a port, or below a pci_bridge
    vendor = 0x1af4                 # required
    device = 0x1041                 # required
    class = 0x020000                # required, 24-bit class code (base class, subclass, prog-if)
    revision = 1                    # optional, default 0
    subsystem_vendor = 0x1af4       # optional, default 0x1af4 (QEMU's for every device)
    subsystem = 0x1100              # optional, default 0x1100
    name = "virtio-net"             # optional string

    [[endpoint.bar]]                # zero or more BARs of the endpoint just above
    index = 1                       # required, 0..5 (a mem64 BAR also uses index + 1)
    type = "mem32"                  # required, "mem32" | "mem64" | "io"
    size = 0x1000                   # required, a power of two (memory >= 128 bytes, I/O 4..256)
    prefetchable = false            # optional, memory BARs only

Writes to absent functions: "discard" lets a coalesced-MMIO zone swallow them (no exit), "trap" makes
each exit and logs an Unsupported Request, "exit" makes each exit and drops it. With "trap" and
"exit" there is no zone, so a hot-plug change under ro-alias costs no ioctl at all (one host page
remapped); with "discard" it re-registers the zones around the function's page (milliseconds).

Every segment has an implicit host bridge at <first bus>:00.0. Several endpoints with the same bus and
device form a multi-function device (function 0 required; it gets the multi-function bit). The rules
the hierarchy must follow, and why, are in `pcihole.pci.topology`.

A machine file is a regular file of at most 16 MiB (`MACHINE_FILE_MAX`) of UTF-8 text; every integer in
it must fit in 64 bits. Errors are `MachineFileError` (a ValueError) with a one-line message naming the
file and the problem, e.g. ``machine.toml: endpoint 0000:05:00.0: bus 5 is reached by no bridge``; values
quoted in messages are shortened (`quote`), so a 5 KB value cannot make a 5 KB line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from typing import Any

from pcihole.host.input_file import InputFileError, MiB, read_input_file
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import (
    DOWNSTREAM_PORT_DEVICE,
    EXPANDER_DEVICE,
    EXPANDER_VENDOR,
    PCI_BRIDGE_DEVICE,
    PCI_BRIDGE_VENDOR,
    QEMU_SUBSYSTEM,
    QEMU_SUBSYSTEM_VENDOR,
    ROOT_PORT_DEVICE,
    ROOT_PORT_VENDOR,
    SWITCH_VENDOR,
    UPSTREAM_PORT_DEVICE,
    WRITES_DISCARD,
    BarSpec,
    DownstreamPortSpec,
    EndpointSpec,
    ExpanderSpec,
    PciBridgeSpec,
    RootPortSpec,
    Segment,
    Topology,
    TopologyError,
    UpstreamPortSpec,
)

DEFAULT_MACHINE = "default.toml"
#: A machine with 33,000 functions (more than KVM's memslots can hole-punch) is 2.5 MB of TOML.
MACHINE_FILE_MAX = 16 * MiB
#: RAM is one range from address 0, and every ECAM window lies below 4 GiB and must not overlap it.
RAM_MIB_MAX = 4096
#: Integers wider than this are no address, size or ID a machine can use (u64 at most).
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
#: ASCII only: \d and int() also take other scripts' digits ("\u0660-\u0665").
_BUSES_RE = re.compile(r"[ \t]*([0-9]+)[ \t]*-[ \t]*([0-9]+)[ \t]*")
_QUOTE_MAX = 40
_MESSAGE_MAX = 300
TOP_LEVEL_KEYS = (
    "downstream_port",
    "endpoint",
    "expander",
    "machine",
    "pci_bridge",
    "root_port",
    "segment",
    "upstream_port",
)
_TOML_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
}


class MachineFileError(ValueError):
    """A problem in a machine file; str() is one line: "<file>: <where>: <problem>"."""


@dataclass(frozen=True)
class MachineFile:
    """A loaded, validated machine description."""

    path: str
    name: str
    ram_mib: int
    topology: Topology

    @property
    def ram_bytes(self) -> int:
        return self.ram_mib << 20

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.topology.segments


def quote(value: object) -> str:
    """repr(value), shortened to about 40 characters for an error message."""
    text = repr(value)
    return text if len(text) <= _QUOTE_MAX else f"{text[: _QUOTE_MAX - 12]}...({len(text)} chars)"


def _type_name(value: object) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


class _Problem(Exception):
    """Raised inside the parser; turned into MachineFileError with the file name on the way out."""


class _Table:
    """One TOML table being read, with the words that say where it is ("endpoint 0000:01:00.0")."""

    def __init__(self, where: str, data: object) -> None:
        if not isinstance(data, dict):
            raise _Problem(f"{where}: must be a table, not {_type_name(data)}")
        self.where = where
        self.data: dict[str, Any] = data

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                raise _Problem(f"{self.where}: unknown key {key!r} (known: {', '.join(sorted(known))})")

    def _get(self, key: str, kind: type, required: bool, default: Any) -> Any:
        if key not in self.data:
            if required:
                raise _Problem(f"{self.where}: missing key {key!r}")
            return default
        value = self.data[key]
        # bool is a subclass of int in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = _TOML_TYPE_NAMES[kind]
            article = "an" if expected[0] in "aeiou" else "a"
            raise _Problem(f"{self.where}: {key} must be {article} {expected}, not {_type_name(value)}")
        return value

    def get_int(self, key: str, *, required: bool = False, default: int | None = None) -> Any:
        return self._get(key, int, required, default)

    def get_str(self, key: str, *, required: bool = False, default: str | None = None) -> Any:
        return self._get(key, str, required, default)

    def get_bool(self, key: str, *, default: bool = False) -> bool:
        return bool(self._get(key, bool, False, default))

    def bdf(self) -> Bdf:
        text = self.get_str("bdf", required=True)
        try:
            return Bdf.parse(text)
        except ValueError as e:
            raise _Problem(f"{self.where}: bdf {e}") from None


def _array_of_tables(document: dict[str, Any], key: str) -> list[Any]:
    value = document.get(key, [])
    if not isinstance(value, list):
        raise _Problem(f"{key} must be an array of tables ([[{key}]]), not {_type_name(value)}")
    return value


def _parse_buses(table: _Table) -> tuple[int, int]:
    text = table.get_str("buses", default="0-255")
    match = _BUSES_RE.fullmatch(text)
    if match is None:
        raise _Problem(f'{table.where}: buses {quote(text)} must be "first-last", e.g. "0-255"')
    first, last = int(match.group(1)), int(match.group(2))
    if not first <= last <= 255:
        raise _Problem(f"{table.where}: buses {quote(text)} must have 0 <= first <= last <= 255")
    return first, last


def _parse_machine(document: dict[str, Any]) -> tuple[str, int]:
    if "machine" not in document:
        raise _Problem("missing table [machine]")
    table = _Table("[machine]", document["machine"])
    table.check_keys(("name", "ram_mib"))
    ram_mib = table.get_int("ram_mib", required=True)
    if ram_mib < 1:
        raise _Problem(f"[machine]: ram_mib {ram_mib} must be at least 1")
    if ram_mib > RAM_MIB_MAX:
        raise _Problem(
            f"[machine]: ram_mib {ram_mib} must be at most {RAM_MIB_MAX} (RAM starts at 0 and must end "
            "below the ECAM windows, which lie below 4 GiB)"
        )
    return table.get_str("name", default=""), ram_mib


def _parse_segment(index: int, data: object) -> Segment:
    table = _Table(f"segment #{index + 1}", data)
    segment_id = table.get_int("id", required=True)
    table.where = f"segment {segment_id}"
    table.check_keys(("buses", "ecam_base", "fill", "id", "writes"))
    start_bus, end_bus = _parse_buses(table)
    return Segment(
        id=segment_id,
        ecam_base=table.get_int("ecam_base", required=True),
        start_bus=start_bus,
        end_bus=end_bus,
        fill=table.get_int("fill", default=0xFF),
        writes=table.get_str("writes", default=WRITES_DISCARD),
    )


def _parse_root_port(index: int, data: object) -> RootPortSpec:
    table = _Table(f"root port #{index + 1}", data)
    bdf = table.bdf()
    table.where = f"root port {bdf}"
    table.check_keys(("bdf", "device", "name", "secondary", "slot", "subordinate", "vendor"))
    secondary = table.get_int("secondary", required=True)
    return RootPortSpec(
        bdf=bdf,
        secondary=secondary,
        subordinate=table.get_int("subordinate", default=secondary),
        vendor=table.get_int("vendor", default=ROOT_PORT_VENDOR),
        device=table.get_int("device", default=ROOT_PORT_DEVICE),
        physical_slot=table.get_int("slot"),
        name=table.get_str("name", default=""),
    )


def _parse_bridge(
    key: str, index: int, data: object
) -> UpstreamPortSpec | DownstreamPortSpec | PciBridgeSpec:
    """One [[upstream_port]], [[downstream_port]] or [[pci_bridge]] table."""
    words = key.replace("_", " ")
    table = _Table(f"{words} #{index + 1}", data)
    bdf = table.bdf()
    table.where = f"{words} {bdf}"
    extra = {"upstream_port": (), "downstream_port": ("slot",), "pci_bridge": ("chassis",)}[key]
    table.check_keys(("bdf", "device", "name", "secondary", "subordinate", "vendor", *extra))
    secondary = table.get_int("secondary", required=True)
    subordinate = table.get_int("subordinate", default=secondary)
    name = table.get_str("name", default="")
    vendor = table.get_int("vendor", default=PCI_BRIDGE_VENDOR if key == "pci_bridge" else SWITCH_VENDOR)
    if key == "upstream_port":
        device = table.get_int("device", default=UPSTREAM_PORT_DEVICE)
        return UpstreamPortSpec(bdf, secondary, subordinate, vendor=vendor, device=device, name=name)
    if key == "downstream_port":
        device = table.get_int("device", default=DOWNSTREAM_PORT_DEVICE)
        slot = table.get_int("slot")
        return DownstreamPortSpec(
            bdf, secondary, subordinate, vendor=vendor, device=device, physical_slot=slot, name=name
        )
    device = table.get_int("device", default=PCI_BRIDGE_DEVICE)
    chassis = table.get_int("chassis")
    return PciBridgeSpec(
        bdf, secondary, subordinate, vendor=vendor, device=device, chassis=chassis, name=name
    )


def _parse_expander(index: int, data: object) -> ExpanderSpec:
    table = _Table(f"expander #{index + 1}", data)
    bdf = table.bdf()
    table.where = f"expander bridge {bdf}"
    table.check_keys(("bdf", "buses", "device", "name", "vendor"))
    if "buses" not in table.data:
        raise _Problem(f"{table.where}: missing key 'buses'")
    first, last = _parse_buses(table)
    return ExpanderSpec(
        bdf,
        first,
        last,
        vendor=table.get_int("vendor", default=EXPANDER_VENDOR),
        device=table.get_int("device", default=EXPANDER_DEVICE),
        name=table.get_str("name", default=""),
    )


def _parse_bar(where: str, index: int, data: object) -> BarSpec:
    table = _Table(f"{where}: bar #{index + 1}", data)
    table.check_keys(("index", "prefetchable", "size", "type"))
    return BarSpec(
        index=table.get_int("index", required=True),
        kind=table.get_str("type", required=True),
        size=table.get_int("size", required=True),
        prefetchable=table.get_bool("prefetchable"),
    )


def _parse_endpoint(index: int, data: object) -> EndpointSpec:
    table = _Table(f"endpoint #{index + 1}", data)
    bdf = table.bdf()
    table.where = f"endpoint {bdf}"
    table.check_keys(
        ("bar", "bdf", "class", "device", "name", "revision", "subsystem", "subsystem_vendor", "vendor")
    )
    bars = table.data.get("bar", [])
    if not isinstance(bars, list):
        raise _Problem(
            f"{table.where}: bar must be an array of tables ([[endpoint.bar]]), not {_type_name(bars)}"
        )
    return EndpointSpec(
        bdf=bdf,
        vendor=table.get_int("vendor", required=True),
        device=table.get_int("device", required=True),
        class_code=table.get_int("class", required=True),
        revision=table.get_int("revision", default=0),
        subsystem_vendor=table.get_int("subsystem_vendor", default=QEMU_SUBSYSTEM_VENDOR),
        subsystem=table.get_int("subsystem", default=QEMU_SUBSYSTEM),
        bars=tuple(_parse_bar(table.where, i, bar) for i, bar in enumerate(bars)),
        name=table.get_str("name", default=""),
    )


def _check_integers(document: dict[str, Any]) -> None:
    """Every integer fits in 64 bits (iteratively: the document may be nested deep)."""
    stack: list[tuple[str, object]] = [("", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            raise _Problem(
                f"{where}: an integer of {value.bit_length()} bits is out of range (64 bits at most)"
            )


def _parse(document: dict[str, Any], path: str) -> MachineFile:
    _check_integers(document)
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise _Problem(f"unknown top-level key {key!r} (known: {', '.join(TOP_LEVEL_KEYS)})")
    name, ram_mib = _parse_machine(document)
    segments = [_parse_segment(i, t) for i, t in enumerate(_array_of_tables(document, "segment"))]
    if not segments:
        raise _Problem("no [[segment]]: a machine needs at least one ECAM segment")
    root_ports = [_parse_root_port(i, t) for i, t in enumerate(_array_of_tables(document, "root_port"))]
    endpoints = [_parse_endpoint(i, t) for i, t in enumerate(_array_of_tables(document, "endpoint"))]
    bridges = [
        _parse_bridge(key, i, t)
        for key in ("upstream_port", "downstream_port", "pci_bridge")
        for i, t in enumerate(_array_of_tables(document, key))
    ]
    expanders = [_parse_expander(i, t) for i, t in enumerate(_array_of_tables(document, "expander"))]
    try:
        topology = Topology(
            tuple(segments), tuple(root_ports), tuple(endpoints), tuple(bridges), tuple(expanders)
        ).validate()
    except TopologyError as e:
        raise _Problem(str(e)) from None
    return MachineFile(path=path, name=name, ram_mib=ram_mib, topology=topology)


def loads(text: str, path: str = "<string>") -> MachineFile:
    """Parse a machine file's text; `path` is the name errors start with."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MachineFileError(f"{path}: invalid TOML: {_shorten(str(e))}") from None
    except RecursionError:
        raise MachineFileError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise MachineFileError(f"{path}: invalid TOML: {_shorten(str(e).split(';')[0])}") from None
    try:
        return _parse(document, path)
    except _Problem as e:
        raise MachineFileError(f"{path}: {_shorten(str(e))}") from None


def _shorten(message: str) -> str:
    return message if len(message) <= _MESSAGE_MAX else message[: _MESSAGE_MAX - 3] + "..."


def load(path: str | PathLike[str]) -> MachineFile:
    """Read and validate a machine file (OSError if it cannot be opened, MachineFileError if it is
    not a regular file of at most MACHINE_FILE_MAX bytes of UTF-8 TOML, or is wrong)."""
    try:
        data = read_input_file(path, limit=MACHINE_FILE_MAX, what="a machine file")
    except InputFileError as e:
        raise MachineFileError(str(e)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MachineFileError(
            f"{os.fspath(path)}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None
    return loads(text, os.fspath(path))


def load_default() -> MachineFile:
    """The machine embedded in the package (machine/default.toml), used when no --machine is given."""
    text = resources.files(__package__).joinpath(DEFAULT_MACHINE).read_text(encoding="utf-8")
    return loads(text, DEFAULT_MACHINE)
