"""The ECAM host bridge: routes guest accesses in every segment's window to functions or to the hole.

What the machine layer calls:
- `mmio_read(gpa, size) -> bytes` and `mmio_write(gpa, data)` for a KVM_EXIT_MMIO inside an ECAM
  window (1 to 8 bytes). Each access is cut as QEMU cuts it (see access.py); every byte gets its own
  function's value, and a byte of an absent function reads as its segment's fill byte (0xff by default:
  "all-ones", what Linux's pci_bus_generic_read_dev_vendor_id() takes for "no device").
- `absent_write(gpa, data)` for a write the hole swallowed and the VMM trapped (`writes = "trap"`, e.g.
  drained from the coalesced-MMIO ring): it is logged as an Unsupported Request as described below.
- `add_listener(cb)` / `present_pages()`: the 4 KiB pages (guest-physical) of present functions; the
  memory map punches them out of the hole. `cb(page_gpa, present)` is told about every change.
- `add_function(spec)` / `remove_function(bdf)`: hot-plug.
- `use_mirrors()` / `mirror_page(page)` / `close_mirrors()`: each present function's config space
  lives in its segment's read-only mirror page (config_mirror.py), which the memory map backs with a
  read-only memslot so reads of present functions do not exit. A page is blanked to the fill before
  it is announced present and after its function left, and the function's space is attached to it
  only inside the table (under the lock): a read sees fill bytes until the function is in the table,
  its bytes while it is, fill bytes again once it has left, as an exit would answer.
- `add_mirror_reader(reader)` / `count_mirror_reads(n)`: something that reads present functions'
  bytes from the mirror without this bridge's lock and from another thread than the one changing
  them (the C run loop, machine/ecam_window.py's FillPagesWiring) is told, under the lock, which
  pages it may read (`set_mirrored`: the function is in the table and its space is the mirror
  page), and brackets every hot-plug step's changes (`mirror_changing` / `mirror_changed`, a
  seqlock's writer side), so it never copies bytes that a step is changing; the exits it answers
  are counted as config reads by `count_mirror_reads`.

Reads have no side effect in configuration space (ConfigSpace.read only copies bytes; no function
model hooks a read, none clears a bit on read, none computes a value that is not in its bytes, and
every change to the bytes is made under the lock, by a guest write, a trapped write or a hot-plug
step), so serving them from the mirror changes nothing but `stats.config_reads` and
`absent_reads`, which then count only the reads that exited (the C run loop's mirror reads exit,
and are counted by `count_mirror_reads`).

Writes to absent functions: with `writes = "discard"` they are dropped. With `writes = "trap"` each
configuration request (one piece of the access) is completed with Unsupported Request: on the secondary
side of the root port whose bus range holds the target bus, that port logs it (root_port.py, aer.py);
on the root bus, or on a bus no port reaches, the Root Complex itself completes it and there is no
guest-visible register to set (a real root complex reports that through platform-specific means, and
neither QEMU nor the x86 host bridge function model one), so it is only counted.

Locking: one lock guards the function table, the configuration bytes and the counters, and is held for a
whole access, so a vCPU thread sees each access entirely before or entirely after a hot-plug step. Hot-plug
steps are serialized by a second lock and call listeners without holding the first, so a listener may
wait for a vCPU (e.g. to change memslots) without deadlock. The order keeps the transitional state safe
(docs/design.md, hole contract 5, "either the function's bytes or all-ones"): a page is announced present
*before* its function enters the table and announced absent *after* it has left; in between, accesses
exit to the VMM and read all-ones.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from pcihole.memory.region import MirrorPage

from . import ecam
from .access import split_access
from .bdf import Bdf
from .config_mirror import ConfigMirror
from .endpoint import Endpoint, ExpanderFunction, HostBridgeFunction
from .function import DeviceInfo, PciFunction
from .pci_bridge import PciBridge
from .pcie_port import PciePort
from .root_port import RootPort
from .switch_port import DownstreamPort, UpstreamPort
from .topology import (
    BUS_CONVENTIONAL,
    BUS_ROOT,
    WRITES_TRAP,
    AddableSpec,
    DownstreamPortSpec,
    ExpanderSpec,
    FunctionSpec,
    HostBridgeSpec,
    PciBridgeSpec,
    RootPortSpec,
    Segment,
    Topology,
    TopologyError,
    UpstreamPortSpec,
)
from .type1_header import Type1Function

#: Clears the register offset of an ECAM address, leaving its function's 4 KiB config page.
FUNCTION_PAGE_MASK = ~(ecam.CONFIG_SPACE_SIZE - 1)
MAX_ACCESS = 8  # the largest KVM_EXIT_MMIO (kvm_run.mmio.data is 8 bytes)

PageListener = Callable[[int, bool], None]


class MirrorReader(Protocol):
    """Reads present functions' config bytes from their mirror pages without the host bridge's lock
    (the C run loop's table, hv/kvm/c_run_loop.py FillPages). Called under the lock."""

    def mirror_changing(self) -> None:
        """Mirror bytes or mirrored pages are about to change: no read of them until changed."""

    def set_mirrored(self, gpa: int, mirrored: bool) -> None:
        """The page holding gpa may (True) or may no longer (False) be read from the mirror."""

    def mirror_changed(self) -> None:
        """The change is complete."""


class EcamAccessError(ValueError):
    """An access handed to the host bridge that is not entirely inside its ECAM windows."""


@dataclass
class HostBridgeStats:
    """Counts of guest accesses the host bridge served (reads absorbed by a hole never get here)."""

    config_reads: int = 0  # mmio_read calls
    config_writes: int = 0  # mmio_write and absent_write calls
    absent_reads: int = 0  # reads with at least one byte in an absent function
    absent_writes: int = 0  # writes with at least one byte to an absent function (dropped or trapped)
    unsupported_requests: int = 0  # trapped configuration requests completed with UR


def _byte_enables(address: int, size: int) -> int:
    """First DW Byte Enables of a piece (PCIe 6.0 §2.2.5): one bit per byte of the dword it covers."""
    return ((1 << size) - 1) << (address & 3)


class HostBridge:
    """All segments of a machine: their functions, their holes, and hot-plug."""

    def __init__(self, topology: Topology) -> None:
        topology.validate()
        self._lock = threading.Lock()
        self._hotplug_lock = threading.Lock()
        self._topology = topology
        self._segments = tuple(sorted(topology.segments, key=lambda s: s.window_base))
        self._window_bases = tuple(s.window_base for s in self._segments)  # for segment_at's bisect
        self._functions: dict[int, PciFunction] = {}
        self._listeners: list[PageListener] = []
        self._mirror: ConfigMirror | None = None
        self._mirror_readers: list[MirrorReader] = []
        self.stats = HostBridgeStats()
        functions_per_device: dict[tuple[int, int, int], int] = {}
        occupied_buses: set[tuple[int, int]] = set()
        for spec in topology.functions():
            self._functions[self._page_of(spec.bdf)] = self._make(spec, topology)
            device = (spec.bdf.segment, spec.bdf.bus, spec.bdf.device)
            functions_per_device[device] = functions_per_device.get(device, 0) + 1
            occupied_buses.add((spec.bdf.segment, spec.bdf.bus))
        for fn in self._functions.values():
            if fn.bdf.function == 0:
                fn.set_multifunction(functions_per_device[(fn.bdf.segment, fn.bdf.bus, fn.bdf.device)] > 1)
            if isinstance(fn, PciePort) and fn.has_slot:
                fn.set_slot_occupied((fn.bdf.segment, fn.secondary) in occupied_buses, hotplug=False)

    # --- topology ---------------------------------------------------------------------------------------
    @property
    def topology(self) -> Topology:
        """The current topology (replaced, never modified, by hot-plug)."""
        return self._topology

    @property
    def segments(self) -> tuple[Segment, ...]:
        """Segments ordered by window address; each has window_base, window_size, fill and writes."""
        return self._segments

    def segment_at(self, gpa: int) -> Segment | None:
        """The segment whose ECAM window holds `gpa`, or None. Called on every ECAM exit: windows never
        overlap (Topology.validate), so the only candidate is the last one starting at or below gpa."""
        i = bisect.bisect_right(self._window_bases, gpa) - 1
        if i >= 0 and gpa <= self._segments[i].window_last:
            return self._segments[i]
        return None

    def _page_of(self, bdf: Bdf) -> int:
        return self._topology.segment(bdf.segment).page_gpa(bdf)

    def _make(self, spec: FunctionSpec, topology: Topology) -> PciFunction:
        if isinstance(spec, HostBridgeSpec):
            return HostBridgeFunction(spec)
        if isinstance(spec, RootPortSpec):
            return RootPort(spec)
        if isinstance(spec, UpstreamPortSpec):
            return UpstreamPort(spec)
        if isinstance(spec, DownstreamPortSpec):
            return DownstreamPort(spec)
        if isinstance(spec, PciBridgeSpec):
            return PciBridge(spec)
        if isinstance(spec, ExpanderSpec):
            return ExpanderFunction(spec)
        bus_kind = topology.bus_kind(spec.bdf.segment, spec.bdf.bus)
        return Endpoint(
            spec, root_complex_integrated=bus_kind == BUS_ROOT, conventional=bus_kind == BUS_CONVENTIONAL
        )

    def function(self, bdf: Bdf) -> PciFunction | None:
        """The present function at bdf, if any (its config space is guarded by this bridge's lock)."""
        with self._lock:
            try:
                page = self._page_of(bdf)
            except KeyError:
                return None
            return self._functions.get(page)

    def devices(self) -> list[DeviceInfo]:
        """Every present function, ordered by BDF as lspci lists them."""
        with self._lock:
            return sorted((fn.info() for fn in self._functions.values()), key=lambda d: d.bdf)

    def present_pages(self) -> list[int]:
        """Sorted guest-physical addresses of the 4 KiB ECAM pages of present functions."""
        with self._lock:
            return sorted(self._functions)

    def page_present(self, gpa: int) -> bool:
        """Whether the 4 KiB ECAM page holding `gpa` belongs to a present function (no lock: one dict
        lookup, for statistics on the exit path)."""
        return (gpa & ~0xFFF) in self._functions

    # --- mirrors ---------------------------------------------------------------------------------------
    def use_mirrors(self) -> None:
        """Move every present function's config space into the windows' mirror (once)."""
        with self._lock:
            if self._mirror is not None:
                return
            self._mirror = ConfigMirror(self._segments)
            for page, fn in self._functions.items():
                fn.config.attach(self._mirror.page(page))

    def mirror_page(self, page: int) -> MirrorPage | None:
        """The page's mirror (host address, memfd page), or None without mirrors."""
        return None if self._mirror is None else self._mirror.mirror_page(page)

    def mirror_bytes(self) -> int:
        """Host memory behind the mirror (the pages of functions ever present)."""
        return 0 if self._mirror is None else self._mirror.allocated_bytes()

    def close_mirrors(self) -> None:
        """Give the functions private copies of their bytes and unmap the mirror (after the
        memslots over it are gone, and once no mirror reader can be copying: telling the readers
        here that no page is mirrored keeps them from starting a copy, not from finishing one that
        started before; Machine.close closes the vCPU, whose thread runs the C loop, first)."""
        with self._lock:
            if self._mirror is None:
                return
            with self._changing_mirror():
                for page in sorted(self._functions):
                    for reader in self._mirror_readers:
                        reader.set_mirrored(page, False)
            self._mirror_readers = []
            for fn in self._functions.values():
                fn.config.detach()
            self._mirror.close()
            self._mirror = None

    def add_mirror_reader(self, reader: MirrorReader) -> None:
        """Tell `reader` which pages it may read from the mirror, now (every present function's) and
        at every hot-plug step, which it also brackets (MirrorReader). Needs the mirrors in use."""
        with self._lock:
            if self._mirror is None:
                raise ValueError("a mirror reader without mirrors (use_mirrors() first)")
            self._mirror_readers.append(reader)
            with self._changing_mirror():
                for page in sorted(self._functions):
                    reader.set_mirrored(page, True)

    def count_mirror_reads(self, n: int) -> None:
        """`n` reads of present functions that a mirror reader answered from the mirror pages: they
        exited (KVM_EXIT_MMIO) as mmio_read's do, and are counted as mmio_read counts them."""
        with self._lock:
            self.stats.config_reads += n

    @contextmanager
    def _changing_mirror(self) -> Iterator[None]:
        """Under the lock: the mirror readers read no mirror page until the block has ended."""
        readers = list(self._mirror_readers)
        for reader in readers:
            reader.mirror_changing()
        try:
            yield
        finally:
            for reader in readers:
                reader.mirror_changed()

    # --- guest accesses ---------------------------------------------------------------------------------
    def _pieces(self, gpa: int, size: int) -> Iterator[tuple[int, int, Segment]]:
        if not 1 <= size <= MAX_ACCESS:
            raise EcamAccessError(f"ECAM access of {size} bytes at {gpa:#x}: size must be 1 to {MAX_ACCESS}")
        pieces = []
        for address, length in split_access(gpa, size):
            segment = self.segment_at(address)
            if segment is None:
                raise EcamAccessError(
                    f"ECAM access [{gpa:#x}, {gpa + size - 1:#x}]: {address:#x} is in no segment's window"
                )
            pieces.append((address, length, segment))
        return iter(pieces)

    def mmio_read(self, gpa: int, size: int) -> bytes:
        """The `size` bytes the guest reads at gpa (little-endian, as kvm_run.mmio.data holds them)."""
        if size in (1, 2, 4) and not gpa & (size - 1):
            # Fast path for what Linux issues (naturally aligned movb/movw/movl): a single piece.
            segment = self.segment_at(gpa)
            if segment is not None:
                with self._lock:
                    self.stats.config_reads += 1
                    fn = self._functions.get(gpa & FUNCTION_PAGE_MASK)
                    if fn is not None:
                        return fn.config.read(gpa & ~FUNCTION_PAGE_MASK, size)
                    self.stats.absent_reads += 1
                    return bytes((segment.fill,)) * size
        out = bytearray()
        with self._lock:
            self.stats.config_reads += 1
            absent = False
            for address, length, segment in self._pieces(gpa, size):
                fn = self._functions.get(address & FUNCTION_PAGE_MASK)
                if fn is None:
                    out += bytes((segment.fill,)) * length
                    absent = True
                else:
                    out += fn.config.read(address & ~FUNCTION_PAGE_MASK, length)
            if absent:
                self.stats.absent_reads += 1
        return bytes(out)

    def mmio_read_int(self, gpa: int, size: int) -> int:
        """mmio_read as the little-endian value a `mov` of that size loads."""
        return int.from_bytes(self.mmio_read(gpa, size), "little")

    def mmio_write(self, gpa: int, data: bytes) -> None:
        """A guest write at gpa: applied to present functions' write masks, the hole's policy elsewhere."""
        with self._lock:
            pieces = list(self._pieces(gpa, len(data)))  # all checked before anything changes
            self.stats.config_writes += 1
            absent = False
            for address, length, segment in pieces:
                chunk = data[address - gpa : address - gpa + length]
                fn = self._functions.get(address & FUNCTION_PAGE_MASK)
                if fn is not None:
                    fn.config.write(address & ~FUNCTION_PAGE_MASK, chunk)
                    continue
                absent = True
                if segment.writes == WRITES_TRAP:
                    self._unsupported_request(segment, address, length)
            if absent:
                self.stats.absent_writes += 1

    def absent_write(self, gpa: int, data: bytes) -> None:
        """A write that landed in the hole and was trapped: log an Unsupported Request for each piece.

        The write never reached a function, whatever the table holds now (a function hot-added since
        the write was queued did not see it), so it is not applied, only logged.
        """
        with self._lock:
            pieces = list(self._pieces(gpa, len(data)))
            self.stats.config_writes += 1
            self.stats.absent_writes += 1
            for address, length, segment in pieces:
                self._unsupported_request(segment, address, length)

    def _unsupported_request(self, segment: Segment, address: int, length: int) -> Type1Function | None:
        target = ecam.decode(address - segment.ecam_base)
        self.stats.unsupported_requests += 1
        spec = self._topology.bridge_for_bus(segment.id, target.bus)
        if spec is None:
            return None  # completed by the Root Complex: nothing guest-visible to set
        port = self._functions.get(segment.page_gpa(spec.bdf))
        if not isinstance(port, Type1Function):
            return None
        bdf = Bdf(segment.id, target.bus, target.device, target.function)
        port.record_unsupported_request(bdf, target.register, _byte_enables(address, length))
        return port

    # --- hot-plug ---------------------------------------------------------------------------------------
    def add_listener(self, listener: PageListener) -> None:
        """Call listener(page_gpa, present) on every hot-plug change (not for the initial pages)."""
        with self._lock:
            self._listeners.append(listener)

    def _notify(self, page: int, present: bool) -> None:
        with self._lock:
            listeners = list(self._listeners)
        told: list[PageListener] = []
        try:
            for listener in listeners:
                listener(page, present)
                told.append(listener)
        except BaseException:
            for listener in reversed(told):  # undo, so a failed step changes nothing
                listener(page, not present)
            raise

    def add_function(self, spec: AddableSpec) -> PciFunction:
        """Hot-add a function; raises TopologyError (and changes nothing) if the result would be invalid."""
        with self._hotplug_lock:
            topology = self._topology.with_function(spec).validate()
            fn = self._make(spec, topology)
            page = topology.segment(spec.bdf.segment).page_gpa(spec.bdf)
            if self._mirror is not None:
                self._mirror.blank(page)  # read as absent until the function is in the table
            self._notify(page, True)
            # Mirror readers read nothing while the function's bytes are copied into its page (and
            # its parent port's slot status and function 0's multi-function bit change); the page
            # is theirs to read once the function is in the table with its bytes in the page.
            with self._lock, self._changing_mirror():
                if self._mirror is not None:
                    fn.config.attach(self._mirror.page(page))
                self._functions[page] = fn
                self._topology = topology
                self._update_multifunction(spec.bdf)
                self._update_slot(spec.bdf, hotplug=True)
                for reader in self._mirror_readers:
                    reader.set_mirrored(page, True)
            return fn

    def remove_function(self, bdf: Bdf) -> None:
        """Hot-remove a bridge, port or endpoint (function 0 last; a bridge only when nothing is below it)."""
        with self._hotplug_lock:
            topology = self._topology.without_function(bdf).validate()
            page = self._page_of(bdf)
            # The page is no longer the readers' before its function leaves and its page is blanked.
            with self._lock, self._changing_mirror():
                for reader in self._mirror_readers:
                    reader.set_mirrored(page, False)
                fn = self._functions.pop(page)
                if self._mirror is not None:
                    fn.config.detach()
                    self._mirror.blank(page)
                self._topology = topology
                self._update_multifunction(bdf)
                self._update_slot(bdf, hotplug=True)
            self._notify(page, False)

    def _update_multifunction(self, bdf: Bdf) -> None:
        """Keep function 0's multi-function bit equal to "the device has other functions"."""
        fn0 = self._functions.get(self._page_of(bdf.with_function(0)))
        if fn0 is not None:
            fn0.set_multifunction(self._topology.is_multifunction(fn0.bdf))

    def _update_slot(self, bdf: Bdf, *, hotplug: bool) -> None:
        """Presence Detect / link state of the root or downstream port whose secondary bus is bdf's bus."""
        spec = self._topology.parent_bridge(bdf.segment, bdf.bus)
        if spec is None:
            return
        port = self._functions.get(self._page_of(spec.bdf))
        if isinstance(port, PciePort) and port.has_slot:
            occupied = any(
                f.bdf.segment == bdf.segment and f.bdf.bus == bdf.bus
                for f in self._topology.functions()
                if not isinstance(f, HostBridgeSpec)
            )
            port.set_slot_occupied(occupied, hotplug=hotplug)


__all__ = [
    "EcamAccessError",
    "HostBridge",
    "HostBridgeStats",
    "MirrorReader",
    "PageListener",
    "TopologyError",
]
