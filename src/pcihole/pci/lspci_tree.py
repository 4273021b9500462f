r"""The PCI tree as `lspci -t` prints it (pciutils 3.9, Debian 12's: ls-tree.c grow_tree(), show_forest()).

    -[0000:00]-+-00.0
               +-01.0-[01-06]----00.0-[02-06]--+-00.0-[03]----00.0
               |                               \-03.0-[06]----00.0
               \-02.0-[0d]----00.0

The algorithm is ls-tree.c's, so the output matches lspci's character for character
(tests/pci/test_lspci_tree.py compares it with the real lspci reading a dump of the same registers):
- every bridge (base class 0x06, header type 1) covers [secondary, subordinate] from its registers;
- each function goes on the bus of the innermost bridge whose range holds its bus number (in its
  segment); a bus no bridge opens (a segment's root bus, an expander's) becomes a bus of the host
  bridge, in the order they are first met, each labelled [SSSS:BB] (later pciutils, 3.11 on, print
  each segment as a separate tree instead);
- a line is printed, then its characters become the indentation of the next one: `+` and `|` turn
  into `|`, everything else into a space (print_it()).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .registers import PCI_HEADER_TYPE_BRIDGE, PCI_SECONDARY_BUS, PCI_SUBORDINATE_BUS

if TYPE_CHECKING:
    from .host_bridge import HostBridge

PCI_BASE_CLASS_BRIDGE = 0x06
NO_BUS = 0xFFFFFFFF  # the host bridge's subordinate: ~0 in ls-tree.c


@dataclass(frozen=True, slots=True)
class TreeDevice:
    """What lspci -t reads of a function: its address, class, layout and (bridges) bus numbers."""

    segment: int
    bus: int
    device: int
    function: int
    class_code: int  # 24 bits
    header_type: int  # layout, without the multi-function bit
    secondary: int = 0
    subordinate: int = 0

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 16 == PCI_BASE_CLASS_BRIDGE and self.header_type == PCI_HEADER_TYPE_BRIDGE


@dataclass(eq=False)
class _Bus:
    domain: int
    number: int
    devices: list[TreeDevice] = field(default_factory=list)


@dataclass(eq=False)
class _Bridge:
    domain: int
    secondary: int
    subordinate: int
    device: TreeDevice | None  # None: the host bridge
    buses: list[_Bus] = field(default_factory=list)  # in order of creation (new_bus() appends)

    def find_bus(self, domain: int, number: int) -> _Bus | None:
        return next((b for b in self.buses if b.domain == domain and b.number == number), None)

    def new_bus(self, domain: int, number: int) -> _Bus:
        bus = _Bus(domain, number)
        self.buses.append(bus)
        return bus


def _grow_tree(devices: list[TreeDevice]) -> tuple[_Bridge, dict[TreeDevice, _Bridge]]:
    """grow_tree(): the host bridge (every bus of every segment) and the bridge of each bridge function."""
    host = _Bridge(0, 0, NO_BUS, None)
    bridges = {d: _Bridge(d.segment, d.secondary, d.subordinate, d) for d in devices if d.is_bridge}
    for b in bridges.values():  # "Insert secondary bus for each bridge"
        b.new_bus(b.domain, b.secondary)
    # Nested ranges: the innermost bridge holding a bus is the last one (in address order) holding
    # it, since a bridge's secondary bus is above the bus it sits on; insert_dev() reaches the same
    # bridge by descending the tree of ranges.
    innermost_first = list(bridges.values())[::-1]
    for d in devices:  # "Create bus structs and link devices"
        bus = host.find_bus(d.segment, d.bus)
        if bus is None:
            inner = next(
                (
                    c
                    for c in innermost_first
                    if c.domain == d.segment and c.secondary <= d.bus <= c.subordinate
                ),
                None,
            )
            if inner is not None:
                bus = inner.find_bus(d.segment, d.bus) or inner.new_bus(d.segment, d.bus)
            else:
                bus = host.new_bus(d.segment, d.bus)
        bus.devices.append(d)
    return host, bridges


class _Printer:
    """ls-tree.c's char line[LINE_BUF_SIZE] and its pointers, as a growable list of characters."""

    def __init__(self, bridges: dict[TreeDevice, _Bridge]) -> None:
        self.line: list[str] = []
        self.out: list[str] = []
        self.bridges = bridges

    def put(self, at: int, text: str) -> int:
        """tree_printf(line, at, ...): the text and a terminating NUL; returns the new end."""
        end = at + len(text)
        if len(self.line) < end + 1:
            self.line += [" "] * (end + 1 - len(self.line))
        self.line[at:end] = text
        self.line[end] = "\0"
        return end

    def print_it(self, at: int) -> None:
        self.put(at, "")
        text = "".join(self.line[:at])
        self.out.append(text + "\n")
        for i, ch in enumerate(text):
            self.line[i] = "|" if ch in "+|" else " "

    def tree_dev(self, d: TreeDevice, at: int) -> None:
        at = self.put(at, f"{d.device:02x}.{d.function:x}")
        bridge = self.bridges.get(d)
        if bridge is not None:
            if bridge.secondary == 0:
                at = self.put(at, "-")
            elif bridge.secondary == bridge.subordinate:
                at = self.put(at, f"-[{bridge.secondary:02x}]-")
            else:
                at = self.put(at, f"-[{bridge.secondary:02x}-{bridge.subordinate:02x}]-")
            self.tree_bridge(bridge, at)
            return
        self.print_it(at)

    def tree_bus(self, bus: _Bus, at: int) -> None:
        if not bus.devices:
            self.print_it(at)
            return
        count = len(bus.devices)
        for i, d in enumerate(bus.devices):
            after = self.put(at, "--" if count == 1 else "\\-" if i == count - 1 else "+-")
            self.tree_dev(d, after)

    def tree_bridge(self, b: _Bridge, at: int) -> None:
        at = self.put(at, "-")
        if len(b.buses) == 1:
            if b.device is None:
                at = self.put(at, f"[{b.buses[0].domain:04x}:{b.buses[0].number:02x}]-")
            self.tree_bus(b.buses[0], at)
            return
        count = len(b.buses)
        for i, u in enumerate(b.buses):
            mark = "\\-" if i == count - 1 else "+-"
            k = self.put(at, f"{mark}[{u.domain:04x}:{u.number:02x}]-")
            self.tree_bus(u, k)


def lspci_tree(devices: Iterable[TreeDevice]) -> str:
    """`lspci -t` for these functions (any order: sorted by segment, bus, devfn first, as lspci does)."""
    ordered = sorted(devices, key=lambda d: (d.segment, d.bus, d.device, d.function))
    host, bridges = _grow_tree(ordered)
    printer = _Printer(bridges)
    printer.tree_bridge(host, 0)  # show_forest()
    return "".join(printer.out)


def tree_devices(host_bridge: HostBridge) -> list[TreeDevice]:
    """The host bridge's present functions as lspci would read them (bus numbers from their registers)."""
    out = []
    for info in host_bridge.devices():
        fn = host_bridge.function(info.bdf)
        if fn is None:  # hot-removed meanwhile
            continue
        config = fn.config
        out.append(
            TreeDevice(
                info.bdf.segment,
                info.bdf.bus,
                info.bdf.device,
                info.bdf.function,
                info.class_code,
                info.header_type,
                config.read_int(PCI_SECONDARY_BUS, 1),
                config.read_int(PCI_SUBORDINATE_BUS, 1),
            )
        )
    return out
