"""Wiring between the PCI host bridge and the memory map, and the ECAM windows on the MMIO bus.

- Each present function's 4 KiB ECAM page is punched out of its segment's hole as an Mmio region
  whose handler is a `FunctionPage` (the host bridge answers from the function's config space).
- Hot-plug: the host bridge announces pages becoming present or absent (`HotplugWiring`), and the
  memory map punches or fills them. The host bridge announces a page present before the function
  enters its table and absent after it has left, so every read in between is answered all-ones by
  the host bridge: the guest sees all-ones or the function's bytes, never anything else.
- `EcamWindow` puts a segment's window on the MMIO bus: an exit anywhere in it is answered from the
  memory map in force (GuestMemory.handle_mmio_*), i.e. the fill for hole pages and the host bridge
  for punched pages, and counted.
"""

from __future__ import annotations

from pcihole.machine.stats import RunStats
from pcihole.memory import GuestMemory
from pcihole.pci.host_bridge import HostBridge


class FunctionPage:
    """The Mmio handler of one function's ECAM page: offsets are relative to the page."""

    def __init__(self, host_bridge: HostBridge, page_gpa: int) -> None:
        self.host_bridge = host_bridge
        self.page_gpa = page_gpa

    def read(self, offset: int, size: int) -> bytes:
        return self.host_bridge.mmio_read(self.page_gpa + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.host_bridge.mmio_write(self.page_gpa + offset, data)


class HotplugWiring:
    """Listens to the host bridge and keeps the memory map's punched pages equal to present functions."""

    def __init__(self, host_bridge: HostBridge, memory: GuestMemory) -> None:
        self.host_bridge = host_bridge
        self.memory = memory
        self.changes = 0

    def __call__(self, page_gpa: int, present: bool) -> None:
        if present:
            self.memory.punch_page(page_gpa, FunctionPage(self.host_bridge, page_gpa), name=f"ecam page {page_gpa:#x}")
        else:
            self.memory.fill_page(page_gpa)
        self.changes += 1


class EcamWindow:
    """A bus device over one ECAM window, answering exits from the memory map in force."""

    def __init__(self, memory: GuestMemory, stats: RunStats) -> None:
        self.memory = memory
        self.stats = stats

    def read(self, addr: int, size: int) -> bytes:
        self.stats.ecam_exits += 1
        data = self.memory.handle_mmio_read(addr, size)
        return data if data is not None else b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        self.stats.ecam_exits += 1
        self.memory.handle_mmio_write(addr, data)
