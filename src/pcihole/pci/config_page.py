"""One present function's 4 KiB ECAM page, as the memory map's handler for the page punched for it.

The memory layer knows no PCI: a punched page is an `Mmio` region whose handler reads and writes at
offsets from the page (memory/region.py MmioHandler). `ConfigPage` is that handler for ECAM: it
hands the access to the host bridge, which answers from the function's config space, or with the
segment's fill byte while the function is not (or no longer) in its table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pcihole.pci.host_bridge import HostBridge


class ConfigPage:
    """The Mmio handler of one function's ECAM page: offsets are relative to the page."""

    def __init__(self, host_bridge: HostBridge, page_gpa: int) -> None:
        self.host_bridge = host_bridge
        self.page_gpa = page_gpa

    def read(self, offset: int, size: int) -> bytes:
        return self.host_bridge.mmio_read(self.page_gpa + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.host_bridge.mmio_write(self.page_gpa + offset, data)


__all__ = ["ConfigPage"]
