"""Wiring between the PCI host bridge and the memory map, and the ECAM windows on the MMIO bus.

- `segment_hole`: each segment's ECAM window is a hole in the memory map, with the segment's fill
  byte and write policy. The segment (the machine file's `fill`) is the one owner of the fill: the
  hole answers with it, so does the host bridge for an absent function's bytes.
- Each present function's 4 KiB ECAM page is punched out of its segment's hole as an Mmio region
  whose handler is the function's `ConfigPage` (pci/config_page.py).
- Where the hole strategy maps memslots, each present page is backed by a read-only slot over its
  function's mirror page (pci/config_mirror.py): reads cost no exit, writes exit and are emulated.
- Hot-plug: the host bridge announces pages becoming present or absent (`HotplugWiring`), and the
  memory map punches or fills them. The host bridge announces a page present before the function
  enters its table and absent after it has left, so every read in between is answered with the
  fill by the host bridge: the guest sees fill bytes or the function's bytes, never anything else.
- `EcamWindow` puts a segment's window on the MMIO bus. An exit in it goes one way down: to the
  memory map's view (the fill for hole pages, the ConfigPage and so the host bridge for punched
  pages), counted; where the map has no region (it is being torn down), to the host bridge.
- `FillPagesWiring`: with the C run loop (hv/kvm/run_loop.c), the config reads that exit are
  answered in C: an absent function's from a bitmap of present pages per window and the segment's
  fill (the bitmap follows the memory map's punched pages: HotplugWiring sets and clears the bits),
  a present function's from its mirror page (the host bridge marks the pages it may read, as a
  MirrorReader); what the C loop answered is counted as EcamWindow.read counts it.
"""

from __future__ import annotations

from pcihole.hv.kvm.c_run_loop import CRunLoop, FillPages, LoggedReads
from pcihole.machine.stats import RunStats
from pcihole.memory import GuestMemory, GuestRange, Hole, MapView
from pcihole.memory.region import WritePolicy
from pcihole.pci.config_page import ConfigPage
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import WRITES_EXIT, WRITES_TRAP, Segment


def segment_hole(segment: Segment, host_bridge: HostBridge) -> Hole:
    """The hole over a segment's whole ECAM window: its fill, its write policy (trapped writes are
    logged as Unsupported Requests by the host bridge)."""
    trap = segment.writes == WRITES_TRAP
    writes: WritePolicy = "trap" if trap else "exit" if segment.writes == WRITES_EXIT else "discard"
    return Hole(
        GuestRange.from_size(segment.window_base, segment.window_size),
        f"ecam segment {segment.id}",
        fill=segment.fill,
        writes=writes,
        on_write=host_bridge.absent_write if trap else None,
    )


class HotplugWiring:
    """Listens to the host bridge and keeps the memory map's punched pages equal to present functions
    (and, with the C run loop, its table's present pages: FillPagesWiring)."""

    def __init__(self, host_bridge: HostBridge, memory: GuestMemory) -> None:
        self.host_bridge = host_bridge
        self.memory = memory
        self.changes = 0
        self.fill_pages: FillPages | None = None

    def __call__(self, page_gpa: int, present: bool) -> None:
        # The C loop's bit is set before the page is punched and cleared after it is filled, so
        # that every read the C loop answers is one the memory map's view would answer from the
        # hole: the same answer and the same counts (FillPagesWiring).
        fill_pages = self.fill_pages
        if present:
            if fill_pages is not None:
                fill_pages.set_present(page_gpa, True)
            try:
                self.memory.punch_page(
                    page_gpa,
                    ConfigPage(self.host_bridge, page_gpa),
                    name=f"ecam page {page_gpa:#x}",
                    mirror=self.host_bridge.mirror_page(page_gpa),
                )
            except BaseException:
                if fill_pages is not None:
                    fill_pages.set_present(page_gpa, False)
                raise
        else:
            self.memory.fill_page(page_gpa)
            if fill_pages is not None:
                fill_pages.set_present(page_gpa, False)
        self.changes += 1


class EcamWindow:
    """A bus device over one ECAM window, answering exits from the memory map in force."""

    def __init__(self, view: MapView, host_bridge: HostBridge, stats: RunStats) -> None:
        self.view = view
        self.host_bridge = host_bridge
        self.stats = stats

    def _count(self, addr: int, size: int, kind: str) -> None:
        self.stats.ecam_exits += 1
        if not self.host_bridge.page_present(addr):
            self.stats.ecam_absent_exits += 1
            self.stats.ecam_absent_accesses[(addr, size, kind)] += 1

    def read(self, addr: int, size: int) -> bytes:
        # _count inlined: this is the exit path of every config read with the `exit` strategy.
        stats = self.stats
        stats.ecam_exits += 1
        stats.ecam_reads += 1
        if not self.host_bridge.page_present(addr):
            stats.ecam_absent_exits += 1
            stats.ecam_absent_accesses[(addr, size, "read")] += 1
        data = self.view.read(addr, size)
        return data if data is not None else self.host_bridge.mmio_read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._count(addr, len(data), "write")
        if not self.view.write(addr, data):
            self.host_bridge.mmio_write(addr, data)


class FillPagesWiring:
    """The C run loop's table over every ECAM window, and the counting of what it answers.

    Fill reads. A page is marked present while the memory map has it punched (HotplugWiring sets
    the bit before it punches and clears it after it fills), so the C loop answers with the fill
    exactly the reads that EcamWindow.read would answer from the hole, and with the same fill. Such
    a page's function is never in the host bridge's table: it announces a page present before the
    function enters the table and absent after it has left. So each such read is counted here as
    EcamWindow.read counts a read at an absent function, and as the view counts a hole read.

    Mirror reads, where the host bridge keeps its functions' config spaces in mirror pages
    (HostBridge.use_mirrors; the builder makes them for the C loop under every strategy). A page
    is marked mirrored by the host bridge, under its lock, while its function is in the table with
    its space attached to the page (HostBridge.add_mirror_reader). A hot-plug step, on whatever
    thread, goes (HostBridge.add_function / remove_function, HotplugWiring):

        add:    blank the mirror page | mark present, punch | seq odd: attach (copy the bytes in),
                enter the table, parent's slot status, mark mirrored; seq even
        remove: seq odd: unmark mirrored, leave the table, detach, blank, parent's slot status;
                seq even | fill the page back, unmark present

    and the C loop answers a read of the page, at each point of it, as Python would then: before
    "mark present" and after "unmark present" with the fill, as the hole (the function is not in
    the table: Python's host bridge too would give the fill); while present but not mirrored it
    answers nothing (Python takes the lock and answers: the fill, or the function's bytes); inside
    a seq-odd section nothing either (its seqlock check sends the read to Python, which waits for
    the lock); while mirrored and outside any section, it copies the page, which is then the
    function's config space itself, exactly the bytes mmio_read would copy under the lock (the
    only other changes to those bytes are guest writes and trapped writes, emulated by Python on
    this vCPU's thread between two calls of the C loop, so never during a copy). So every read it
    answers gives the fill or the function's bytes, never a mix and never anything else.

    A mirrored page is punched (marked after it was announced present, unmarked before it is
    announced absent): EcamWindow.read would give it to the view, whose Mmio region's handler
    (ConfigPage) asks the host bridge, which finds the function and copies its bytes. So each such
    read is counted here as that path counts it: one mmio_read exit, ECAM exit and ECAM read, no
    absent one, one Mmio read of the view, one config read of the host bridge.
    """

    def __init__(
        self, loop: CRunLoop, host_bridge: HostBridge, hotplug: HotplugWiring, stats: RunStats
    ) -> None:
        self.stats = stats
        self.view = hotplug.memory.view
        self.host_bridge = host_bridge
        segments = host_bridge.segments
        mirrors = {}
        for s in segments:
            mirror = host_bridge.mirror_page(s.window_base)
            if mirror is not None:
                mirrors[s.window_base] = mirror.hva  # the window's pages follow it in the mirror
        self.fill_pages = FillPages(
            loop,
            [(s.window_base, s.window_size, s.fill) for s in segments],
            self._count,
            mirrors=mirrors,
            mirror_sink=self._count_mirror_reads,
        )
        for page in host_bridge.present_pages():
            self.fill_pages.set_present(page, True)
        hotplug.fill_pages = self.fill_pages
        if mirrors:
            host_bridge.add_mirror_reader(self.fill_pages)

    def _count_mirror_reads(self, n: int) -> None:
        stats = self.stats
        stats.exits.mmio_read += n
        stats.ecam_exits += n
        stats.ecam_reads += n
        self.view.counters.mmio_reads += n
        self.host_bridge.count_mirror_reads(n)

    def _count(self, reads: LoggedReads) -> None:
        stats, n = self.stats, len(reads)
        stats.exits.mmio_read += n
        stats.ecam_exits += n
        stats.ecam_reads += n
        stats.ecam_absent_exits += n
        self.view.counters.hole_reads += n
        stats.defer_absent_reads(reads.addresses_and_sizes)
